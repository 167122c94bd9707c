"""The local backend: one long-lived worker process per slot, each with its own pipes.

Why the parent cannot wait forever: it shares no lock or queue with any worker. Each worker owns
two pipes that only it and the parent hold (jobs in, messages out). The parent never blocks on
them: it waits in `connection.wait` on every worker's message pipe and process sentinel with a
timeout, reads whatever bytes are there without blocking, and acts on whole messages only. A dying
worker closes its pipe, so its death is seen either way, and a message it left half-written dies
with it. Every join has a deadline, then terminate, then kill.

The parent hands out one job at a time to an idle worker, so it always knows which job each
worker holds (`_Worker`, the one place a worker's state lives). A worker that dies fails nothing
at once: its job goes back to the queue for a fresh worker, up to `launch.MAX_TRIES` runs, then
fails with the worker's exit code. A worker that dies before it is ready counts against a start-up
budget, so a crash loop ends. Ctrl-C and SIGTERM stop every worker.

Start-up: workers are forked from a fork server (`multiprocessing`'s forkserver start method)
that imports torch and the training modules once. The commands start it first thing
(`prestart`), so that its imports (about 4 s of CPU for torch on this project's 2-core machine)
run while the command itself imports and checks, and each worker then starts in milliseconds
instead of importing torch again. The server never runs torch code or touches CUDA, so forking
from it is as safe as spawning. A worker takes the parent's environment and import path of the
moment it is started (as a spawned one would), not the server's. Where forkserver is missing,
workers are spawned.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import wait
from typing import Any

from .launch import (
    MAX_TRIES,
    PRELOAD,  # what the fork server imports before it forks workers
    EventFn,
    Job,
    JobOutcome,
    ResultFn,
    Slot,
    job_messages,
    resolve_shared,
    set_threads,
)

POLL_SECONDS = 0.25  # the longest the parent waits before it looks at every worker again
STARTUP_SECONDS = 300.0  # a worker that is not ready by then (importing torch) is killed
STOP_SECONDS = 10.0  # how long finished workers get to exit before they are terminated
READ_BYTES = 1 << 20  # per read from a worker's pipe
HEADER = struct.Struct("!Q")  # a message: its length in bytes, then the pickled (kind, id, value)


def start_method() -> str:
    """forkserver where the platform has it (Linux, macOS), else spawn; UNLEARN_START_METHOD=spawn
    spawns (each worker then imports torch itself: slower to start, nothing shared)."""
    if os.environ.get("UNLEARN_START_METHOD", "").strip().lower() == "spawn":
        return "spawn"
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def prestart() -> None:
    """Start the fork server now, in the background (it imports `PRELOAD`), so that workers
    started later in this command fork from a warm process. Safe to call more than once; a
    failure here only means the workers start it themselves later."""
    if start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    try:
        forkserver.set_forkserver_preload(PRELOAD)
        with _main_script_left_out():
            forkserver.ensure_running()
    except (OSError, ValueError):  # pragma: no cover - no server now: start() tries again
        return
    global _STOP_REGISTERED
    if not _STOP_REGISTERED:
        atexit.register(_stop_server)
        _STOP_REGISTERED = True


_STOP_REGISTERED = False


@contextlib.contextmanager
def _main_script_left_out() -> Iterator[None]:
    """While a process starts (the fork server, a worker): multiprocessing would run the
    caller's main script again in it when that script was run by path (`python my_script.py`),
    and a script without the `if __name__ == "__main__":` guard would then start its whole
    experiment again there, which multiprocessing refuses (workers "dying at start-up"). The
    workers need nothing from that script (jobs name their targets by module, plugins by file),
    so it is left out: its path is hidden from multiprocessing for the moment of the start."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield  # run as a module (`python -m`, whose import is cheap and guarded) or none
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _stop_server() -> None:
    """At exit, end the fork server now: one started by a command that then refused its input
    would otherwise finish importing torch (seconds of CPU) before it noticed it was orphaned.
    Its workers are stopped already (run_jobs), or die with it (PR_SET_PDEATHSIG)."""
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError, PermissionError):
        pass


