"""The launcher: the only room that knows processes, CUDA_VISIBLE_DEVICES and Ray.

Jobs are plain data (`Job`): an id, a target `"module:function"` and a payload. `run_jobs` runs
them on one of two sibling backends that share this module's types and `run_job_here`:

- `launch_local`: one long-lived worker process per device slot (forked from a server that
  imported torch once, `launch_local.prestart`), one pipe per worker; neither the parent nor
  that server initialises CUDA (GPUs are counted through NVML), and each GPU worker is pinned
  with CUDA_VISIBLE_DEVICES before it first touches CUDA;
- `launch_ray`: the same jobs on a Ray cluster, one long-lived actor per slot (the only module
  that imports ray).

Neither backend imports the other, and nothing above this module learns which one ran a job.

A target is called as `fn(payload, device=..., progress=...)`, plus `shared=...` when the run has
shared inputs (data sent once per worker or node, not once per job). It may return an iterable:
each item it yields is one finished model, handed to the caller's `on_result` in the parent
process, which alone writes the store; `progress(n)` counts models for targets that store nothing.
A job that raises comes back as a failed `JobOutcome` tagged with its id, once, not retried; a job
whose worker (or node) dies is retried on a fresh one, at most MAX_TRIES times in all.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from . import helpers
from .errors import JobsFailed, UnlearnError

BACKENDS = ("local", "ray")
MAX_TRIES = 3  # runs of a job whose worker dies (killed, out of memory, node lost) before it fails
# What a worker imports before its first job, on either backend (the local fork server, a Ray
# actor's constructor): everything a training or unlearning job imports at its start (an
# ImportError here is ignored: the job will report it).
PRELOAD = ["torch", "numpy", "unlearn_cli.training", "unlearn_cli.lockstep", "unlearn_cli.context",
           "unlearn_cli.models", "unlearn_cli.data", "unlearn_cli.train_refs", "unlearn_cli.apply",
           "unlearn_cli.methods.api"]


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    target: str  # "package.module:function"
    payload: dict[str, Any]
    size: int = 1  # models this job produces, for the progress bar


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    id: str
    ok: bool
    seconds: float
    error: str = ""  # one line: ExceptionType: message
    detail: str = ""  # the worker's traceback


@dataclasses.dataclass(frozen=True)
class Slot:
    device: str  # the torch device inside the worker: "cpu" or "cuda:0"
    env: dict[str, str]  # set before the worker imports torch
    threads: int  # torch intra-op threads per job (launch.threads): fixed, so results are too
    label: str  # for messages: "cpu#1", "gpu3#0"
    gpu: int = -1  # the GPU's index as the parent sees it (-1 on CPU)
    gpu_share: float = 0.0  # Ray: the fraction of a GPU a job asks for (1 / workers_per_gpu)

    def local_device(self) -> str:
        """The device to use for work done in the parent process itself (e.g. a dry run)."""
        return "cpu" if self.gpu < 0 else f"cuda:{self.gpu}"


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A shared input a worker can compute itself (`target(*args)`, e.g. read a dataset from disk).

    The local backend lets each worker compute it (same machine, same files); the Ray backend
    computes it once in the driver and puts the result in the object store, so worker nodes need
    none of the driver's files.
    """

    target: str  # "package.module:function"
    args: tuple[Any, ...] = ()

    def compute(self) -> Any:
        return resolve_target(self.target)(*self.args)


EventFn = Callable[[str, str, Any], None]
ResultFn = Callable[[str, Any], bool]


def cpu_count() -> int:
    """The cores this process may run on (`helpers.cores`)."""
    return helpers.cores()


