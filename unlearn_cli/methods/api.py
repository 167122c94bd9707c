"""What an unlearning method receives. A method is a plain function:

    def my_method(model, data, params, *, device, seed) -> torch.nn.Module

- model: the original model (a private copy, already on `device`, in eval mode); change it in place
  or return a new one;
- data: an `UnlearnData` (forget and retain tensors on `device`, and `loader()` for batches);
- params: the method's hyperparameters (`method.<name>.*` in the config): a frozen dataclass for the
  built-in methods, a plain dict for plugins;
- device: a `torch.device`; seed: an int that must decide all of the method's randomness.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class UnlearnData:
    forget_x: torch.Tensor  # [F, *input_shape] on the device
    forget_y: torch.Tensor  # [F] int64
    retain_x: torch.Tensor  # [R, *input_shape]
    retain_y: torch.Tensor  # [R] int64
    num_classes: int

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("forget", "retain"):
            raise ValueError(f"split must be 'forget' or 'retain', got {split!r}")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def loader(
        self, split: str, batch_size: int, *, seed: int, shuffle: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over `split` ("forget" or "retain") in batches, in an order fixed by `seed`."""
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

    Methods that need several streams (data order, random labels, a random teacher) take stream
    0, 1, 2, ... so that no stream of run i repeats a stream of run j (seeds i + 1 and j are
    different runs under `apply`). numpy's SeedSequence mixes (seed, stream) into 63 bits.
    """
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)
