"""The launcher: the only module that knows processes and CUDA_VISIBLE_DEVICES.

Jobs are plain data (`Job`): an id, a target `"module:function"` and a payload. Each device slot
gets one long-lived worker process (start method `spawn`), so torch is imported and CUDA initialised
once per worker, not once per job. The parent never initialises CUDA: it counts GPUs through NVML,
and each GPU worker is pinned with CUDA_VISIBLE_DEVICES before it imports torch.

The parent hands out one job at a time to idle workers, so it always knows which job each worker
holds: a job that raises comes back as a failed `JobOutcome` tagged with its id while the others go
on; a worker that dies (killed, out of memory) fails its job and is replaced while jobs remain.
Ctrl-C stops every worker. A target is called as `fn(payload, device=..., progress=...)`, where
`progress(n)` reports n more models finished.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .errors import JobsFailed, UnlearnError

POLL_SECONDS = 0.25  # how often the parent checks that its workers are alive


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
    threads: int  # torch intra-op threads for this worker
    label: str  # for messages: "cpu#1", "gpu3#0"
    gpu: int = -1  # the GPU's index as the parent sees it (-1 on CPU)

    def local_device(self) -> str:
        """The device to use for work done in the parent process itself (e.g. a dry run)."""
        return "cpu" if self.gpu < 0 else f"cuda:{self.gpu}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    """GPUs visible to this process, counted without initialising CUDA in the parent."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()