def gpu_count() -> int:
    """GPUs visible to this process, counted without initialising CUDA in the parent."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()


def check_device_spec(device: str) -> str:
    device = device.strip().lower()
    spec_ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and all(p.strip().isdigit() for p in device[5:].split(","))
    )
    if not spec_ok:
        raise UnlearnError(
            f"--device {device!r} is not understood; expected auto, cpu, cuda or a GPU list "
            "such as cuda:0,1"
        )
    return device


def plan_slots(device: str, *, workers: int, workers_per_gpu: int, num_jobs: int,
               threads: int = 1) -> list[Slot]:
    """Turn `--device`, `--workers`, `--workers-per-gpu`, `launch.threads` into worker slots.

    device: auto | cpu | cuda | cuda:0,1. workers: CPU processes (0 = cores // threads). threads:
    torch intra-op threads per CPU job, the same whatever the number of workers, so that a model
    is bit-identical however many workers ran beside it. Never more slots than jobs.
    """
    device = check_device_spec(device)
    if workers < 0 or workers_per_gpu < 1 or threads < 1:
        raise UnlearnError("--workers must be >= 0 (0 = automatic), --workers-per-gpu >= 1 and "
                           "launch.threads >= 1")
    num_jobs = max(1, num_jobs)
    if device != "cpu":
        available = gpu_count()
        if device == "auto":
            gpus = list(range(available))
        elif device == "cuda":
            gpus = list(range(available))
            if not gpus:
                raise UnlearnError("--device cuda: no GPU is visible to torch; use --device cpu")
        else:
            gpus = [int(p) for p in device[5:].split(",")]
            bad = [g for g in gpus if g >= available]
            if bad:
                raise UnlearnError(
                    f"--device {device}: GPU {bad[0]} does not exist ({available} visible); "
                    f"use indices below {available} or --device cpu"
                )
        if gpus:
            # The GPU order of the parent: honour a CUDA_VISIBLE_DEVICES it was started with.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else [str(g) for g in range(available)]
            total = min(len(gpus) * workers_per_gpu, num_jobs)
            # A GPU worker's CPU threads feed the GPU; they do not change what the GPU computes.
            gpu_threads = max(1, cpu_count() // total)
            slots = [
                Slot("cuda:0", {"CUDA_VISIBLE_DEVICES": names[g].strip()}, gpu_threads,
                     f"gpu{g}#{k}", gpu=g, gpu_share=1.0 / workers_per_gpu)
                for k in range(workers_per_gpu)
                for g in gpus
            ]
            return slots[:total]
    # More threads than cores only oversubscribes them; torch caps OMP_NUM_THREADS the same way.
    threads = min(threads, cpu_count())
    count = workers or max(1, cpu_count() // threads)
    count = max(1, min(count, num_jobs))
    return [Slot("cpu", {}, threads, f"cpu#{k}") for k in range(count)]


def plan(launch: Any, *, num_jobs: int) -> list[Slot]:
    """The slots for a config's `launch` section on its backend (Ray: the cluster's resources)."""
    backend = check_backend(launch.backend)
    if backend == "ray" and num_jobs > 0:
        from . import launch_ray

        return launch_ray.plan_slots(launch, num_jobs=num_jobs)
    return plan_slots(launch.device, workers=launch.workers, workers_per_gpu=launch.workers_per_gpu,
                      num_jobs=num_jobs, threads=launch.threads)


def prestart(launch: Any, *, num_jobs: int,
             stays_here: Callable[[int], bool] | None = None) -> None:
    """Start the local backend's fork server now, in the background, when this command will
    start local workers (not when its jobs run in this process, nor on Ray): its torch import
    then overlaps the command's own imports and checks. Call it once the command knows it has
    work; it costs nothing to call when the workers are not needed after all. stays_here(slots):
    whether the measured costs (`CostModel.stays_here`) will keep the jobs in this process. On
    Ray: join the cluster and create the slots' actors now, in the background
    (`launch_ray.prestart`)."""
    if launch.backend == "ray" and num_jobs > 0:
        from .launch_ray import prestart as start_actors

        return start_actors(launch, num_jobs=num_jobs)
    if launch.backend != "local" or num_jobs < 1:
        return
    # Guessed without counting GPUs (that would import torch here first): on a CPU, one slot
    # means the jobs run in this process; with --device auto and one slot it may be a GPU, whose
    # worker then starts the server itself.
    slots = guess_slots(launch, num_jobs=num_jobs)
    if slots <= 1 and not str(launch.device).strip().lower().startswith("cuda"):
        return
    if stays_here is not None and not str(launch.device).strip().lower().startswith("cuda") \
            and stays_here(slots):
        return  # the measured costs keep these jobs in this process (CostModel)
    from .launch_local import prestart as start_server

    start_server()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UnlearnError(f"--backend {backend!r} is not understood; expected one of: "
                           f"{', '.join(BACKENDS)}")
    return backend


def resolve_target(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_shared(shared: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Compute the `Lazy` values of a run's shared inputs (in the process that runs its jobs)."""
    if shared is None:
        return None
    return {k: v.compute() if isinstance(v, Lazy) else v for k, v in shared.items()}


