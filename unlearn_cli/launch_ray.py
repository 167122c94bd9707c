"""The Ray backend: the launcher's jobs on a cluster, one long-lived Ray actor per slot. The only
module that imports ray.

Each slot gets one actor (`SlotWorker`), killed when the run ends: a GPU slot's actor asks Ray
for `1 / workers_per_gpu` GPU (Ray pins it with CUDA_VISIBLE_DEVICES before torch is imported), a
CPU slot's for `launch.threads` CPUs. Start-up: Ray starts a new process for each actor (it has no
fork server), which imports torch and the job modules in its constructor (`launch.PRELOAD`, what
the local fork server imports), seconds of CPU. So `train-refs` and `apply` call `prestart` first
thing, as they start the local fork server: a background thread joins Ray and creates the
actors, whose start overlaps the command's own imports and checks; the run adopts them.
The actor keeps what a local worker process keeps between jobs: torch imported, the run's shared
inputs resolved once (so
`context.context` reuses the data already on the device), and the per-process caches of
`training` and `models` (warm-up, compiled forwards, the reused module). The driver hands each
actor one job at a time; the actor runs `launch.job_messages` and streams its messages back (a
generator method), so the driver receives each finished model as soon as it is made, anywhere in
the cluster, and writes it to the store itself: worker nodes need no shared filesystem and can
never leave a half-written file. The shared inputs (split, dataset arrays, original model) are
put in the object store once by the driver; Ray copies them to each node once.

CPU slots use actors too: one code path, and the shared inputs and contexts are reused between a
slot's jobs (a Ray task would deserialise them and rebuild its context for every job).

Faults: an actor that dies (its process killed, its node lost: Ray's ActorDiedError) is replaced
by a new one; its job goes back to the queue for the next free actor, at most `launch.MAX_TRIES`
runs in all, then fails with its id. The driver keeps what an earlier try already delivered (the
store's writer skips a model stored twice). An actor found dead when it is handed a job costs
that job a try. Actors that die before they are ready are replaced a bounded number of times, and
actors that Ray cannot place (no free resources) fail the remaining jobs after STARTUP_SECONDS.
A job that raises is reported once by `job_messages`, never retried (Ray's own restarts and
retries are off). Ctrl-C kills every actor (the job it runs dies with it) and disconnects. Every
wait has a timeout.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UnlearnError
from .launch import (
    MAX_TRIES,
    PRELOAD,
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

POLL_SECONDS = 0.1  # the longest the driver waits before it looks at every actor again
GET_SECONDS = 60.0  # fetching a message that Ray says is ready; longer means its node is gone
STARTUP_SECONDS = 300.0  # jobs wait this long for an actor Ray cannot place, then fail
CONNECT_SECONDS = 300.0  # the longest the command waits for `prestart` to join (or start) Ray
EXIT_WAIT_SECONDS = 30.0  # the longest a command that ends early waits for `prestart` at exit
INSTALL_HINT = "pip install 'unlearn-cli[ray]' (or `make install`, which includes it)"

# owned: this process started the Ray instance it is connected to; joined: it joined a running
# cluster itself (not a connection it already had, as a notebook's or a test's)
_state = {"owned": False, "joined": False}
TRACE_ENV = "UNLEARN_RAY_TRACE"  # a file: append this command's timeline to it (benchmarks)
TRACE_SECONDS = 5.0  # the longest the driver waits for an actor's timeline
_trace: list[tuple[str, float]] = []


def mark(what: str, at: float | None = None) -> None:
    """Note when something happened (wall clock), for the timeline UNLEARN_RAY_TRACE asks for."""
    if os.environ.get(TRACE_ENV):
        _trace.append((what, time.time() if at is None else at))


def _write_trace() -> None:
    path = os.environ.get(TRACE_ENV)
    if path and _trace:
        import json

        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": sys.argv[1:3], "events": _trace}) + "\n")
        _trace.clear()


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
    Ray (a notebook, a test) keeps its connection. If `prestart` is connecting, its result.
    """
    early = _early.get("done")
    if early is not None:
        if not early.wait(CONNECT_SECONDS):
            raise UnlearnError(f"--address {address}: Ray did not answer in {CONNECT_SECONDS:.0f}"
                               "s; check the cluster (`ray status`), or use --backend local")
        error = _early.pop("error", None)
        if isinstance(error, UnlearnError):  # no cluster there: say so (once)
            raise error
    return _connect(address)


