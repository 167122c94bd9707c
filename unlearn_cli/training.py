"""Training loops and per-sample outputs.

Two engines train the same recipe (SGD with momentum, a per-step lr schedule), on one code path
(`_train`):
- `fit`: one model at a time; works for any model on any device. Methods use it too.
- `fit_ensemble` (`lockstep.py`): K models of one architecture in lockstep, as one module with
  stacked parameters and BatchNorm statistics under `vmap`. Each member keeps its own
  initialisation, data order and augmentation, and the summed loss gives every member exactly its
  own gradient, so a member follows the same maths as `fit` with the same seed (up to float
  rounding in batched kernels). On one CPU thread, 50 digits MLPs train about 3x faster this way
  than one after another (measured: 0.07 s vs 0.215 s a model).

Data: `x` is the dataset's stored form (uint8 images for CIFAR-10); the model normalises its own
input (see `models.Normalize`). Augmentation (random crop after zero or reflect padding, random or
alternating flips; `augment.py`) runs as batched tensor ops on `x`'s device, with random draws
from the run's seeded generator. The whole training set stays on the device: a step gathers its
batch there, and only one epoch's order and augmentation draws (a few bytes per example) cross
from the CPU, once per epoch, from pinned memory. `lookahead` is airbench94's: from epoch
LOOKAHEAD_START_EPOCH on, every LOOKAHEAD_EVERY steps the weights (and BatchNorm statistics) are
pulled into a slow average that they are then reset to, and at each epoch's end to the average.

Speed options, for CUDA only (on CPU they are ignored, so a CPU run is plain float32 and eager).
`fit` takes them as arguments; left unset (None) they come from `speed_options`, which `apply`
sets to the experiment's `train` section around every unlearning run, so methods train with the
settings of the reference models they are timed against:
- `precision`: fp32, or autocast to bf16 or fp16. Weights, optimizer state and BatchNorm statistics
  stay float32. fp16 uses a dynamic loss scale (`LossScaler`, torch.amp.GradScaler's rule): a step
  whose gradients hold an inf or NaN is skipped and the scale halved. bf16 needs none.
- `channels_last`: NHWC layout for the model and each batch (faster convolutions in bf16/fp16).
- `compile`: a `torch.compile` mode, or none. One compiled function per process and mode, with
  `dynamic=False` (one static graph per batch shape), that takes the module as an argument: it
  holds no reference to any model (no cycle keeps a model alive), and a worker's next model of
  the same architecture reuses its graphs without recompiling (Dynamo treats the weights as
  inputs). `warm_up` compiles outside any timed run.
- `cuda_graph`: capture the whole training step (batch gather, augmentation, forward, backward,
  SGD update, learning rate as a device tensor) as one CUDA graph after GRAPH_EAGER_STEPS eager
  steps of the same run, then replay it: one launch per step instead of hundreds. A kept last
  partial batch runs eagerly; fp16 (whose loss scale needs a host decision), a custom `loss_fn`,
  or a failed capture fall back to eager steps (the fallback is recorded in `last_run`).
cuDNN autotuning (`cudnn.benchmark`) times kernels the first time it sees a shape; `warm_up` runs a
few untimed steps of every shape a run uses. Per-sample outputs are computed in float32 with TF32
off (cuDNN and matmul), EVAL_BATCH examples per forward pass: the metric reads small differences
between logits, which bf16 (3 significant digits) or TF32 (10-bit mantissa) would blur; with `tta`
they are averaged over test-time views (see `per_sample_outputs`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .augment import Augmenter, crop_flip, translate
from .config import TrainConfig

EVAL_BATCH = 4096  # examples per forward pass when computing per-sample outputs
# train.schedule: triangle: the lr multiplier rises linearly from START to 1 at PEAK of training,
# then falls linearly to END (airbench94's schedule).
TRIANGLE_START, TRIANGLE_PEAK, TRIANGLE_END = 0.2, 0.23, 0.07
# train.lookahead (airbench94): from this epoch, every LOOKAHEAD_EVERY steps, with decay
# LOOKAHEAD_BASE ** LOOKAHEAD_EVERY * (step / total) ** LOOKAHEAD_POWER.
LOOKAHEAD_START_EPOCH, LOOKAHEAD_EVERY, LOOKAHEAD_BASE, LOOKAHEAD_POWER = 3, 5, 0.95, 3.0
# precision fp16: torch.amp.GradScaler's defaults (initial scale, growth after so many finite
# steps, factors).
LOSS_SCALE_INIT, LOSS_SCALE_GROWTH_INTERVAL = 2.0**16, 2000
LOSS_SCALE_GROWTH, LOSS_SCALE_BACKOFF = 2.0, 0.5
GRAPH_EAGER_STEPS = 3  # train.cuda_graph: real steps run eagerly before capture (state, autotune)
WARM_UP_STEPS = 2  # warm_up / warming(): full-batch steps per run (plus a kept partial batch)
TTA_MODES = ("none", "flip", "flip-translate")
# Devices on which the speed options act. Tests add "cpu" to run those code paths on a CPU.
SPEED_DEVICES: tuple[str, ...] = ("cuda",)
COMPILE_BACKEND = "inductor"  # torch.compile's backend; tests use "eager" (no C++ toolchain run)

_SPEED_DEFAULTS = {"precision": "fp32", "channels_last": False, "compile": "none",
                   "cuda_graph": False}
_SPEED: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "unlearn_speed", default=_SPEED_DEFAULTS)
_WARMING: contextvars.ContextVar[bool] = contextvars.ContextVar("unlearn_warming", default=False)
# What the last `_train` call in this process did (engine path, skipped steps): for tests, benches.
last_run: dict[str, Any] = {}


def speed_of(train: TrainConfig) -> dict[str, Any]:
    """The speed options of a `train` section (see the module docstring)."""
    return {"precision": train.precision, "channels_last": train.channels_last,
            "compile": train.compile, "cuda_graph": train.cuda_graph}


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
        "padding_mode": train.padding_mode,
        "flip": train.flip,
        "flip_mode": train.flip_mode,
        "lookahead": train.lookahead,
        **speed_of(train),
    }


@contextlib.contextmanager
def speed_options(**options: Any) -> Iterator[None]:
    """Within the block, `fit` calls that leave a speed option unset use these values.

    options: precision, channels_last, compile, cuda_graph (unknown keys are an error).
    """
    unknown = set(options) - set(_SPEED_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown speed options {sorted(unknown)}; "
                        f"expected {list(_SPEED_DEFAULTS)}")
    token = _SPEED.set({**_SPEED.get(), **options})
    try:
        yield
    finally:
        _SPEED.reset(token)


@contextlib.contextmanager
def warming() -> Iterator[None]:
    """Within the block, `fit` trains one epoch of at most WARM_UP_STEPS full batches (plus the
    last partial batch when it is kept): every shape of the real run, at a fraction of its cost.
    For untimed warm-up runs (cuDNN autotuning, compilation); the weights it leaves are junk."""
    token = _WARMING.set(True)
    try:
        yield
    finally:
        _WARMING.reset(token)


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
    per parameter tensor (ResNet-18 has 62), which matters at batch 64. `lr` is a float, or a
    0-d tensor on the parameters' device (read by the kernels, so a captured CUDA graph sees each
    step's value).
    """

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float | torch.Tensor,
                 momentum: float, weight_decay: float, nesterov: bool):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov = nesterov and momentum > 0
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' current gradients (already unscaled)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
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
        if isinstance(self.lr, torch.Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr))
        else:
            torch._foreach_add_(params, grads, alpha=-self.lr)


