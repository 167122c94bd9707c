"""The Ray backend: the launcher's jobs as Ray tasks on a cluster. The only module that imports ray.

Each job is one Ray task that runs `launch.job_messages` in a Ray worker process and streams its
messages back (a generator task), so the driver receives each finished model as soon as it is made,
anywhere in the cluster, and writes it to the store itself: worker nodes need no shared filesystem
and can never leave a half-written file. The run's shared inputs (split, dataset arrays, original
model) are put in the object store once by the driver; Ray copies them to each node once.

Faults: a task whose worker process or node dies (Ray's system errors) is submitted again, at most
`launch.MAX_TRIES` runs in all, then fails with its id; the driver keeps what an earlier try
already delivered (the store's writer skips a model stored twice). A job that raises is reported
once by `job_messages`, never retried (Ray's own retries are off: max_retries=0). Ctrl-C cancels
every task (force: their processes are killed) and disconnects. Every wait has a timeout.

Worker processes: Ray reuses a CPU task's worker process for the next task, so torch is imported
once per worker, as in the local pool. A GPU task gets a fresh process each time (Ray's default
for GPU tasks, max_calls=1, which frees its GPU memory), kept here: a GPU job on Ray pays torch's
import and CUDA's start-up, and a compiled model is compiled again. Long-lived GPU actors, one per
slot, would avoid that; they are not built (nor is this path tested on a GPU).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UnlearnError
from .launch import (
    MAX_TRIES,
    EventFn,
    Job,
    JobOutcome,
    ResultFn,
    Slot,
    check_device_spec,
    job_messages,
    resolve_shared,
    set_threads,
)

POLL_SECONDS = 0.1  # the longest the driver waits before it looks at every task again
GET_SECONDS = 60.0  # fetching a message that Ray says is ready; longer means its node is gone
INSTALL_HINT = "pip install 'unlearn-cli[ray]' (or `make install`, which includes it)"

_state = {"owned": False}  # whether this process started the Ray instance it is connected to


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UnlearnError(f"--backend ray needs Ray, which is not installed; install it with "
                           f"{INSTALL_HINT}, or use --backend local") from None
    return ray


def connect(address: str) -> Any:
    """Join (or start) the Ray cluster `address` names, unless this process is already connected.

    auto: the cluster RAY_ADDRESS or a running `ray start` names; local: a private instance for
    this command, shut down at its end; host:port: that cluster. A process already connected to
    Ray (a notebook, a test) keeps its connection.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(address="local", **quiet)  # a new instance even if one runs on this node
            _state["owned"] = True
        else:
            ray.init(address=address, **quiet)
    except ConnectionError as exc:
        where = "RAY_ADDRESS or a running `ray start`" if address == "auto" else address
        raise UnlearnError(
            f"--address {address}: no Ray cluster found at {where} ({str(exc).splitlines()[0]}); "
            "start one with `ray start --head` (see the README), give its HEAD:6379, or use "
            "--address local for a private one on this machine"
        ) from None
    return ray


