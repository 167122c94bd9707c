"""Job targets for the launcher tests (imported by spawned workers by module name)."""

import os


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