class LossScaler:
    """A dynamic loss scale for fp16 autocast, with torch.amp.GradScaler's rule.

    The loss is multiplied by `scale` before backward; `unscale` divides the gradients in place and
    sets `found_inf` when any is inf or NaN; the caller then skips the update, and `update` halves
    the scale (or doubles it after LOSS_SCALE_GROWTH_INTERVAL finite steps in a row). The scale
    lives on the device, so nothing but the skip decision waits for the GPU.
    """

    def __init__(self, device: torch.device, init: float = LOSS_SCALE_INIT):
        self.scale = torch.full((1,), init, dtype=torch.float32, device=device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self._growth = torch.zeros(1, dtype=torch.int32, device=device)

    def unscale(self, grads: list[torch.Tensor]) -> None:
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf,
                                                          self.scale.double().reciprocal().float())

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self._growth, self.found_inf, LOSS_SCALE_GROWTH,
                                 LOSS_SCALE_BACKOFF, LOSS_SCALE_GROWTH_INTERVAL)


def _speed_device(device: torch.device) -> bool:
    return device.type in SPEED_DEVICES


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """CPU -> device; through pinned memory and without waiting, when the device is a GPU."""
    if t is None or device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _autocast(precision: str, device: torch.device, *, cache: bool = True
              ) -> contextlib.AbstractContextManager:
    """Autocast for `precision` on a speed device; `cache` False under CUDA graph capture (the
    cast-weight cache would pin capture-time casts)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    if precision == "fp32" or not _speed_device(device):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The experiment's autocast for a method's own training loop (see `speed_options`)."""
    return _autocast(_SPEED.get()["precision"], torch.device(device))