def job_messages(job: Job, device: str,
                 shared: Mapping[str, Any] | Callable[[], Any] | None = None
                 ) -> Iterator[tuple[str, Any]]:
    """Run one job in this process as a stream of messages; every backend runs jobs through here.

    Yields ("progress", n) for what the target reports, ("result", item) for each item it yields,
    and last ("finished", JobOutcome): an exception (even sys.exit) becomes a failed outcome
    tagged with the job's id, so a job fails the same way wherever it runs. shared: the run's
    shared inputs, or a function that computes them (a failure to compute them fails the job).
    """
    start = time.perf_counter()
    reported: list[int] = []
    items: Iterator[Any] = iter(())
    outcome: JobOutcome | None = None

    def failed(exc: BaseException) -> JobOutcome:
        msg = str(exc) if isinstance(exc, UnlearnError) else _one_line(exc)
        return JobOutcome(job.id, False, time.perf_counter() - start, msg, traceback.format_exc())

    try:
        inputs = shared() if callable(shared) else shared
        kwargs: dict[str, Any] = {"device": device, "progress": reported.append}
        if inputs is not None:
            kwargs["shared"] = inputs
        produced = resolve_target(job.target)(job.payload, **kwargs)
        if produced is not None:  # a generator: one item per finished model
            items = iter(produced)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing job (even sys.exit) must not stop others
        outcome = failed(exc)
    # The yields stay outside the try blocks: what the consumer does with a message is not the job.
    while outcome is None:
        try:
            item = next(items)
        except StopIteration:
            outcome = JobOutcome(job.id, True, time.perf_counter() - start)
            break
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            outcome = failed(exc)
            break
        while reported:
            yield "progress", reported.pop(0)
        yield "result", item
    while reported:
        yield "progress", reported.pop(0)
    yield "finished", outcome


def run_job_here(job: Job, device: str, send: Callable[[str, Any], None],
                 shared: Mapping[str, Any] | Callable[[], Any] | None = None) -> JobOutcome:
    """Run one job in this process: send(kind, value) for its messages; return its outcome."""
    for kind, value in job_messages(job, device, shared):
        if kind == "finished":
            return value
        send(kind, value)
    raise AssertionError("job_messages always ends with a finished message")  # pragma: no cover


def run_jobs(
    jobs: Sequence[Job],
    slots: Sequence[Slot],
    *,
    backend: str = "local",
    address: str = "auto",
    shared: Mapping[str, Any] | None = None,
    on_result: ResultFn | None = None,
    on_event: EventFn | None = None,
    inline: bool | None = None,
) -> list[JobOutcome]:
    """Run every job on the slots; return one outcome per job, in the order of `jobs`.

    shared: inputs every job of the run needs, sent once per worker (local) or once per node
    (Ray); values may be `Lazy`. on_result(job_id, item) is called in this process for each item a
    job yields and returns whether it was new (a retried job may yield a model again). on_event
    (kind, job_id, value) is called in this process: ("cluster", "", one line), ("worker", label,
    pid), ("start", id, slot label), ("progress", id, models finished), ("finished", id,
    JobOutcome). inline=None runs in this process when there is a single local CPU slot (no
    process start-up); True forces it (tests).
    """
    emit = on_event or (lambda kind, job_id, value: None)
    keep = on_result or (lambda job_id, item: True)
    backend = check_backend(backend)
    if backend == "ray" and jobs:
        from . import launch_ray

        return launch_ray.run_jobs(jobs, slots, address=address, shared=shared, on_result=keep,
                                   emit=emit)
    if not jobs:
        return []
    if inline is None:
        inline = len(slots) == 1 and slots[0].device == "cpu"
    if inline:
        return _run_inline(jobs, slots[0], shared, keep, emit)
    from . import launch_local

    return launch_local.run_jobs(jobs, slots, shared=shared, on_result=keep, emit=emit)