def _listening(address: str) -> str | None:
    """For a `host:port` address: why nothing answers there (a TCP connection within
    PROBE_SECONDS), else None. `ray.init` itself retries such an address for about 2 minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return None  # auto, local, ray://...: Ray's own lookup
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


PROBE_SECONDS = 5.0


def _connect(address: str) -> Any:
    ray = _ray()
    if ray.is_initialized():
        return ray
    mark("connect")
    silent = _listening(address)
    if silent is not None:
        raise UnlearnError(
            f"--address {address}: no Ray cluster found at {address} (nothing answers there: "
            f"{silent}); start one with `ray start --head` (see the README), give its HEAD:6379, "
            "or use --address local for a private one on this machine"
        )
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(address="local", **quiet)  # a new instance even if one runs on this node
            _state["owned"] = True
        else:
            ray.init(address=address, **quiet)
            _state["joined"] = True
    except ConnectionError as exc:
        where = "RAY_ADDRESS or a running `ray start`" if address == "auto" else address
        raise UnlearnError(
            f"--address {address}: no Ray cluster found at {where} ({str(exc).splitlines()[0]}); "
            "start one with `ray start --head` (see the README), give its HEAD:6379, or use "
            "--address local for a private one on this machine"
        ) from None
    mark("connected")
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
    """Shut down a private instance this command started; leave a joined cluster running, and
    the connection too if this process had it before. (Ray's own exit handler would disconnect
    too, but first sleeps 0.5 s for worker logs to print, which `log_to_driver=False` turned off.)
    """
    if _state["owned"] or _state["joined"]:
        _ray().shutdown()
        _state["owned"] = _state["joined"] = False
    park = _early.get("park")
    _early.clear()
    if park is not None:
        park.set()


# What `prestart` set going: "done" (an Event, set once it has joined Ray and created the
# actors), "error" (why it could not join), "actors" ([(slot, handle)] not yet adopted by a run),
# "park" (an Event that lets its thread end).
_early: dict[str, Any] = {}


def prestart(launch: Any, *, num_jobs: int) -> None:
    """Join the cluster and create the slots' actors now, in a background thread, so that Ray's
    start of their processes and their imports (torch and the job modules, `launch.PRELOAD`)
    overlap the command's own imports and checks. The run then adopts these actors
    (`run_jobs`); it plans its slots again, and kills actors it has no slot for. Calling it
    again before a run has adopted them does nothing. A command that stops before its run
    leaves them to Ray, which kills a driver's actors when the driver exits.
    """
    if _early or num_jobs < 1:
        return
    mark("prestart")
    if os.environ.get(TRACE_ENV):  # runs after Ray's own exit handler: when the command ends
        atexit.register(lambda: (mark(f"driver cpu {time.process_time():.2f}s"), mark("exit"),
                                 _write_trace()))
    _early.update(done=threading.Event(), actors=[], park=threading.Event())
    threading.Thread(target=_prestart, args=(launch, num_jobs, _early["done"], _early["park"]),
                     name="unlearn-ray-prestart", daemon=True).start()


def _prestart(launch: Any, num_jobs: int, done: threading.Event, park: threading.Event) -> None:
    try:
        _ray()
        # Registered after Ray's own exit handler (ray.shutdown), so run before it: a command
        # that ends while this thread is still joining Ray lets it finish first (bounded).
        atexit.register(_at_exit, done)
        ray = _connect(launch.address)
    except BaseException as exc:  # noqa: BLE001 - connect() raises it in the command's thread
        _early["error"] = exc
        done.set()
        return
    try:
        worker_class = ray.remote(SlotWorker)
        for slot in _plan(ray, launch, num_jobs):
            _early["actors"].append((slot, _create(worker_class, slot)))
            mark(f"create {slot.label}")
    except Exception:  # noqa: BLE001 - the run plans again and reports what is wrong
        pass
    done.set()
    # A private instance's processes die with the thread that started them (Ray has the kernel
    # kill them when their parent thread ends: PR_SET_PDEATHSIG), so this thread lives on until
    # the instance is shut down.
    if _state["owned"]:
        park.wait()


def _at_exit(done: threading.Event) -> None:
    done.wait(EXIT_WAIT_SECONDS)
    mark("exit begins")


def _create(worker_class: Any, slot: Slot) -> Any:
    """A new actor for `slot` (Ray starts its process and runs its constructor meanwhile)."""
    return worker_class.options(**actor_options(slot)).remote(slot.device, slot.threads,
                                                              bool(os.environ.get(TRACE_ENV)))


def _adopt(slot: Slot) -> Any:
    """An actor `prestart` created for a slot like this one (same device and resources), or None."""
    early = _early.get("actors") or []
    for k, (made_for, handle) in enumerate(early):
        if (made_for.device, made_for.threads, actor_options(made_for)) == (
                slot.device, slot.threads, actor_options(slot)):
            del early[k]
            return handle
    return None


def _drop_early(ray: Any) -> None:
    """Kill the actors `prestart` created that no slot adopted."""
    early = _early.get("actors") or []
    while early:
        _kill(ray, early.pop()[1])


def plan_slots(launch: Any, *, num_jobs: int) -> list[Slot]:
    """Slots for the cluster's resources: how many jobs run at once, and what each asks for.

    A CPU job asks for launch.threads CPUs; a GPU job for 1 / workers_per_gpu GPU (Ray sets its
    CUDA_VISIBLE_DEVICES). --workers, when given, caps the jobs in flight.
    """
    device = check_device_spec(launch.device)
    mark("plan")
    return _plan(connect(launch.address), launch, num_jobs, device)


def _plan(ray: Any, launch: Any, num_jobs: int, device: str | None = None) -> list[Slot]:
    device = device or check_device_spec(launch.device)
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


def actor_options(slot: Slot) -> dict[str, Any]:
    """What a slot's actor asks Ray for: a GPU slot 1 / workers_per_gpu GPU and one CPU to feed
    it, a CPU slot its torch threads in CPUs. Ray restarts and retries nothing itself: the driver
    replaces a dead actor and decides whether its job runs again."""
    resources = ({"num_cpus": 1, "num_gpus": slot.gpu_share} if slot.gpu_share
                 else {"num_cpus": slot.threads})
    return {**resources, "max_restarts": 0, "max_task_retries": 0}


class SlotWorker:
    """One slot's long-lived worker, a Ray actor: runs the jobs handed to it, one at a time.

    It is created before the run's shared inputs exist (`prestart`), and imports what jobs
    import meanwhile; `ready` then hands it the run's shared inputs.
    """

    def __init__(self, device: str, threads: int, trace: bool = False) -> None:
        self.stamps: list[tuple[str, float]] | None = [("init", time.time())] if trace else None
        # Before torch is imported, which reads its thread count from here (set_threads covers
        # the rest). Imports as the local fork server's: a job's first seconds are not spent
        # importing; one that fails is left to the job, which reports it.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        for module in PRELOAD:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
        set_threads(threads)
        self._stamp(f"imported (process cpu {time.process_time():.2f}s)")
        self.device, self.threads = device, threads
        self.shared: Mapping[str, Any] | None = None

    def ready(self, shared: Mapping[str, Any] | None) -> int:
        """Keep the run's shared inputs (Ray resolves the driver's object reference here, once;
        every job of the run gets this same object, so caches keyed on it, `context.context`,
        hold between jobs); this actor's process id."""
        self.shared = shared
        return os.getpid()

    def run(self, job: Job) -> Any:
        """One job's messages (see `launch.job_messages`), streamed back as they come."""
        set_threads(self.threads)  # once torch is imported; a job may have changed them
        self._stamp(f"run {job.id}")
        for message in job_messages(job, self.device, self.shared):
            self._stamp(f"{message[0]} {job.id}")
            yield message

    def _stamp(self, what: str) -> None:
        if self.stamps is not None:
            self.stamps.append((what, time.time()))

    def timeline(self) -> list[tuple[str, float]]:
        """When this actor started, imported, and ran each job and message (wall clock), if it
        was created for a trace (UNLEARN_RAY_TRACE)."""
        return self.stamps or []


