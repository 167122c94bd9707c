"""What a worker needs for an experiment's jobs, built once per worker process and reused.

Shared by `train_refs` and `apply`: the config, the store, the split, the dataset on the device, the
model spec, and `save_trained`, which computes a model's per-sample outputs and stores both files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config, from_mapping
from .data import load_dataset
from .errors import MethodError
from .models import model_spec
from .store import Store, hash_split, now, versions
from .training import per_sample_outputs


@dataclasses.dataclass(frozen=True)
class Context:
    cfg: Config
    store: Store
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


@functools.lru_cache(maxsize=2)
def _context(store_root: str, cfg_json: str, device: str) -> Context:
    cfg = from_mapping(json.loads(cfg_json))
    store = Store(store_root)
    split = store.load_split()
    dataset = load_dataset(cfg.data, str(store.root / "data"))
    # The spec the experiment recorded (a plugin model's file, found from any folder); stores
    # made before it was recorded: built from the config, as then.
    spec = store.read_experiment().get("model_spec") or model_spec(
        cfg.model, dataset.input_shape, dataset.num_classes, mean=dataset.mean, std=dataset.std)
    dev = torch.device(device)
    return Context(
        cfg=cfg,
        store=store,
        split=split,
        split_hash=hash_split(split),
        x=dataset.x.to(dev),
        y=dataset.y.to(dev),
        spec=spec,
        num_classes=dataset.num_classes,
        device=dev,
    )


def context(payload: dict[str, Any], device: str) -> Context:
    """The context for a job payload holding `store` (a path) and `config` (a resolved dict)."""
    return _context(payload["store"], json.dumps(payload["config"], sort_keys=True), device)


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


def save_trained(ctx: Context, kind: str, seed: int, model: nn.Module, meta: dict[str, Any],
                 *, method: str | None = None) -> None:
    """Store a finished model: checkpoint first, then its outputs (which mark it done).

    A model whose outputs are not finite (it diverged) is refused before anything is written:
    stored, it would make `score` fail for every method of the store.
    """
    outputs = per_sample_outputs(model, ctx.x, ctx.y, ctx.split, tta=ctx.cfg.train.tta)
    if not all(np.isfinite(outputs[k]).all() for k in ("forget_logits", "test_logits")):
        who = f"method {method!r}" if method else f"{kind} training"
        raise MethodError(
            f"{who} diverged at seed {seed}: its outputs contain NaN or infinity; lower the "
            "learning rate (or fix the method) and rerun"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ctx.store.save_model(kind, seed, state, meta, method=method, model_spec=ctx.spec)
    ctx.store.save_outputs(kind, seed, outputs, meta, method=method)


def gpu_workers(slots: list[Any]) -> int:
    """The most worker slots that share one GPU (1 on CPU): for the payloads' timing labels."""
    counts: dict[int, int] = {}
    for slot in slots:
        if slot.gpu >= 0:
            counts[slot.gpu] = counts.get(slot.gpu, 0) + 1
    return max(counts.values(), default=1)


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