# Local workers' start-up until one was measured on this machine with this store (an estimate:
# from a warm fork server a worker was ready in ~0.1-0.3 s here, from a cold one in ~2 s).
STARTUP_ESTIMATE_S = 1.0
# A measured start-up counts for at most this: a slow one (a loaded moment) would otherwise keep
# later runs in the command's process, where it is never measured again.
STARTUP_CAP_S = 3.0


def machine() -> dict[str, Any]:
    """What measured costs are valid for: this host and the cores this process may use."""
    return {"host": platform.node(), "cpus": cpu_count()}


def user_code(method_spec: str | None, arch: str) -> bool:
    """Whether a run executes a user's plugin (a method or a model builder, `file.py:fn`)."""
    from .config import plugin_arch
    from .methods import is_plugin

    return plugin_arch(arch) or (method_spec is not None and is_plugin(method_spec))


class CostModel:
    """Where a command's jobs run on the local backend: in this process or on workers.

    From costs measured by the same command on this machine (`Store.record_costs`, under a key
    such as "train-refs" or "apply:finetune", by the last run that used workers): in this
    process the jobs take W = models x the seconds per model they took then; on n workers, the
    workers' start-up (measured from the launch to the first worker ready, counted at most
    STARTUP_CAP_S) plus the busiest worker's share, max(W / n, the largest job). The smaller
    wins. Workers when nothing was measured yet (there is nothing to estimate from, and most runs
    are large), for user code (a plugin method or model that crashes the process is retried on
    a worker; in the command's process it would end the command), on Ray, on GPUs, and when the
    caller chose (`inline`); one CPU slot runs in this process anyway (`run_jobs`). Where jobs
    run never changes a result: the same jobs, threads and seeds either way.
    """

    def __init__(self, store: Any, key: str, *, enabled: bool = True) -> None:
        self.store, self.key, self.enabled = store, key, enabled
        self.stored = store.read_costs(key, machine()) if enabled else {}
        self._started: float | None = None
        self._first_worker: float | None = None
        self._on_workers = False  # decided: local CPU workers (then this run is measured)

    def estimate(self, sizes: Sequence[int], num_slots: int) -> tuple[float, float, str] | None:
        """(seconds in this process, seconds on num_slots workers, how start-up was known) for
        jobs of these sizes (models each), or None without a measured cost per model."""
        per_model = self.stored.get("model_seconds")
        if per_model is None or not sizes or num_slots < 2:
            return None
        startup, how = self.stored.get("startup_seconds"), "measured"
        if startup is None:
            startup, how = STARTUP_ESTIMATE_S, "estimated"
        elif startup > STARTUP_CAP_S:
            startup, how = STARTUP_CAP_S, "measured, counted as at most this"
        models = sum(sizes)
        here = models * per_model
        there = startup + max(models / num_slots, max(sizes)) * per_model
        return here, there, f"{per_model:.3f} s per model, {startup:.1f} s start-up, {how}"

    def stays_here(self, sizes: Sequence[int], num_slots: int) -> bool:
        """Whether jobs of these sizes on num_slots CPU slots are estimated faster here."""
        if not self.enabled:
            return False
        estimate = self.estimate(sizes, num_slots)
        return estimate is not None and estimate[0] <= estimate[1]

    def decide(self, jobs: Sequence[Job], slots: Sequence[Slot], backend: str,
               inline: bool | None) -> tuple[bool | None, str]:
        """(inline for `run_jobs`, a note for the plan line, "" when the model was not used)."""
        local_cpu = backend == "local" and bool(slots) and slots[0].device == "cpu"
        if not (self.enabled and local_cpu and jobs and len(slots) > 1 and inline is None):
            self._on_workers = local_cpu and inline is False and bool(jobs)
            return inline, ""
        estimate = self.estimate([job.size for job in jobs], len(slots))
        if estimate is None:
            self._on_workers = True
            return False, "; no measured cost yet: workers"
        here, there, how = estimate
        chosen = here <= there
        self._on_workers = not chosen
        return chosen, (f"; measured cost: ~{here:.1f} s in this process, ~{there:.1f} s on "
                        f"{len(slots)} workers ({how}): {'this process' if chosen else 'workers'}")

    def watch(self, on_event: EventFn | None) -> EventFn:
        """`on_event` for run_jobs, noting when the first worker is ready."""
        self._started = time.monotonic()

        def event(kind: str, job_id: str, value: Any) -> None:
            if kind == "worker" and self._first_worker is None:
                self._first_worker = time.monotonic()
            if on_event is not None:
                on_event(kind, job_id, value)

        return event

    def record(self, jobs: Sequence[Job], outcomes: Sequence[JobOutcome],
               counted: Callable[[Job], bool] = lambda job: True) -> None:
        """Store what this run measured, if it ran on local CPU workers (the caller holds the
        store lock); seconds per model over the finished `counted` jobs."""
        if not (self.enabled and self._on_workers):
            return
        done = [(job, outcome) for job, outcome in zip(jobs, outcomes)
                if outcome.ok and counted(job)]
        models = sum(job.size for job, _ in done)
        costs: dict[str, float] = {}
        if models:
            costs["model_seconds"] = sum(outcome.seconds for _, outcome in done) / models
        if self._first_worker is not None and self._started is not None:
            costs["startup_seconds"] = self._first_worker - self._started
        if costs:
            self.store.record_costs(self.key, machine(), costs)


