"""Training loops and per-sample outputs.

Two engines train the same recipe (SGD with momentum, a per-step lr schedule):
- `fit`: one model at a time; works for any model on any device. Methods use it too.
- `fit_ensemble`: many models of one architecture as one batched model (`torch.func` stacked
  weights under `vmap`). Each member keeps its own initialisation and its own data order, and the
  summed loss gives every member exactly its own gradient, so a member follows the same maths as
  `fit` with the same seed (up to float rounding in batched matmuls). On one CPU thread, 50 digits
  MLPs train about 3x faster this way than one after another (measured: 0.07 s vs 0.215 s a model).

Data: `x` is the dataset's stored form (uint8 images for CIFAR-10); the model normalises its own
input (see `models.Normalize`). Augmentation (random crop with zero padding, horizontal flip) is a
`fit` option, done as batched tensor ops on `x`'s device (`augment.py`), with random draws from the
run's seeded generator. The whole training set stays on the device: a step gathers its batch there,
and only one epoch's order and augmentation draws (a few bytes per example) cross from the CPU, once
per epoch, from pinned memory.

Speed options, for CUDA only (on CPU they are ignored, so a CPU run is plain float32 and eager):
- `precision`: fp32, or autocast to bf16 or fp16. Weights, optimizer state and BatchNorm statistics
  stay float32; fp16 uses a fixed loss scale (FP16_LOSS_SCALE). bf16 needs none.
- `channels_last`: NHWC layout for the model and each batch (faster convolutions in bf16/fp16).
- `compile`: a `torch.compile` mode, or none. The compiled module is kept on the model, so a
  worker that reuses its model (`models.fresh_model`) compiles once; `warm_up` does it outside a
  timed run. Compiling imports torch._dynamo and compiles once per batch shape (its cost is not
  measured yet: no GPU so far); set `drop_last` so that every step has the same shape.
Per-sample outputs are computed in float32 at EVAL_BATCH examples per forward pass: the metric reads
small differences between logits, which bf16 (3 significant digits) would blur.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .augment import crop_flip, draw
from .config import TrainConfig

EVAL_BATCH = 4096  # examples per forward pass when computing per-sample outputs
FP16_LOSS_SCALE = 1024.0  # precision fp16: the loss is multiplied by this, the gradients divided
# train.schedule: triangle: the lr multiplier rises linearly from START to 1 at PEAK of training,
# then falls linearly to END (airbench94's schedule).
TRIANGLE_START, TRIANGLE_PEAK, TRIANGLE_END = 0.2, 0.23, 0.07


def recipe(train: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of `fit` / `fit_ensemble` for the config's `train` section."""
    return {
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
        "nesterov": train.nesterov,
        "schedule": train.schedule,
        "label_smoothing": train.label_smoothing,
        "drop_last": train.drop_last,
        "crop_padding": train.crop_padding,
        "flip": train.flip,
        "precision": train.precision,
        "channels_last": train.channels_last,
        "compile": train.compile,
    }


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr at step 0 towards 0 at total_steps."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def scheduled_lr(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The lr of `step` out of `total_steps` under `schedule` (cosine | triangle)."""
    if schedule == "cosine":
        return cosine_lr(base_lr, step, total_steps)
    if schedule == "triangle":
        frac = step / max(1, total_steps)
        if frac < TRIANGLE_PEAK:
            mult = TRIANGLE_START + (1 - TRIANGLE_START) * frac / TRIANGLE_PEAK
        else:
            mult = 1 + (TRIANGLE_END - 1) * (frac - TRIANGLE_PEAK) / (1 - TRIANGLE_PEAK)
        return base_lr * mult
    raise ValueError(f"unknown lr schedule {schedule!r}; expected cosine or triangle")


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, the update rule of torch.optim.SGD.

    Written out because constructing any torch.optim optimizer imports torch._dynamo, about 1.6 s
    per worker process (measured), for a few lines of maths. The update runs as multi-tensor
    (`torch._foreach_*`) ops: on a GPU a handful of kernel launches per step instead of about four
    per parameter tensor (ResNet-18 has 62), which matters at batch 64.
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
    def step(self, grad_scale: float = 1.0) -> None:
        """One update; `grad_scale` multiplies the gradients first (undoes a loss scale)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        if grad_scale != 1.0:
            grads = torch._foreach_mul(grads, grad_scale)
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            old = [k for k, i in enumerate(live) if self.buffers[i] is not None]
            for k, i in enumerate(live):
                if self.buffers[i] is None:
                    self.buffers[i] = grads[k].detach().clone()
            if old:
                bufs = [self.buffers[live[k]] for k in old]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, [grads[k] for k in old])
            bufs = [self.buffers[i] for i in live]
            grads = torch._foreach_add(grads, bufs, alpha=self.momentum) if self.nesterov else bufs
        torch._foreach_add_(params, grads, alpha=-self.lr)


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _order(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """CPU -> device; through pinned memory and without waiting, when the device is a GPU."""
    if t is None or device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _forward(model: nn.Module, mode: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The model's forward: compiled (once per model object) when asked for, on CUDA only."""
    if mode == "none" or device.type != "cuda":
        return model
    # Kept in the instance dict, not as a submodule: the state dict and .to() must not see it.
    cache = model.__dict__.setdefault("_unlearn_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(model, mode=None if mode == "default" else mode)
    return cache[mode]


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: Any) -> bool:
    """Compile the model's training step now (for `compile` on CUDA), outside any timed run.

    Trains the model on a few batches of every shape a real run uses, so call it before loading the
    weights to train from. Returns True if it trained (the model's weights changed), False when
    there was nothing to compile or it was compiled already.
    """
    mode = options.get("compile", "none")
    cache = model.__dict__.get("_unlearn_compiled", {})
    if mode == "none" or not x.is_cuda or mode in cache:
        return False
    batch, n = options["batch_size"], len(y)
    # One full batch, plus the last partial batch of a real epoch when it is kept.
    size = min(n, batch + (0 if options.get("drop_last") else n % batch))
    fit(model, x[:size], y[:size], **{**options, "epochs": 1}, seed=0)
    return True


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
    nesterov: bool = True,
    schedule: str = "cosine",
    label_smoothing: float = 0.0,
    drop_last: bool = False,
    crop_padding: int = 0,
    flip: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: str = "none",
) -> nn.Module:
    """Train `model` in place on (x [n, ...], y [n]) and return it.

    The data order and the augmentation draws come from a generator seeded with `seed`, so a run is
    reproducible. `loss_fn` (model, xb, yb) -> scalar replaces the cross-entropy (and is never
    compiled); `params` restricts what is trained. lr is per step of `batch_size` examples on the
    mean loss; `schedule` is cosine or triangle (see `scheduled_lr`). `drop_last` skips each
    epoch's last partial batch (when there is at least one full batch). `crop_padding` > 0 and
    `flip` augment image batches [B, C, H, W]. `precision`, `channels_last` and `compile` act on
    CUDA only (see the module docstring).
    """
    n = len(y)
    if n == 0:
        return model
    device = x.device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its kernels once
    layout = channels_last and cuda and x.dim() == 4
    if layout and not all(p.is_contiguous(memory_format=torch.channels_last)
                          for p in model.parameters() if p.dim() == 4):
        model.to(memory_format=torch.channels_last)  # once: a reused model keeps its layout
    forward = _forward(model, compile, device) if loss_fn is None else model
    scale = FP16_LOSS_SCALE if precision == "fp16" and cuda else 1.0
    model.train()
    trainable = list(params) if params is not None else list(model.parameters())
    opt = SGD(trainable, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = _steps_per_epoch(n, batch_size, drop_last)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = _order(n, gen)
        shifts, flips = draw(n, padding=crop_padding, flip=flip, generator=gen)
        order, shifts, flips = (_to(t, device) for t in (order, shifts, flips))
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            opt.lr = scheduled_lr(schedule, lr, step, total)
            stop = start + batch_size
            idx = order[start:stop]
            xb, yb = x[idx], y[idx]
            if shifts is not None or flips is not None:
                xb = crop_flip(xb, None if shifts is None else shifts[start:stop],
                               None if flips is None else flips[start:stop], crop_padding)
            if layout:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(precision, device):
                if loss_fn is not None:
                    loss = loss_fn(model, xb, yb)
                else:
                    loss = F.cross_entropy(forward(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad()
            (loss * scale if scale != 1.0 else loss).backward()
            opt.step(grad_scale=1.0 / scale)
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
    nesterov: bool = True,
    schedule: str = "cosine",
    label_smoothing: float = 0.0,
    drop_last: bool = False,
    crop_padding: int = 0,
    flip: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: str = "none",
) -> list[nn.Module]:
    """Train M models of one architecture at once; member i uses data order seeds[i].

    models: M modules without stored buffers (see `models.supports_ensemble`); x [n, ...], y [n].
    Takes `fit`'s recipe options; `channels_last` and `compile` are ignored (vmapped MLPs).
    Returns the same module objects holding their trained weights.
    """
    from torch.func import functional_call, stack_module_state

    del channels_last, compile  # no convolutions to lay out; vmap is not compiled here
    m_count = len(models)
    n = len(y)
    params, _ = stack_module_state(list(models))
    stacked = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    skeleton = models[0]

    def forward_one(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(skeleton, p, (xb,))

    forward_all = torch.vmap(forward_one)
    opt = SGD(list(stacked.values()), lr=lr, momentum=momentum, nesterov=nesterov,
              weight_decay=weight_decay)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    steps_per_epoch = _steps_per_epoch(n, batch_size, drop_last)
    total = epochs * steps_per_epoch
    augment = crop_padding > 0 or flip
    step = 0
    for _ in range(epochs):
        orders, shifts, flips = [], [], []
        for g in gens:  # each member draws its order, then its augmentation, as `fit` does
            orders.append(_order(n, g))
            s, f = draw(n, padding=crop_padding, flip=flip, generator=g)
            shifts.append(s)
            flips.append(f)
        orders = torch.stack(orders).to(x.device)  # [M, n]
        shift_all = torch.stack(shifts).to(x.device) if crop_padding > 0 else None  # [M, n, 2]
        flip_all = torch.stack(flips).to(x.device) if flip else None  # [M, n]
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            opt.lr = scheduled_lr(schedule, lr, step, total)
            stop = start + batch_size
            idx = orders[:, start:stop]  # [M, b]
            xb = x[idx]  # [M, b, ...]
            if augment:
                xb = crop_flip(
                    xb.flatten(0, 1),
                    None if shift_all is None else shift_all[:, start:stop].flatten(0, 1),
                    None if flip_all is None else flip_all[:, start:stop].flatten(0, 1),
                    crop_padding,
                ).view(xb.shape)
            with _autocast(precision, x.device):
                logits = forward_all(stacked, xb)  # [M, b, C]
                losses = F.cross_entropy(
                    logits.flatten(0, 1), y[idx].flatten(), reduction="none",
                    label_smoothing=label_smoothing,
                ).view(m_count, -1)
                # Sum of per-member means: each member's gradient is its own mean-loss gradient.
                loss = losses.float().mean(dim=1).sum()
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
