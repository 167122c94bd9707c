"""Training loops and per-sample outputs.

Two engines train the same recipe (SGD, Nesterov momentum, cosine schedule to zero, per-step lr):
- `fit`: one model at a time; works for any model on any device. Methods use it too.
- `fit_ensemble`: many models of one architecture as one batched model (`torch.func` stacked
  weights under `vmap`). Each member keeps its own initialisation and its own data order, and the
  summed loss gives every member exactly its own gradient, so a member follows the same maths as
  `fit` with the same seed (up to float rounding in batched matmuls). On one CPU thread, 50 digits
  MLPs train about 3x faster this way than one after another (measured: 0.07 s vs 0.215 s a model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import TrainConfig

EVAL_BATCH = 4096  # examples per forward pass when computing per-sample outputs


def recipe(train: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of `fit` / `fit_ensemble` for the config's `train` section."""
    return {
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
    }


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr at step 0 towards 0 at total_steps."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, the update rule of torch.optim.SGD.

    Written out because constructing any torch.optim optimizer imports torch._dynamo, about 1.6 s
    per worker process (measured), for a few lines of maths.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, momentum: float,
                 weight_decay: float, nesterov: bool):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov = nesterov and momentum > 0
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(grad, alpha=-self.lr)


def _order(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Train `model` in place on (x [n, ...], y [n]) and return it.

    The data order comes from a generator seeded with `seed`, so a run is reproducible. `loss_fn`
    (model, xb, yb) -> scalar replaces the cross-entropy; `params` restricts what is trained.
    """
    n = len(y)
    if n == 0:
        return model
    model.train()
    trainable = list(params) if params is not None else list(model.parameters())
    opt = SGD(trainable, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = _order(n, gen).to(x.device)
        for start in range(0, n, batch_size):
            opt.lr = cosine_lr(lr, step, total)
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return model


def fit_ensemble(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> list[nn.Module]:
    """Train M models of one architecture at once; member i uses data order seeds[i].

    models: M modules without buffers (see `models.supports_ensemble`); x [n, ...], y [n].
    Returns the same module objects holding their trained weights.
    """
    from torch.func import functional_call, stack_module_state

    m_count = len(models)
    n = len(y)
    params, _ = stack_module_state(list(models))
    stacked = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    skeleton = models[0]

    def forward_one(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, p, (xb,))

    forward_all = torch.vmap(forward_one)
    opt = SGD(list(stacked.values()), lr=lr, momentum=momentum, nesterov=True,
              weight_decay=weight_decay)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        orders = torch.stack([_order(n, g) for g in gens]).to(x.device)  # [M, n]
        for start in range(0, n, batch_size):
            opt.lr = cosine_lr(lr, step, total)
            idx = orders[:, start : start + batch_size]  # [M, b]
            logits = forward_all(stacked, x[idx])  # [M, b, C]
            losses = F.cross_entropy(
                logits.flatten(0, 1), y[idx].flatten(), reduction="none"
            ).view(m_count, -1)
            # Sum of per-member means: each member's gradient is its own mean-loss gradient.
            loss = losses.mean(dim=1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, param in model.named_parameters():
                param.copy_(stacked[name][i])
            model.eval()
    return list(models)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    parts = [model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def per_sample_outputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, split: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What `score` needs from one model, computed right after training.

    x [num_examples, ...], y [num_examples] on the model's device; split: index arrays.
    Returns float32 `forget_logits` [F, C], `test_logits` [T, C], `retain_loss` [R] (cross-entropy)
    and bool `retain_correct` [R].
    """
    out = {}
    for name in ("forget", "test"):
        idx = torch.as_tensor(split[name], device=x.device)
        out[f"{name}_logits"] = _logits(model, x[idx]).float().cpu().numpy()
    idx = torch.as_tensor(split["retain"], device=x.device)
    logits = _logits(model, x[idx]).float()
    out["retain_loss"] = F.cross_entropy(logits, y[idx], reduction="none").cpu().numpy()
    out["retain_correct"] = (logits.argmax(dim=1) == y[idx]).cpu().numpy()
    return out