def guess_slots(launch: Any, *, num_jobs: int) -> int:
    """CPU slots `plan` will give, guessed without counting GPUs (which imports torch)."""
    threads = max(1, min(int(launch.threads), cpu_count()))
    return min(num_jobs, launch.workers if launch.workers > 0 else max(1, cpu_count() // threads))


def set_threads(threads: int) -> int:
    """Fix torch's intra-op threads for the jobs to come, if torch is imported; the old count."""
    torch = sys.modules.get("torch")
    if torch is None:
        return threads
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    return before


def _run_inline(jobs: Sequence[Job], slot: Slot, shared: Mapping[str, Any] | None,
                keep: ResultFn, emit: EventFn) -> list[JobOutcome]:
    import torch  # noqa: F401 - imported here so that set_threads applies to the jobs

    before = set_threads(slot.threads)  # as a worker does: the same results in-process
    try:
        resolved = resolve_shared(shared)
        outcomes = []
        for job in jobs:
            emit("start", job.id, slot.label)

            def send(kind: str, value: Any, _id: str = job.id) -> None:
                if kind == "progress":
                    emit("progress", _id, value)
                elif keep(_id, value):
                    emit("progress", _id, 1)

            outcome = run_job_here(job, slot.device, send, resolved)
            emit("finished", job.id, outcome)
            outcomes.append(outcome)
        return outcomes
    finally:
        set_threads(before)


def raise_failures(outcomes: Sequence[JobOutcome], *, what: str, kept: str) -> None:
    """One JobsFailed naming the failed jobs (the first three), if any job failed."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise JobsFailed(
            f"{len(failed)} of {len(outcomes)} {what} jobs failed ("
            + "; ".join(f"{o.id}: {o.error}" for o in failed[:3])
            + ("; ..." if len(failed) > 3 else "")
            + f"); {kept}: fix the cause and rerun the same command"
        )
