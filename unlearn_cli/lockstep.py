"""Lockstep ensembles: K models of one architecture trained at once, in one process.

Why: the seed recipe (ResNet-18 at batch 64) is bound by kernel launches, not by the GPU's
arithmetic: about 300 ops a step whoever computes them (a review's estimate, not measured). The
batch size is part of the recipe the metric depends on, so the way to fill the GPU is more models
per kernel. `Stacked` holds K models as one module: every parameter and buffer (BatchNorm running
statistics included) gets a leading member dimension [K, ...], and the forward pass is the
architecture's own, `vmap`ped over members with `torch.func.functional_call`: a convolution
becomes one grouped convolution over K members, a BatchNorm normalises each member's batch with
that member's statistics and updates that member's running statistics. Any architecture that
`functional_call` can run works (the MLP, ResNet-18, fastnet, plugins' models).

Each member is exactly the model `training.fit` would train from the same seed: its own
initialisation (built by the caller), its own data order and augmentation draws (its own
generator, drawn in `fit`'s order), its own gradient (the loss is the sum of per-member mean
losses) and the same SGD, lookahead and schedule. Only float rounding differs: grouped kernels sum
in another order (tests/test_lockstep.py states the tolerance).

`train.engine: ensemble` selects this engine for any architecture; `train.ensemble_size` sets K
(0: every model of a job at once). A few models of every bank are still trained alone
(launch.timed_alone, chosen by seed by train_refs.timed_alone), so the runtime ratio's
denominator is an honest single-model time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import training


def _mangle(name: str) -> str:
    return name.replace(".", "__")


class Stacked(nn.Module):
    """K modules of one architecture as one: forward(x [K, B, ...]) -> [K, B, ...].

    Parameters and buffers are the members' stacked along a new first dimension (copies: the
    members are untouched until `unstack`). Frozen parameters stay frozen.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("a lockstep ensemble needs at least one model")
        first = models[0]
        self.param_names = [name for name, _ in first.named_parameters()]
        self.buffer_names = [name for name, _ in first.named_buffers()]
        for name in self.param_names:
            tensors = [dict(m.named_parameters())[name] for m in models]
            stacked = torch.stack([t.detach() for t in tensors]).clone()
            self.register_parameter(_mangle(name), nn.Parameter(
                stacked, requires_grad=tensors[0].requires_grad))
        for name in self.buffer_names:
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models]).clone()
            self.register_buffer(_mangle(name), stacked)
        # The architecture, run by functional_call with the stacked tensors: kept out of the
        # module tree so that its own weights are neither trained nor saved.
        self.__dict__["skeleton"] = copy.deepcopy(first)
        self.size = len(models)
        self.plain_mlp = _is_plain_mlp(first)

    def _mlp_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The plain MLP's forward with batched matrix products, feature-major.

        Activations are kept as [K, features, B] so that every layer is W [K, out, in] @ h
        [K, in, B] (nn.Linear's own weight layout) and its backward multiplies [K, out, B] by
        [K, B, in]: CPU BLAS is several times slower on the transposed form that vmap produces
        when a layer is narrow (10 classes: 0.66 ms against 0.11 ms per product for 25 members at
        batch 64, measured on this project's 2-core machine). Same mathematics as the vmapped
        forward; only the summation order of the products differs.
        """
        k, b = x.shape[0], x.shape[1]
        h = None
        for index, module in enumerate(self.skeleton):
            if isinstance(module, nn.Flatten):
                flat = x.reshape(k, b, -1) if h is None else h
                h = flat.transpose(1, 2)  # [K, features, B]
            elif isinstance(module, nn.Linear):
                weight = params[f"{index}.weight"]
                bias = params.get(f"{index}.bias")
                h = (torch.bmm(weight, h) if bias is None
                     else torch.baddbmm(bias.unsqueeze(-1), weight, h))
            elif isinstance(module, nn.ReLU):
                h = torch.relu(h)
            else:  # the leading Normalize: the same constant transform for every member
                x = module(x.flatten(0, 1)).unflatten(0, (k, b))
        return h.transpose(1, 2)  # [K, B, classes]

    def train(self, mode: bool = True) -> Stacked:
        super().train(mode)
        self.skeleton.train(mode)
        return self

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {name: getattr(self, _mangle(name)) for name in self.param_names}
        buffers = {name: getattr(self, _mangle(name)) for name in self.buffer_names}
        return params, buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = self._tensors()
        skeleton = self.skeleton
        if self.plain_mlp:
            return self._mlp_forward(params, x)

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor
                ) -> torch.Tensor:
            return functional_call(skeleton, (p, b), (xb,))

        return torch.vmap(one)(params, buffers, x)

    @torch.no_grad()
    def unstack(self, models: Sequence[nn.Module]) -> None:
        """Copy member k's parameters and buffers into models[k] (in place)."""
        params, buffers = self._tensors()
        for k, model in enumerate(models):
            own = dict(model.named_parameters())
            for name, value in params.items():
                own[name].copy_(value[k])
            own_buffers = dict(model.named_buffers())
            for name, value in buffers.items():
                own_buffers[name].copy_(value[k])
            model.eval()


def _is_plain_mlp(model: nn.Module) -> bool:
    """`models.build_model`'s MLP: [Normalize,] Flatten, (Linear, ReLU)*, Linear, nothing else
    (no buffers that train, no hooks)."""
    from .models import Normalize

    if not isinstance(model, nn.Sequential) or len(model) < 2:
        return False
    kinds = [type(m) for m in model]
    if kinds[0] is Normalize:
        kinds = kinds[1:]
    if not kinds or kinds[0] is not nn.Flatten or kinds[-1] is not nn.Linear:
        return False
    if model[0 if type(model[0]) is nn.Flatten else 1].start_dim != 1:
        return False
    body = kinds[1:]
    return all(kind in (nn.Linear, nn.ReLU) for kind in body) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fit_lockstep(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                 seeds: Sequence[int], **options: Any) -> list[nn.Module]:
    """Train `models` (K modules of one architecture, on x's device) in lockstep; member k uses
    seeds[k] for its data order and augmentation, as `training.fit(models[k], x, y, seed=seeds[k],
    **options)` would. x [n, ...], y [n]. Takes `fit`'s recipe options except `loss_fn` and
    `params`; `compile` and `channels_last` do not apply (vmapped convolutions), `cuda_graph` and
    `precision` do. Returns the same module objects holding their trained weights and statistics.
    """
    if len(models) != len(seeds):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds")
    stacked = Stacked(models).to(x.device)
    options = {**options, "compile": "none", "channels_last": False}
    training._train(stacked, x, y, seeds=list(seeds), stacked=True, loss_fn=None, params=None,
                    **_with_defaults(options))
    stacked.unstack(models)
    return list(models)


def _with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """`fit`'s defaults for the options not given (so both engines read a recipe alike)."""
    defaults = {"momentum": 0.9, "weight_decay": 0.0, "nesterov": True, "schedule": "cosine",
                "label_smoothing": 0.0, "drop_last": False, "crop_padding": 0,
                "padding_mode": "zeros", "flip": False, "flip_mode": "random",
                "lookahead": False, "precision": None, "channels_last": None, "compile": None,
                "cuda_graph": None}
    return {**defaults, **options}


def groups(seeds: Sequence[int], size: int) -> Iterator[list[int]]:
    """The seeds in lockstep groups of `size` (0: all in one group)."""
    size = size if size > 0 else max(1, len(seeds))
    for start in range(0, len(seeds), size):
        yield list(seeds[start : start + size])
