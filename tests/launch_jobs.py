"""Job targets for the launcher tests (imported by spawned workers by module name)."""

import hashlib
import os
import random
import time


def ok_job(payload, *, device, progress):
    with open(payload["out"], "w") as fh:
        fh.write(f"{payload['value']} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    progress(1)


def failing_job(payload, *, device, progress):
    raise ValueError(f"bad value {payload['value']}")


def dying_job(payload, *, device, progress):
    os._exit(7)


def exiting_job(payload, *, device, progress):
    import sys

    sys.exit(0)


def vanishing_job(payload, *, device, progress):
    os._exit(0)  # a clean exit code, but the job never finished


def threads_job(payload, *, device, progress):
    import torch

    yield {"job": payload["value"], "threads": torch.get_num_threads(), "pid": os.getpid()}


def blob_job(payload, *, device, progress, shared):
    """Yields `count` results of `size` bytes each, checksummed, after short random pauses.

    Big results take many pipe writes, so a kill often lands in the middle of one.
    """
    rng = random.Random(payload["value"])
    for k in range(payload["count"]):
        time.sleep(rng.uniform(0, payload["pause"]))
        blob = rng.randbytes(payload["size"])
        yield {"key": (payload["value"], k), "pid": os.getpid(), "blob": blob,
               "sha": hashlib.sha256(blob).hexdigest(), "tag": shared["tag"]}


def env_job(payload, *, device, progress):
    """What a worker sees of the parent: an environment variable and its import path."""
    import sys

    yield {"value": os.environ.get("UNLEARN_TEST_MARK"), "path": payload["path"] in sys.path,
           "torch_loaded": "torch" in sys.modules, "pid": os.getpid()}


def sum_shared(payload, *, device, progress, shared):
    yield float(sum(t.sum() for t in shared["tensors"].values()))