def describe(ray: Any) -> str:
    """One line: the cluster this command joined."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    how = "a private Ray instance" if _state["owned"] else "Ray cluster"
    address = ray.get_runtime_context().gcs_address
    return (f"{how} at {address}: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs")


def disconnect() -> None:
    """Shut down a private instance this command started; leave a joined cluster running."""
    if _state["owned"]:
        _ray().shutdown()
        _state["owned"] = False


def plan_slots(launch: Any, *, num_jobs: int) -> list[Slot]:
    """Slots for the cluster's resources: how many jobs run at once, and what each asks for.

    A CPU job asks for launch.threads CPUs; a GPU job for 1 / workers_per_gpu GPU (Ray sets its
    CUDA_VISIBLE_DEVICES). --workers, when given, caps the jobs in flight.
    """
    device = check_device_spec(launch.device)
    ray = connect(launch.address)
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
    num_jobs = max(1, num_jobs)
    if device != "cpu" and gpus:
        share = 1.0 / launch.workers_per_gpu
        count = min(gpus * launch.workers_per_gpu, num_jobs)
        return [Slot("cuda:0", {}, 1, f"ray-gpu#{k}", gpu=0, gpu_share=share)
                for k in range(count)]
    if device not in ("cpu", "auto"):
        raise UnlearnError(f"--device {device}: the Ray cluster has no GPU; use --device cpu")
    threads = min(launch.threads, max(1, cpus))
    count = max(1, min(cpus // threads or 1, num_jobs))
    if launch.workers:
        count = min(count, launch.workers)
    return [Slot("cpu", {}, threads, f"ray-cpu#{k}") for k in range(count)]


def _task(job: Job, device: str, threads: int, shared: Any) -> Any:
    """A job inside a Ray worker: its messages, streamed back to the driver as they come."""
    import torch  # noqa: F401 - so that set_threads fixes the threads before the job runs

    set_threads(threads)
    yield from job_messages(job, device, shared)


def run_jobs(jobs: Sequence[Job], slots: Sequence[Slot], *, address: str,
             shared: Mapping[str, Any] | None, on_result: ResultFn,
             emit: EventFn) -> list[JobOutcome]:
    """Run the jobs as Ray tasks, at most len(slots) at once; see the module docstring."""
    ray = connect(address)
    try:
        emit("cluster", "", describe(ray))
        if not jobs:
            return []
        return _run(ray, jobs, slots, shared, on_result, emit)
    finally:
        disconnect()


def _run(ray: Any, jobs: Sequence[Job], slots: Sequence[Slot],
         shared: Mapping[str, Any] | None, on_result: ResultFn,
         emit: EventFn) -> list[JobOutcome]:
    from ray import exceptions as rex

    slot = slots[0]
    resources = ({"num_cpus": 1, "num_gpus": slot.gpu_share} if slot.gpu_share
                 else {"num_cpus": slot.threads})
    task = ray.remote(max_retries=0, **resources)(_task)
    # Lazy inputs (the dataset) are read here, once; Ray ships them to each node once.
    shared_ref = ray.put(resolve_shared(shared)) if shared is not None else None
    pending = collections.deque(jobs)
    outcomes: dict[str, JobOutcome] = {}
    tries: collections.Counter[str] = collections.Counter()
    running: dict[Any, tuple[Job, float]] = {}  # generator -> (its job, monotonic start)

    def submit(job: Job) -> None:
        gen = task.options(name=f"unlearn:{job.id}").remote(job, slot.device, slot.threads,
                                                            shared_ref)
        running[gen] = (job, time.monotonic())
        emit("start", job.id, slot.label)

    def finish(job: Job, outcome: JobOutcome) -> None:
        if job.id not in outcomes:
            outcomes[job.id] = outcome
            emit("finished", job.id, outcome)

    def lost(gen: Any, why: str) -> None:
        """The task's worker or node is gone: run the job again, or fail it after MAX_TRIES."""
        job, started = running.pop(gen)
        tries[job.id] += 1
        if tries[job.id] < MAX_TRIES:
            pending.appendleft(job)
        else:
            finish(job, JobOutcome(job.id, False, time.monotonic() - started,
                                   f"its Ray worker or node was lost {tries[job.id]} times "
                                   f"(last: {why})"))

    try:
        while len(outcomes) < len(jobs):
            while pending and len(running) < len(slots):
                submit(pending.popleft())
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=POLL_SECONDS)
            for gen in ready:
                job, started = running[gen]
                try:
                    ref = next(gen)
                except StopIteration:  # ended without its finished message: count it as lost
                    lost(gen, "the task ended early")
                    continue
                try:
                    kind, value = ray.get(ref, timeout=GET_SECONDS)
                except rex.RayTaskError as exc:  # raised outside the job (e.g. an import)
                    running.pop(gen)
                    cause = exc.cause if exc.cause is not None else exc
                    finish(job, JobOutcome(job.id, False, time.monotonic() - started,
                                           f"{type(cause).__name__}: {cause}".splitlines()[0]))
                    continue
                except (rex.RayError, TimeoutError) as exc:
                    lost(gen, type(exc).__name__)
                    continue
                if kind == "result":
                    if on_result(job.id, value):
                        emit("progress", job.id, 1)
                elif kind == "progress":
                    emit("progress", job.id, value)
                else:
                    running.pop(gen)
                    finish(job, value)
    except BaseException:
        for gen in running:
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to cancel
                pass
        raise
    return [outcomes[job.id] for job in jobs]