def _call_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


_COMPILED: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def _forward(model: nn.Module, mode: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The model's forward: compiled when asked for, on a speed device only.

    The compiled function is per process and mode and takes the module as an argument, so it holds
    no model alive, and models of one architecture share its graphs (see the module docstring).
    """
    if mode == "none" or not _speed_device(device):
        return model
    key = (mode, COMPILE_BACKEND)
    if key not in _COMPILED:
        kwargs: dict[str, Any] = {"dynamic": False, "backend": COMPILE_BACKEND}
        if COMPILE_BACKEND == "inductor" and mode != "default":
            kwargs["mode"] = mode
        _COMPILED[key] = torch.compile(_call_module, **kwargs)
    return functools.partial(_COMPILED[key], model)


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: Any) -> bool:
    """Run a few untimed training steps of every shape a real run of `fit(model, x, y, **options)`
    uses: cuDNN autotuning and (with `compile`) compilation happen here, not in a timed run.

    Trains `model` (its weights are junk afterwards: load the weights to train from after this).
    Returns True if it trained; False on a device without speed options or autotuning (CPU), or
    when this model was warmed up for these shapes and options already.
    """
    if not _speed_device(x.device):
        return False
    n, batch = len(y), options["batch_size"]
    speed = {**_SPEED.get(), **{k: v for k, v in options.items()
                                if k in _SPEED_DEFAULTS and v is not None}}
    key = (tuple(x.shape[1:]), n % batch if not options.get("drop_last") else 0,
           min(n, batch), tuple(sorted(speed.items())))
    done = model.__dict__.setdefault("_unlearn_warmed", set())  # plain tuples: no cycle
    if key in done:
        return False
    with warming():
        fit(model, x, y, seed=0, **{**options, "epochs": 1})
    done.add(key)
    return True


_WARMED_RUNS: set[Any] = set()


def warm_up_method(run: Callable[[], Any], device: torch.device | str, *, key: Any) -> bool:
    """Call `run` (one unlearning run, result discarded) once untimed under `warming()`, on a speed
    device, once per process and `key`: the shapes of the method's `fit` calls get autotuned (and
    compiled) before its first timed run. Methods with a training loop of their own run it in full
    here. An error is left to the timed runs to report. Returns True if it ran."""
    if not _speed_device(torch.device(device)) or key in _WARMED_RUNS:
        return False
    _WARMED_RUNS.add(key)
    with warming():
        try:
            run()
        except Exception:  # noqa: BLE001 - the timed run of the same seed reports it
            pass
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
    padding_mode: str = "zeros",
    flip: bool = False,
    flip_mode: str = "random",
    lookahead: bool = False,
    precision: str | None = None,
    channels_last: bool | None = None,
    compile: str | None = None,
    cuda_graph: bool | None = None,
) -> nn.Module:
    """Train `model` in place on (x [n, ...], y [n]) and return it.

    The data order and the augmentation draws come from a generator seeded with `seed`, so a run is
    reproducible. `loss_fn` (model, xb, yb) -> scalar replaces the cross-entropy (and is never
    compiled or captured); `params` restricts what is trained. lr is per step of `batch_size`
    examples on the mean loss; `schedule` is cosine or triangle (see `scheduled_lr`). `drop_last`
    skips each epoch's last partial batch (when there is at least one full batch). `crop_padding`
    > 0 (with `padding_mode` zeros | reflect) and `flip` (with `flip_mode` random | alternate)
    augment image batches [B, C, H, W]; `lookahead` see the module docstring. The speed options
    act on CUDA only; None means the value set by `speed_options` (by default fp32, NCHW, eager).
    """
    return _train(model, x, y, seeds=[seed], stacked=False, epochs=epochs, batch_size=batch_size,
                  lr=lr, momentum=momentum, weight_decay=weight_decay, loss_fn=loss_fn,
                  params=params, nesterov=nesterov, schedule=schedule,
                  label_smoothing=label_smoothing, drop_last=drop_last,
                  crop_padding=crop_padding, padding_mode=padding_mode, flip=flip,
                  flip_mode=flip_mode, lookahead=lookahead, precision=precision,
                  channels_last=channels_last, compile=compile, cuda_graph=cuda_graph)


def fit_ensemble(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                 seeds: Sequence[int], **options: Any) -> list[nn.Module]:
    """Train models of one architecture in lockstep (see `lockstep.fit_lockstep`)."""
    from .lockstep import fit_lockstep

    return fit_lockstep(models, x, y, seeds=seeds, **options)


class _Lookahead:
    """airbench94's lookahead on every float tensor of the state dict (weights, BN statistics)."""

    def __init__(self, model: nn.Module):
        self.live = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """slow <- slow + (1 - decay) (weights - slow); weights <- slow."""
        if decay < 1.0:
            torch._foreach_lerp_(self.slow, self.live, 1.0 - decay)
        torch._foreach_copy_(self.live, self.slow)