def plan_slots(device: str, *, workers: int, workers_per_gpu: int, num_jobs: int) -> list[Slot]:
    """Turn `--device`, `--workers`, `--workers-per-gpu` into worker slots.

    device: auto | cpu | cuda | cuda:0,1. workers: CPU processes (0 = one per core). Never more
    slots than jobs.
    """
    device = device.strip().lower()
    spec_ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and all(p.strip().isdigit() for p in device[5:].split(","))
    )
    if not spec_ok:
        raise UnlearnError(
            f"--device {device!r} is not understood; expected auto, cpu, cuda or a GPU list "
            "such as cuda:0,1"
        )
    if workers < 0 or workers_per_gpu < 1:
        raise UnlearnError("--workers must be >= 0 (0 = automatic) and --workers-per-gpu >= 1")
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
            threads = max(1, cpu_count() // total)
            slots = [
                Slot("cuda:0", {"CUDA_VISIBLE_DEVICES": names[g].strip()}, threads, f"gpu{g}#{k}",
                     gpu=g)
                for k in range(workers_per_gpu)
                for g in gpus
            ]
            return slots[:total]
    count = workers or cpu_count()
    count = max(1, min(count, num_jobs))
    threads = max(1, cpu_count() // count)
    return [Slot("cpu", {}, threads, f"cpu#{k}") for k in range(count)]


def resolve_target(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_job_here(job: Job, device: str, progress: Callable[[int], None]) -> JobOutcome:
    """Run one job in this process, turning an exception into a failed outcome."""
    start = time.perf_counter()
    try:
        resolve_target(job.target)(job.payload, device=device, progress=progress)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing job (even sys.exit) must not stop others
        msg = str(exc) if isinstance(exc, UnlearnError) else _one_line(exc)
        return JobOutcome(job.id, False, time.perf_counter() - start, msg, traceback.format_exc())
    return JobOutcome(job.id, True, time.perf_counter() - start)


def _die_with_parent() -> None:
    """End this worker as soon as the parent is gone (kill -9, OOM killer, a scheduler's SIGTERM).

    Otherwise an orphan would go on writing to a store whose lock died with the parent, beside a
    rerun. Linux delivers SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); a watchdog
    thread covers other systems and the moment before prctl took effect.
    """
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    parent = mp.parent_process()

    def watch() -> None:
        while parent is None or parent.is_alive():
            time.sleep(POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="unlearn-parent-watch", daemon=True).start()


def _worker_main(index: int, slot: Slot, jobs: Any, events: Any) -> None:
    # Ctrl-C reaches the whole process group; the parent decides and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    os.environ.update(slot.env)
    import torch  # only after CUDA_VISIBLE_DEVICES is set

    torch.set_num_threads(slot.threads)
    events.put(("ready", index, None, None))
    while True:
        job = jobs.get()
        if job is None:
            return

        def progress(n: int, _id: str = job.id) -> None:
            events.put(("progress", index, _id, n))

        outcome = run_job_here(job, slot.device, progress)
        events.put(("finished", index, job.id, outcome))


EventFn = Callable[[str, str, Any], None]


def run_jobs(
    jobs: Sequence[Job],
    slots: Sequence[Slot],
    *,
    on_event: EventFn | None = None,
    inline: bool | None = None,
) -> list[JobOutcome]:
    """Run every job on the slots; return one outcome per job, in the order of `jobs`.

    on_event(kind, job_id, value) is called in the parent: ("start", id, slot label),
    ("progress", id, models finished), ("finished", id, JobOutcome). inline=None runs in this
    process when there is a single CPU slot (no process start-up); True forces it (tests).
    """
    emit = on_event or (lambda kind, job_id, value: None)
    if not jobs:
        return []
    if inline is None:
        inline = len(slots) == 1 and slots[0].device == "cpu"
    if inline:
        return _run_inline(jobs, slots[0], emit)
    return _run_spawned(jobs, slots, emit)


def _run_inline(jobs: Sequence[Job], slot: Slot, emit: EventFn) -> list[JobOutcome]:
    outcomes = []
    for job in jobs:
        emit("start", job.id, slot.label)
        outcome = run_job_here(job, slot.device, lambda n, _id=job.id: emit("progress", _id, n))
        emit("finished", job.id, outcome)
        outcomes.append(outcome)
    return outcomes


def _run_spawned(jobs: Sequence[Job], slots: Sequence[Slot], emit: EventFn) -> list[JobOutcome]:
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    pending = list(jobs)
    outcomes: dict[str, JobOutcome] = {}
    workers: dict[int, tuple[Any, Any, Slot]] = {}  # index -> (process, job queue, slot)
    holding: dict[int, Job] = {}  # index -> the job it runs
    started_at: dict[int, float] = {}
    # A crash loop must end: a worker that dies at start-up would otherwise be restarted forever.
    replacements = 2 * len(slots) + 2

    def start_worker(index: int, slot: Slot) -> None:
        job_q = ctx.Queue()
        proc = ctx.Process(
            target=_worker_main, args=(index, slot, job_q, events), name=f"unlearn-{slot.label}"
        )
        proc.daemon = True
        proc.start()
        workers[index] = (proc, job_q, slot)

    def feed(index: int) -> None:
        _, job_q, slot = workers[index]
        if pending:
            job = pending.pop(0)
            holding[index] = job
            started_at[index] = time.perf_counter()
            job_q.put(job)
            emit("start", job.id, slot.label)
        else:
            job_q.put(None)

    def handle(kind: str, index: int, job_id: str, value: Any) -> None:
        if kind == "progress":
            emit("progress", job_id, value)
            return
        if index not in workers:  # a late event of a worker already counted as dead
            return
        if kind == "finished":
            holding.pop(index, None)
            if job_id not in outcomes:
                outcomes[job_id] = value
                emit("finished", job_id, value)
        feed(index)  # after "ready" and "finished": the next job, or None to stop

    def drain() -> None:
        while True:
            try:
                handle(*events.get_nowait())
            except queue.Empty:
                return

    def reap() -> None:
        """A worker that died holding a job fails that job; replace it while work remains."""
        nonlocal replacements, next_index
        for index, (proc, _, slot) in list(workers.items()):
            if proc.is_alive():
                continue
            drain()  # what it sent before dying counts (a finished job is not failed)
            workers.pop(index)
            job = holding.pop(index, None)
            if job is not None and job.id not in outcomes:
                seconds = time.perf_counter() - started_at.get(index, time.perf_counter())
                outcome = JobOutcome(
                    job.id, False, seconds,
                    f"worker {slot.label} died (exit code {proc.exitcode}) while running it",
                )
                outcomes[job.id] = outcome
                emit("finished", job.id, outcome)
            if pending and replacements > 0:
                replacements -= 1
                start_worker(next_index, slot)
                next_index += 1

    # SIGTERM (timeout, a scheduler) stops the workers as Ctrl-C does, instead of orphaning them.
    previous = _on_sigterm_raise_interrupt()
    next_index = 0
    try:
        for slot in slots:
            start_worker(next_index, slot)
            next_index += 1
        while len(outcomes) < len(jobs):
            try:
                handle(*events.get(timeout=POLL_SECONDS))
            except queue.Empty:
                pass
            reap()
            if not workers and len(outcomes) < len(jobs):
                for job in pending:
                    outcomes[job.id] = JobOutcome(job.id, False, 0.0, "not run: no worker left")
                pending.clear()
    except BaseException:
        _stop(workers)
        raise
    finally:
        _restore_sigterm(previous)
    for proc, job_q, _ in workers.values():
        if proc.is_alive():
            job_q.put(None)  # a replacement that was still starting has not been told to stop
    for proc, _, _ in workers.values():
        proc.join(timeout=10)
    _stop(workers)
    return [outcomes[job.id] for job in jobs]


def _on_sigterm_raise_interrupt() -> Any:
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


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


def _stop(workers: dict[int, tuple[Any, Any, Slot]]) -> None:
    for proc, _, _ in workers.values():
        if proc.is_alive():
            proc.terminate()
    for proc, _, _ in workers.values():
        proc.join(timeout=5)
        if proc.is_alive():  # pragma: no cover - a worker stuck in native code
            proc.kill()
            proc.join()