def run_jobs(jobs: Sequence[Job], slots: Sequence[Slot], *, address: str,
             shared: Mapping[str, Any] | None, on_result: ResultFn,
             emit: EventFn) -> list[JobOutcome]:
    """Run the jobs on one Ray actor per slot; see the module docstring."""
    mark("run_jobs")
    ray = connect(address)
    try:
        emit("cluster", "", describe(ray))
        mark("described")
        if not jobs:
            return []
        return _run(ray, jobs, slots, shared, on_result, emit)
    finally:
        _drop_early(ray)
        disconnect()
        mark("disconnected")
        _write_trace()


@dataclasses.dataclass(eq=False)
class _Actor:
    """Everything the driver knows about one slot's actor."""

    slot: Slot
    handle: Any  # the Ray actor handle
    ready: Any  # ObjectRef of its pid; None once it has answered
    pid: int | None = None
    job: Job | None = None  # the job it runs
    stream: Any = None  # that job's ObjectRefGenerator
    job_started: float = 0.0


def _run(ray: Any, jobs: Sequence[Job], slots: Sequence[Slot],
         shared: Mapping[str, Any] | None, on_result: ResultFn,
         emit: EventFn) -> list[JobOutcome]:
    from ray import exceptions as rex

    worker_class = ray.remote(SlotWorker)
    # Lazy inputs (the dataset) are read here, once; Ray ships them to each node once, and each
    # actor resolves the reference once, in `ready`.
    shared_ref = ray.put(resolve_shared(shared)) if shared is not None else None
    mark("shared put")
    pending = collections.deque(jobs)
    outcomes: dict[str, JobOutcome] = {}
    tries: collections.Counter[str] = collections.Counter()
    actors: list[_Actor] = []
    free = list(slots)  # slots without an actor
    # A crash loop must end: actors that die before they are ready are replaced this many times.
    start_budget = 2 * len(slots) + 2
    last_loss = ""
    waiting_since = time.monotonic()  # since when jobs wait with no actor up

    def start(slot: Slot) -> None:
        handle = _adopt(slot) or _create(worker_class, slot)
        actors.append(_Actor(slot, handle, handle.ready.remote(shared_ref)))
        mark(f"start {slot.label}")

    def collect(a: _Actor) -> None:
        if os.environ.get(TRACE_ENV):
            try:
                for what, at in ray.get(a.handle.timeline.remote(), timeout=TRACE_SECONDS):
                    mark(f"{a.slot.label}: {what}", at)
            except Exception:  # noqa: BLE001 - a trace only
                pass

    def retire(a: _Actor, kill: bool = True) -> None:
        if kill:
            collect(a)
        actors.remove(a)
        free.append(a.slot)
        if kill:
            _kill(ray, a.handle)

    def finish(job: Job, outcome: JobOutcome) -> None:
        if job.id not in outcomes:
            outcomes[job.id] = outcome
            emit("finished", job.id, outcome)

    def give(a: _Actor, job: Job) -> None:
        a.job, a.job_started = job, time.monotonic()
        a.stream = a.handle.run.options(name=f"unlearn:{job.id}").remote(job)
        emit("start", job.id, a.slot.label)

    def done(a: _Actor, outcome: JobOutcome) -> None:
        job, a.job, a.stream = a.job, None, None
        if job is not None:
            finish(job, outcome)

    def lost(a: _Actor, why: str | BaseException) -> None:
        """The actor is dead (or unreachable): replace it; its job runs again or fails."""
        nonlocal start_budget, last_loss
        # An actor that only stopped answering is killed, so that it cannot run on unseen; one
        # Ray reports dead is not (killing it again only makes Ray log an error).
        retire(a, kill=not isinstance(why, rex.ActorDiedError))
        why = why if isinstance(why, str) else type(why).__name__
        last_loss = why
        if a.pid is None:
            start_budget -= 1
        job = a.job
        if job is None:
            return
        tries[job.id] += 1
        if tries[job.id] < MAX_TRIES:
            pending.appendleft(job)
        else:
            finish(job, JobOutcome(job.id, False, time.monotonic() - a.job_started,
                                   f"its Ray actor or node was lost {tries[job.id]} times "
                                   f"(last: {why})"))

    def fail_pending(why: str) -> None:
        while pending:
            job = pending.popleft()
            finish(job, JobOutcome(job.id, False, 0.0, f"not run: {why}"))

    def on_ready(a: _Actor) -> None:
        try:
            a.pid = ray.get(a.ready, timeout=GET_SECONDS)
        except (rex.RayError, TimeoutError) as exc:
            lost(a, exc)
            return
        a.ready = None
        mark(f"ready {a.slot.label}")
        emit("worker", a.slot.label, a.pid)

    def on_message(a: _Actor) -> None:
        job = a.job
        try:
            ref = next(a.stream)
        except StopIteration:  # ended without its finished message: count it as lost
            lost(a, "the job's stream ended early")
            return
        try:
            kind, value = ray.get(ref, timeout=GET_SECONDS)
        except rex.RayTaskError as exc:  # raised outside the job (a result Ray cannot send)
            cause = exc.cause if exc.cause is not None else exc
            done(a, JobOutcome(job.id, False, time.monotonic() - a.job_started,
                               f"{type(cause).__name__}: {cause}".splitlines()[0]))
            return
        except (rex.RayError, TimeoutError) as exc:  # ActorDiedError: process or node lost
            lost(a, exc)
            return
        mark(f"{kind} {a.slot.label} {job.id}")
        if kind == "result":
            if on_result(job.id, value):
                emit("progress", job.id, 1)
        elif kind == "progress":
            emit("progress", job.id, value)
        else:
            done(a, value)

    try:
        while len(outcomes) < len(jobs):
            while pending and free and start_budget > 0:
                start(free.pop(0))
            _drop_early(ray)  # every slot has its actor: the others free their resources
            for a in list(actors):
                if a.ready is None and a.job is None:
                    if pending:
                        give(a, pending.popleft())
                    else:  # nothing left for it: free its resources for the cluster's others
                        retire(a)
            if not pending or any(a.ready is None for a in actors):
                waiting_since = time.monotonic()
            if pending and not actors:
                fail_pending(f"Ray actors kept dying at start-up (last: {last_loss})")
                break
            if pending and time.monotonic() - waiting_since > STARTUP_SECONDS:
                fail_pending(_unplaced(ray, slots[0]))
                break
            watched = {a.ready if a.ready is not None else a.stream: a
                       for a in actors if a.ready is not None or a.stream is not None}
            if not watched:  # pragma: no cover - every actor idle with jobs pending cannot last
                time.sleep(POLL_SECONDS)
                continue
            # Back as soon as one message is ready (not at the poll's end), then take every
            # ready one, so that a busy stream cannot keep the others waiting.
            keys = list(watched)
            ready, _ = ray.wait(keys, num_returns=1, timeout=POLL_SECONDS)
            if ready and len(keys) > 1:
                ready, _ = ray.wait(keys, num_returns=len(keys), timeout=0)
            for key in ready:
                a = watched[key]
                if a.ready is not None:
                    on_ready(a)
                else:
                    on_message(a)
    finally:  # done, failed or interrupted: no actor outlives the run
        for a in actors:
            collect(a)
        mark("jobs done")
        for a in actors:
            _kill(ray, a.handle)
    return [outcomes[job.id] for job in jobs]


def _unplaced(ray: Any, slot: Slot) -> str:
    """Why jobs were not run: Ray could place none of their actors in STARTUP_SECONDS."""
    ask = actor_options(slot)
    free = ray.available_resources()
    gpu = f" and {ask['num_gpus']:g} GPU" if "num_gpus" in ask else ""
    return (f"no Ray actor could start in {STARTUP_SECONDS:.0f}s: each asks for "
            f"{ask['num_cpus']:g} CPU(s){gpu} on one node, and the cluster has "
            f"{free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free; free or add "
            f"nodes, or lower launch.threads (CPU) or raise --workers-per-gpu (GPU)")


def _kill(ray: Any, handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead or gone with its node: nothing to kill
        pass