class _Replay:
    """A captured training step: a CUDA graph on CUDA; on other devices (tests) the step function
    itself, called at each replay, so the static-buffer plumbing can be checked on a CPU."""

    def __init__(self, step: Callable[[], None], device: torch.device):
        self.graph = None
        self.step = step
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            self.graph = graph

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seeds: Sequence[int],
           stacked: bool, epochs: int, batch_size: int, lr: float, momentum: float,
           weight_decay: float, loss_fn: Callable[..., torch.Tensor] | None,
           params: Sequence[torch.Tensor] | None, nesterov: bool, schedule: str,
           label_smoothing: float, drop_last: bool, crop_padding: int, padding_mode: str,
           flip: bool, flip_mode: str, lookahead: bool, precision: str | None,
           channels_last: bool | None, compile: str | None, cuda_graph: bool | None
           ) -> nn.Module:
    """The training loop of `fit` (stacked False, one seed) and of `lockstep.fit_lockstep`
    (stacked True: `model` maps [K, B, ...] to [K, B, C], member k draws from seeds[k])."""
    n = len(y)
    last_run.clear()
    if n == 0:
        return model
    ambient = _SPEED.get()
    precision = ambient["precision"] if precision is None else precision
    channels_last = ambient["channels_last"] if channels_last is None else channels_last
    compile = ambient["compile"] if compile is None else compile
    cuda_graph = ambient["cuda_graph"] if cuda_graph is None else cuda_graph
    device = x.device
    fast = _speed_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its kernels once
    layout = channels_last and fast and x.dim() == 4
    if layout and not stacked and not all(
            p.is_contiguous(memory_format=torch.channels_last)
            for p in model.parameters() if p.dim() == 4):
        model.to(memory_format=torch.channels_last)  # once: a reused model keeps its layout
    forward = _forward(model, compile, device) if loss_fn is None and not stacked else model
    scaler = LossScaler(device) if precision == "fp16" and fast else None
    graph_ok = cuda_graph and fast and loss_fn is None and scaler is None
    last_run.update(precision=precision if fast else "fp32", compile=compile if fast else "none",
                    cuda_graph=bool(graph_ok), graph_fallback=None, skipped_steps=0, steps=0)
    if cuda_graph and fast and not graph_ok:
        last_run["graph_fallback"] = ("fp16 loss scaling" if scaler is not None
                                      else "custom loss_fn")
    model.train()
    trainable = list(params) if params is not None else [
        p for p in model.parameters() if p.requires_grad]
    lr_now: float | torch.Tensor = (torch.zeros((), device=device) if graph_ok else lr)
    opt = SGD(trainable, lr=lr_now, momentum=momentum, nesterov=nesterov,
              weight_decay=weight_decay)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    augs = [Augmenter(n, padding=crop_padding, flip=flip, flip_mode=flip_mode) for _ in seeds]
    steps_per_epoch = _steps_per_epoch(n, batch_size, drop_last)
    total = epochs * steps_per_epoch
    warming_up = _WARMING.get()
    if warming_up:
        epochs = 1
    slow: _Lookahead | None = None
    replay: _Replay | None = None
    static: dict[str, torch.Tensor] = {}
    side = torch.cuda.Stream(device) if graph_ok and device.type == "cuda" else None

    def batch_of(idx: torch.Tensor, shift: torch.Tensor | None, flips: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """idx [B] (or [K, B] stacked) -> augmented images and labels."""
        if stacked:  # one flat gather for all members: cheaper than advanced indexing by [K, B]
            flat_idx = idx.reshape(-1)
            xb = x.index_select(0, flat_idx).view(*idx.shape, *x.shape[1:])
            yb = y.index_select(0, flat_idx).view(idx.shape)
        else:
            xb, yb = x[idx], y[idx]
        if shift is not None or flips is not None:
            flat = crop_flip(xb.flatten(0, 1) if stacked else xb,
                             None if shift is None else shift.reshape(-1, 2),
                             None if flips is None else flips.reshape(-1),
                             crop_padding, padding_mode)
            xb = flat.view(xb.shape) if stacked else flat
        if layout and not stacked:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with _autocast(precision, device, cache=not graph_ok):
            if loss_fn is not None:
                return loss_fn(model, xb, yb)
            out = forward(xb)
            if not stacked:
                return F.cross_entropy(out, yb, label_smoothing=label_smoothing)
            # Sum of per-member means: each member's gradient is its own mean-loss gradient.
            losses = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none",
                                     label_smoothing=label_smoothing)
            return losses.float().view(yb.shape).mean(dim=1).sum()

    def eager_step(idx: torch.Tensor, shift: torch.Tensor | None, flips: torch.Tensor | None
                   ) -> None:
        loss = loss_of(*batch_of(idx, shift, flips))
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
            return
        (loss.float() * scaler.scale[0]).backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        scaler.unscale(grads)
        if scaler.found_inf.item() == 0:  # the skip decision: one host sync per fp16 step
            opt.step()
        else:
            last_run["skipped_steps"] += 1
        scaler.update()

    def graph_step() -> None:
        # Gradients are None here: under capture backward allocates them from the graph's pool,
        # and every replay writes (never accumulates) them.
        opt.zero_grad()
        loss = loss_of(*batch_of(static["idx"], static.get("shift"), static.get("flips")))
        loss.backward()
        opt.step()

    step = 0
    for epoch in range(epochs):
        orders, shifts, flips = [], [], []
        for gen, aug in zip(gens, augs):  # each member draws its order, then its augmentation
            order = torch.randperm(n, generator=gen)
            s, f = aug.draw(order, gen)
            orders.append(order)
            shifts.append(s)
            flips.append(f)
        if stacked:
            order_t = _to(torch.stack(orders), device)  # [K, n]
            shift_t = _to(torch.stack(shifts), device) if crop_padding > 0 else None
            flip_t = _to(torch.stack(flips), device) if flip else None
        else:
            order_t, shift_t, flip_t = (_to(t, device) for t in (orders[0], shifts[0], flips[0]))
        starts = list(range(0, steps_per_epoch * batch_size, batch_size))
        if warming_up:
            starts = starts[:WARM_UP_STEPS] + ([starts[-1]] if len(starts) > WARM_UP_STEPS
                                               and n % batch_size and not drop_last else [])
        for start in starts:
            value = scheduled_lr(schedule, lr, step, total)
            sl = slice(start, start + batch_size)
            idx = order_t[..., sl]
            sh = None if shift_t is None else shift_t[..., sl, :]
            fl = None if flip_t is None else flip_t[..., sl]
            full = idx.shape[-1] == batch_size
            if graph_ok and full and step >= GRAPH_EAGER_STEPS and replay is None:
                static.update(idx=idx.clone())
                if sh is not None:
                    static["shift"] = sh.clone()
                if fl is not None:
                    static["flips"] = fl.clone()
                try:
                    replay = _Replay(graph_step, device)
                except Exception as exc:  # noqa: BLE001 - any capture failure: go on eagerly
                    warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                                  "training eagerly", RuntimeWarning, stacklevel=2)
                    last_run.update(cuda_graph=False, graph_fallback=f"capture failed: {exc}")
                    graph_ok = False
                    opt.lr = value  # back to a float learning rate
            if replay is not None and full:
                static["idx"].copy_(idx)
                if sh is not None:
                    static["shift"].copy_(sh)
                if fl is not None:
                    static["flips"].copy_(fl)
                opt.lr.fill_(value)
                replay.replay()
            else:
                if isinstance(opt.lr, torch.Tensor):
                    opt.lr.fill_(value)
                else:
                    opt.lr = value
                # Before a capture, eager steps run on a side stream (CUDA's rule for warm-up).
                use_side = side is not None and replay is None
                if use_side:
                    side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side) if use_side else contextlib.nullcontext():
                    eager_step(idx, sh, fl)
                if use_side:
                    torch.cuda.current_stream(device).wait_stream(side)
            step += 1
            if lookahead and epoch >= LOOKAHEAD_START_EPOCH and step % LOOKAHEAD_EVERY == 0:
                if slow is None:
                    slow = _Lookahead(model)
                else:
                    decay = LOOKAHEAD_BASE**LOOKAHEAD_EVERY * (step / total) ** LOOKAHEAD_POWER
                    slow.update(decay)
        if slow is not None:
            slow.update(1.0)  # each epoch ends on the slow weights
    last_run["steps"] = step
    model.eval()
    return model


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    parts = [model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(parts).float() if parts else torch.empty(0)


def _tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits averaged over test-time views (airbench94's weights).

    flip: 1/2 (x) + 1/2 (x mirrored). flip-translate: 1/2 flip(x) + 1/4 flip(x moved one pixel up
    and left) + 1/4 flip(x moved one pixel down and right), reflecting at the border: 6 views.
    x [n, C, H, W] raw images; returns float32 [n, classes].
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; expected one of {TTA_MODES}")
    if tta == "none":
        return _logits(model, x)

    def mirror(images: torch.Tensor) -> torch.Tensor:
        return 0.5 * _logits(model, images) + 0.5 * _logits(model, images.flip(-1))

    if tta == "flip":
        return mirror(x)
    return 0.5 * mirror(x) + 0.25 * mirror(translate(x, -1, -1)) + 0.25 * mirror(
        translate(x, 1, 1))


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions within the block; the settings are restored."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@torch.no_grad()
def per_sample_outputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, split: dict[str, np.ndarray], *,
    tta: str = "none",
) -> dict[str, np.ndarray]:
    """What `score` needs from one model, computed right after training.

    x [num_examples, ...], y [num_examples] on the model's device; split: index arrays; tta: none,
    flip or flip-translate (`train.tta`): with tta every output below is read from the averaged
    logits of the test-time views, for every model of an experiment alike.
    Returns float32 `forget_logits` [F, C], `test_logits` [T, C], `retain_loss` [R] (cross-entropy)
    and bool `retain_correct` [R]. Computed in float32 with TF32 off.
    """
    out = {}
    with exact_float32():
        for name in ("forget", "test"):
            idx = torch.as_tensor(split[name], device=x.device)
            out[f"{name}_logits"] = _tta_logits(model, x[idx], tta).cpu().numpy()
        idx = torch.as_tensor(split["retain"], device=x.device)
        logits = _tta_logits(model, x[idx], tta)
    out["retain_loss"] = F.cross_entropy(logits, y[idx], reduction="none").cpu().numpy()
    out["retain_correct"] = (logits.argmax(dim=1) == y[idx]).cpu().numpy()
    return out
