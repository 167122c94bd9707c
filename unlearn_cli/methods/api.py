"""What an unlearning method receives. A method is a plain function:

    def my_method(model, data, params, *, device, seed) -> torch.nn.Module

- model: the original model (a private copy, already on `device`, in eval mode); change it in place
  or return a new one;
- data: an `UnlearnData` (forget and retain tensors on `device`, and `loader()` for batches);
- params: the method's hyperparameters (`method.<name>.*` in the config): a frozen dataclass for the
  built-in methods, a plain dict for plugins;
- device: a `torch.device`; seed: an int that must decide all of the method's randomness.

Speed: `training.fit` called inside a method trains with the experiment's speed options
(`train.precision`, `channels_last`, `compile`, `cuda_graph`; `apply` sets them around every run,
see `training.speed_options`), so a method is timed under the settings the reference models were.
They are in `data.speed` too; a method with a training loop of its own can use
`training.autocast(device)` for the experiment's precision (bf16 needs no loss scale; for fp16 see
`training.LossScaler`).

Below it, small helpers the built-in methods share: `child_seed` (independent random streams of a
run), `reinitialise` (fresh weights from a seed), `logits` (outputs without gradients, in
chunks), `batches` (one shuffled pass of index batches), `weight_layers` (the conv layers, or the
linear ones on a model without convolutions) and `train_pass` (one pass of plain SGD steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class UnlearnData:
    forget_x: torch.Tensor  # [F, *input_shape] on the device
    forget_y: torch.Tensor  # [F] int64
    retain_x: torch.Tensor  # [R, *input_shape]
    retain_y: torch.Tensor  # [R] int64
    num_classes: int
    # How the reference models were made, for methods that train from scratch (`retrain`): the
    # model spec (`models.model_spec`) and the `train` section as `training.fit` keyword
    # arguments (`training.recipe`). None when the caller does not pass them; `retrain` then
    # re-initialises the given model in place and uses the train section's defaults (the digits
    # recipe).
    model_spec: Mapping[str, Any] | None = None
    train_recipe: Mapping[str, Any] | None = None
    # The held-out validation set (`data.validation_size` > 0): examples of neither forget nor
    # retain, never seen by the original or the reference models. None when the experiment has
    # none (the default).
    valid_x: torch.Tensor | None = None  # [V, *input_shape]
    valid_y: torch.Tensor | None = None  # [V] int64
    # The experiment's speed options (`training.speed_of`): precision, channels_last, compile,
    # cuda_graph. Empty when the caller does not pass them (then fit's own defaults apply).
    speed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("forget", "retain", "valid"):
            raise ValueError(f"split must be 'forget', 'retain' or 'valid', got {split!r}")
        if split == "valid" and self.valid_x is None:
            raise ValueError("this experiment has no validation set (data.validation_size = 0)")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def loader(
        self, split: str, batch_size: int, *, seed: int, shuffle: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over `split` ("forget", "retain" or "valid") in batches, in an order fixed by
        `seed`."""
        x, y = self.tensors(split)
        n = len(y)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
        else:
            order = torch.arange(n, device=x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def child_seed(seed: int, stream: int) -> int:
    """A seed for one independent random stream of a run, derived from the run's `seed`.

    Methods that need several streams (data order, random labels, a random teacher) number them
    0, 1, 2, ... Offsetting the seed instead would not do: `seed + 1` is the next run's seed under
    `apply`, so that run would replay this one's stream. numpy's SeedSequence hashes (seed, stream)
    into 63 bits.
    """
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def reinitialise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw fresh initial weights for every layer of `model` in place, from `seed` alone.

    Calls each module's own `reset_parameters` in module order under `torch.manual_seed(seed)`,
    which replays what building the model does when those calls are its whole initialisation:
    for the MLP the result equals `models.init_model(spec, seed)`; models with initialisation of
    their own (fastnet's identity convolutions and data-set whitening) get PyTorch's defaults
    instead. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The model's outputs [n, C] on x [n, ...] in eval mode, without gradients, `batch_size`
    examples per forward pass (a whole CIFAR-10 retain set at once would not fit in memory)."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device
            ) -> Iterator[torch.Tensor]:
    """One pass over range(n) as index batches [<= batch_size] on `device`, shuffled by
    `generator` (drawn on the CPU, so the order does not depend on the device)."""
    order = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def weight_layers(model: torch.nn.Module, *, trainable_only: bool = True
                  ) -> tuple[list[torch.nn.Module], str]:
    """The layers whose weights the challenge entries act on, and their kind ("conv"/"linear").

    Those entries were written for ResNet-18 and act on its convolutions. A model without any
    (the digits MLP) gets its linear layers instead: each is a convolution whose kernel covers
    its whole input. Layers whose weight does not train (fastnet's data-set whitening) are left
    out unless `trainable_only` is False: nothing could repair them afterwards.
    """
    def keep(m: torch.nn.Module) -> bool:
        return not trainable_only or m.weight.requires_grad

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and keep(m)]
    if convs:
        return convs, "conv"
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and keep(m)], "linear"


def train_pass(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: Any, *,
               batch_size: int, generator: torch.Generator,
               loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
               | None = None) -> None:
    """One shuffled pass over (x [n, ...], y [n]) of `opt` steps (the optimizer's lr as it is).

    `loss_fn(outputs, yb, idx)` replaces the cross-entropy; `idx` are the batch's rows of x, for
    losses that look up per-example targets. The model is left in train mode.
    """
    model.train()
    for idx in batches(len(y), batch_size, generator, x.device):
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx]) if loss_fn is None else loss_fn(out, y[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