# ------------------------------------------------------------------ the worker process


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as the command that started it is gone (kill -9, OOM killer, a
    scheduler's SIGTERM).

    Otherwise an orphan would go on computing for nobody. Linux delivers SIGKILL on the death of
    the process that forked us (prctl PR_SET_PDEATHSIG): the command itself, or the fork server,
    which exits with the command. A watchdog thread covers other systems and the moment before
    prctl took effect: it checks that the command's process still exists.
    """
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - exists, another user's (pid reused)
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="unlearn-parent-watch", daemon=True).start()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _worker_main(slot: Slot, jobs: Any, messages: Any, shared_blob: bytes | None,
                 parent: tuple[int, dict[str, str], list[str]]) -> None:
    # Ctrl-C reaches the whole process group; the parent decides and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_pid, environ, path = parent
    _die_with_parent(parent_pid)
    # The command's environment and import path now, not the fork server's at its start.
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    os.environ.update(slot.env)  # before CUDA is initialised: CUDA_VISIBLE_DEVICES
    # torch reads OMP_NUM_THREADS when a job first imports it; set_threads covers a torch that is
    # already imported. Workers do not import torch themselves: jobs that need none start faster.
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)
    out = messages.fileno()

    def send(kind: str, job_id: str, value: Any) -> None:
        body = pickle.dumps((kind, job_id, value), protocol=pickle.HIGHEST_PROTOCOL)
        _write_all(out, HEADER.pack(len(body)) + body)

    send("ready", "", os.getpid())
    resolved: dict[str, Any] = {}

    def inputs() -> Any:  # computed at the first job, so that a failure fails a job, not us
        if shared_blob is not None and not resolved:
            resolved.update(resolve_shared(pickle.loads(shared_blob)))
        return resolved if shared_blob is not None else None

    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        set_threads(slot.threads)
        messages = job_messages(job, slot.device, inputs)
        for kind, value in messages:
            try:
                send(kind, job.id, value)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # cannot be sent
                messages.close()
                send("finished", job.id, JobOutcome(job.id, False, 0.0, f"its {kind} cannot "
                                                    f"be sent to the parent: {exc}"))
                break


# ------------------------------------------------------------------ the parent


@dataclasses.dataclass(eq=False)
class _Worker:
    """Everything the parent knows about one worker."""

    slot: Slot
    proc: Any  # multiprocessing Process
    jobs: Any  # the parent's end of the job pipe (it writes)
    messages: Any  # the parent's end of the message pipe (it reads, never blocking)
    born: float  # time.monotonic() at start
    pid: int | None = None  # set by its "ready" message
    job: Job | None = None  # the job it holds
    job_started: float = 0.0
    stopping: bool = False  # told to exit (no job left)
    closed: bool = False  # its message pipe reached end of file: it is gone
    inbox: bytearray = dataclasses.field(default_factory=bytearray)

    def read(self) -> None:
        """Take every byte waiting in the message pipe, without blocking."""
        while not self.closed:
            try:
                chunk = os.read(self.messages.fileno(), READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self.inbox += chunk

    def whole_messages(self) -> list[tuple[str, str, Any]]:
        out = []
        while len(self.inbox) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.inbox)
            if len(self.inbox) < HEADER.size + size:
                break  # the rest is still on its way (or died with the worker)
            body = bytes(self.inbox[HEADER.size : HEADER.size + size])
            del self.inbox[: HEADER.size + size]
            out.append(pickle.loads(body))
        return out

    def close(self) -> None:
        self.jobs.close()
        self.messages.close()


def run_jobs(jobs: Sequence[Job], slots: Sequence[Slot], *, shared: Mapping[str, Any] | None,
             on_result: ResultFn, emit: EventFn) -> list[JobOutcome]:
    """Run the jobs on one worker process per slot; see the module docstring."""
    method = start_method()
    if method == "forkserver":
        prestart()  # a no-op when the command already started it
    ctx = mp.get_context(method)
    # The shared inputs go to each worker as plain pickle bytes, tensors by value: multiprocessing's
    # own pickler would pass every tensor's storage as a file descriptor, and a fork server takes
    # at most 253 descriptors per process start (a larger model's state dict has more tensors).
    shared_blob = None if shared is None else pickle.dumps(dict(shared),
                                                           protocol=pickle.HIGHEST_PROTOCOL)
    pending = collections.deque(jobs)
    outcomes: dict[str, JobOutcome] = {}
    tries: collections.Counter[str] = collections.Counter()
    workers: list[_Worker] = []
    free = list(slots)  # slots without a live worker
    # A crash loop must end: workers that die before they are ready are replaced this many times.
    start_budget = 2 * len(slots) + 2
    last_exit = ""

    def start(slot: Slot) -> None:
        nonlocal start_budget, last_exit
        jobs_in, jobs_out = ctx.Pipe(duplex=False)
        messages_in, messages_out = ctx.Pipe(duplex=False)
        parent = (os.getpid(), dict(os.environ), list(sys.path))
        proc = ctx.Process(target=_worker_main,
                           args=(slot, jobs_in, messages_out, shared_blob, parent),
                           name=f"unlearn-{slot.label}", daemon=True)
        try:
            with _main_script_left_out():
                proc.start()  # hands it `shared` through its start-up pipe, read at once
        except OSError as exc:  # it died before reading it: a start-up failure like any other
            for end in (jobs_in, jobs_out, messages_in, messages_out):
                end.close()
            start_budget -= 1
            last_exit = f"could not start: {exc}"
            free.append(slot)
            if proc.pid is not None:
                proc.kill()
                proc.join(timeout=POLL_SECONDS)
            return
        # Only the worker may hold its ends: its death must close them (end of file here).
        jobs_in.close()
        messages_out.close()
        os.set_blocking(messages_in.fileno(), False)
        workers.append(_Worker(slot, proc, jobs_out, messages_in, time.monotonic()))

    def finish(job: Job, outcome: JobOutcome) -> None:
        if job.id not in outcomes:
            outcomes[job.id] = outcome
            emit("finished", job.id, outcome)

    def feed(w: _Worker) -> None:
        if not pending:
            w.stopping = True
            _send_quietly(w, None)
            return
        w.job = pending.popleft()
        w.job_started = time.monotonic()
        emit("start", w.job.id, w.slot.label)
        _send_quietly(w, w.job)  # a worker dead meanwhile is found by its sentinel

    def handle(w: _Worker, kind: str, job_id: str, value: Any) -> None:
        if kind == "ready":
            w.pid = value
            emit("worker", w.slot.label, value)
            feed(w)
        elif kind == "progress":
            emit("progress", job_id, value)
        elif kind == "result":
            if on_result(job_id, value):
                emit("progress", job_id, 1)
        elif kind == "finished":
            job, w.job = w.job, None
            if job is not None:
                finish(job, value)
            feed(w)

    def bury(w: _Worker) -> None:
        """A worker is gone: its job goes back to the queue (or fails), its slot is free."""
        nonlocal start_budget, last_exit
        workers.remove(w)
        w.proc.join(timeout=POLL_SECONDS)  # it is dead or dying: reap it
        w.close()
        free.append(w.slot)
        code = w.proc.exitcode
        last_exit = f"exit code {code}" if code is not None else "no exit code"
        if w.pid is None:
            start_budget -= 1
        job = w.job
        if job is None:
            return
        tries[job.id] += 1
        if tries[job.id] < MAX_TRIES:
            pending.appendleft(job)
            return
        seconds = time.monotonic() - w.job_started
        finish(job, JobOutcome(job.id, False, seconds,
                               f"worker {w.slot.label} died ({last_exit}) while running it, "
                               f"{tries[job.id]} times"))

    # SIGTERM (timeout, a scheduler) stops the workers as Ctrl-C does, instead of orphaning them.
    previous = _on_sigterm_raise_interrupt()
    try:
        while len(outcomes) < len(jobs):
            while pending and free and start_budget > 0:
                start(free.pop(0))
            if not workers:
                for job in pending:
                    finish(job, JobOutcome(job.id, False, 0.0, "not run: workers kept dying at "
                                           f"start-up ({last_exit})"))
                pending.clear()
                break
            ready = set(wait([w.messages for w in workers] + [w.proc.sentinel for w in workers],
                             timeout=POLL_SECONDS))
            for w in list(workers):
                gone = w.proc.sentinel in ready or not w.proc.is_alive()
                if w.messages in ready or gone:
                    w.read()  # after its death: everything it wrote, up to end of file
                try:
                    for message in w.whole_messages():
                        handle(w, *message)
                except (pickle.UnpicklingError, ValueError, EOFError, TypeError):
                    w.proc.kill()  # a garbled message: count it as the worker's death
                    gone = True
                if w.pid is None and time.monotonic() - w.born > STARTUP_SECONDS:
                    w.proc.kill()
                    gone = True
                if gone or w.closed:
                    w.proc.kill()  # no-op if dead; a worker that closed its pipe is done for
                    bury(w)
    except BaseException:
        _stop(workers)
        raise
    finally:
        _restore_sigterm(previous)
    for w in workers:
        if not w.stopping:
            _send_quietly(w, None)
    deadline = time.monotonic() + STOP_SECONDS
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    _stop(workers)
    return [outcomes[job.id] for job in jobs]


def _send_quietly(w: _Worker, message: Job | None) -> None:
    """Send a job (or None: stop) to a worker; a dead worker's broken pipe is found elsewhere.

    A worker reads its job pipe whenever it is idle, and a job is a few kB, so this never waits
    on a live worker.
    """
    try:
        w.jobs.send(message)
    except OSError:
        pass


def _stop(workers: Sequence[_Worker]) -> None:
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()
    for w in workers:
        w.proc.join(timeout=5)
        if w.proc.is_alive():  # pragma: no cover - a worker stuck in native code
            w.proc.kill()
            w.proc.join(timeout=5)
        w.close()


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
