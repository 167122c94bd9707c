"""Job targets for tests/test_launch_ray.py, importable by Ray's worker processes (the test puts
this folder on their PYTHONPATH). They report where they ran instead of training anything."""

import itertools
import os
import sys
from pathlib import Path

_JOBS_IN_THIS_PROCESS = itertools.count(1)  # 1, 2, 3...: jobs this process has run


def whoami(payload, *, device, progress, shared=None):
    """One result: this process, how many jobs it has run, the identity of its shared inputs, and
    whether torch was imported before the job (by the actor's constructor)."""
    yield {"job": payload["name"], "pid": os.getpid(), "count": next(_JOBS_IN_THIS_PROCESS),
           "shared_id": id(shared), "token": int(shared["token"].sum()) if shared else None,
           "torch_imported": "torch" in sys.modules}


def dies_once(payload, *, device, progress, shared=None):
    """Kills its own process on its first run (recording the pid in payload["marker"]); on the
    next run, reports where it ran."""
    marker = Path(payload["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    yield from whoami(payload, device=device, progress=progress, shared=shared)


def always_dies(payload, *, device, progress, shared=None):
    """Kills its own process every time it runs."""
    os._exit(1)
    yield  # pragma: no cover - a generator, like the real targets


def resources(payload, *, device, progress, shared=None):
    """What Ray gave this process, and whether torch initialised CUDA (it must not: no GPU)."""
    import ray
    import torch

    yield {"pid": os.getpid(), "device": device,
           "assigned": ray.get_runtime_context().get_assigned_resources(),
           "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "cuda_initialized": torch.cuda.is_initialized()}
