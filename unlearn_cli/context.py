"""What a worker needs for an experiment's jobs, built once per worker process and run.

Shared by `train_refs` and `apply`: the config, the split, the dataset on the device and the model
spec, all from the job's payload and the run's shared inputs, never from the store: workers do not
read or write the store (they may run on another node). `finish_model` turns a trained model into
a `Trained` result (state dict + per-sample outputs); the driver writes it with `store_trained`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config, from_mapping
from .data import load_dataset
from .errors import MethodError
from .store import Store, describe_model, hash_split, now, outputs_problem, versions
from .training import per_sample_outputs


@dataclasses.dataclass(frozen=True)
class Context:
    cfg: Config
    split: dict[str, np.ndarray]
    split_hash: str
    x: torch.Tensor  # the whole dataset on `device`
    y: torch.Tensor
    spec: dict[str, Any]  # rebuilds the model
    num_classes: int
    device: torch.device

    def subset(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.split[name], device=self.device)
        return self.x[idx], self.y[idx]


def dataset_arrays(data: dict[str, Any], cache_dir: str | None = None) -> dict[str, Any]:
    """The dataset of a config's data section as numpy arrays, ready for `launch.Lazy`.

    Local workers call this themselves (same machine, same files); the Ray backend calls it once
    in the driver and ships the result through the object store, once per node. cache_dir: the
    store's data folder (imagefolder's decoded images).
    """
    dataset = load_dataset(from_mapping({"data": data}).data, cache_dir)
    return {"x": dataset.x.numpy(), "y": dataset.y.numpy(), "num_classes": dataset.num_classes}


_CONTEXTS: dict[tuple[int, str], tuple[Any, Context]] = {}  # (id(shared), device) -> context


def context(payload: dict[str, Any], device: str, shared: dict[str, Any]) -> Context:
    """The context for a job: `payload["config"]` (a resolved dict) and the run's shared inputs.

    shared holds `split` (index arrays, as stored), `dataset` (as `dataset_arrays` returns it) and
    `spec`, the model spec the experiment recorded (a plugin model's file, found from any folder).
    Built once per worker and run (the shared dict is the same object for every job of a run), so
    the data is copied to the device once, not once per job.
    """
    key = (id(shared), device)
    if key in _CONTEXTS:
        return _CONTEXTS[key][1]
    cfg = from_mapping(payload["config"])
    split = {k: np.asarray(v) for k, v in shared["split"].items()}
    data = shared["dataset"]
    dev = torch.device(device)
    # np.array copies: arrays from Ray's object store are read-only views of shared memory.
    x = torch.from_numpy(np.array(data["x"])).to(dev)
    y = torch.from_numpy(np.array(data["y"])).to(dev)
    ctx = Context(
        cfg=cfg,
        split=split,
        split_hash=hash_split(split),
        x=x,
        y=y,
        spec=dict(shared["spec"]),
        num_classes=data["num_classes"],
        device=dev,
    )
    _CONTEXTS.clear()  # one run at a time per worker: drop the previous run's data
    _CONTEXTS[key] = (shared, ctx)  # holds `shared`, so its id cannot be reused meanwhile
    return ctx


def provenance(ctx: Context, kind: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "seed": int(seed),
        "config_hash": ctx.cfg.identity_hash(),
        "split_hash": ctx.split_hash,
        "device": str(ctx.device),
        "versions": versions(),
        "created": now(),
        **extra,
    }


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished model as a worker hands it to the driver, which alone writes the store."""

    kind: str
    seed: int | None  # None for the original model
    method: str | None
    state_dict: dict[str, Any]  # on the CPU
    outputs: dict[str, np.ndarray]  # per-sample outputs (see training.per_sample_outputs)
    meta: dict[str, Any]  # provenance
    model_spec: dict[str, Any]


def finish_model(ctx: Context, kind: str, seed: int | None, model: nn.Module,
                 meta: dict[str, Any], *, method: str | None = None) -> Trained:
    """A finished model with its per-sample outputs, ready to be stored by the driver.

    A model whose outputs are not finite (it diverged) is refused here, in the worker: stored, it
    would make `score` fail for every method of the store.
    """
    outputs = per_sample_outputs(model, ctx.x, ctx.y, ctx.split, tta=ctx.cfg.train.tta)
    if not all(np.isfinite(outputs[k]).all() for k in ("forget_logits", "test_logits")):
        who = f"method {method!r}" if method else f"{kind} training"
        raise MethodError(
            f"{who} diverged at seed {seed}: its outputs contain NaN or infinity; lower the "
            "learning rate (or fix the method) and rerun"
        )
    problem = outputs_problem(outputs, ctx.split, ctx.num_classes)
    if problem:  # e.g. a plugin model with 20 outputs for 10 classes
        raise MethodError(
            f"{describe_model(kind, seed, method)}: its outputs do not fit the experiment "
            f"({problem}); nothing was stored for it: fix the model or method (one output per "
            "class) and rerun"
        )
    # A copy, never a view: a worker reuses one module per spec (models.fresh_model), so the next
    # model trained would otherwise overwrite this one's weights before it is stored.
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return Trained(kind, seed, method, state, outputs, meta, ctx.spec)


def store_trained(store: Store, trained: Trained) -> bool:
    """Write a finished model in the driver: checkpoint first, then its outputs (which mark it
    done). Returns False, writing nothing, if it is already stored (a retried job made it again).
    """
    t = trained
    if store.is_done(t.kind, t.seed, t.method):
        return False
    store.save_model(t.kind, t.seed, t.state_dict, t.meta, method=t.method,
                     model_spec=t.model_spec)
    store.save_outputs(t.kind, t.seed, t.outputs, t.meta, method=t.method)
    return True


def gpu_workers(slots: list[Any]) -> int:
    """The most worker slots that share one GPU (1 on CPU): for the payloads' timing labels."""
    counts: dict[int, int] = {}
    per_gpu: dict[int, int] = {}  # how many jobs a GPU takes at once: 1 / the share one asks for
    for slot in slots:
        if slot.gpu >= 0:
            counts[slot.gpu] = counts.get(slot.gpu, 0) + 1
            if slot.gpu_share > 0:
                per_gpu[slot.gpu] = round(1 / slot.gpu_share)
    # Ray numbers every slot's GPU 0 (the scheduler picks the device), so the count alone would
    # call 4 GPUs of one worker each "shared": the share bounds it.
    return max((min(n, per_gpu.get(g, n)) for g, n in counts.items()), default=1)


def mps_active() -> bool:
    """Whether an NVIDIA MPS control daemon is reachable (its pipe directory has a control pipe):
    then processes on one GPU run kernels concurrently instead of taking turns."""
    import os

    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def timing(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """How a model's wall time was measured, for its metadata (`score` reads `timing`).

    sequential: the model had its device to itself (as far as this run's workers go). shared-gpu:
    `gpu_workers` worker processes were running on the same GPU, taking turns without MPS
    (`mps` false) or overlapping with it: that wall time is not a model's time alone.
    """
    sharing = int(payload.get("gpu_workers", 1))
    if ctx.device.type != "cuda" or sharing <= 1:
        return {"timing": "sequential"}
    return {"timing": "shared-gpu", "gpu_workers": sharing, "mps": mps_active()}


class Stopwatch:
    """Wall seconds of a block, synchronising the GPU so that queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
