"""Helper processes that share CPU-bound work with the command's own process.

Used by `score`: the official metric's epsilon engine (`metrics`) and the seed metric's fits
(`attacks`). The work is cut into parts whose results do not depend on who computes them; this
process works through the parts from the back while the helpers are handed parts from the front
(`share`). A helper still starting, slow or lost never makes a call slower than doing everything
here by more than a short, bounded wait: a part a helper has not finished by then is done here.

Where the helpers come from:
- inside `forked(size)` (what `score` uses), on a platform with fork and while this process runs
  no other thread: `size` processes forked from this one when the block starts, so they have
  numpy and this package imported already and are ready in milliseconds (importing joblib and
  starting loky's fresh interpreters cost a command about 0.7 s); ended when the block ends;
- otherwise loky processes (joblib's executor, installed with scikit-learn): started once,
  reused by later calls, replaced if one died, and ended after `IDLE_TIMEOUT_S` idle seconds or
  when this process exits. loky starts them without re-running the caller's main script, so
  scripts need no `if __name__ == "__main__"` guard. Forking while other threads run could copy
  a lock one of them holds into the child, so then loky it is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

IDLE_TIMEOUT_S = 300  # an idle helper process exits after this many seconds

T = TypeVar("T")


def cores() -> int:
    """The number of cores this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_FORKED: list[tuple[int, concurrent.futures.Executor]] = []  # the pools of open `forked` blocks
STOP_TIMEOUT_S = 10.0  # a forked helper still running this long after its block ends is ended


def pool(size: int) -> concurrent.futures.Executor:
    """`size` helper processes (see the module doc): the pool of the innermost `forked` block
    of that size if it still works, else loky's reusable pool."""
    if _FORKED and _FORKED[-1][0] == size and not getattr(_FORKED[-1][1], "_broken", False):
        return _FORKED[-1][1]
    from joblib.externals.loky import get_reusable_executor

    return get_reusable_executor(max_workers=size, timeout=IDLE_TIMEOUT_S)


def _fork_is_safe() -> bool:
    """Whether forking now copies no other thread's state: fork exists and no thread runs."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


@contextlib.contextmanager
def forked(size: int) -> Iterator[None]:
    """Within the block, `pool(size)` is `size` processes forked from this one as the block
    starts, when that is safe (`_fork_is_safe`); they are ended when it ends (a helper still
    busy STOP_TIMEOUT_S later is terminated). Without helpers (size < 1), or when forking is
    not safe, nothing changes."""
    if size < 1 or not _fork_is_safe():
        yield
        return
    executor: concurrent.futures.ProcessPoolExecutor | None = None
    try:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=size, mp_context=multiprocessing.get_context("fork"),
            initializer=_ignore_interrupts,
        )
        executor.submit(int).result(timeout=STOP_TIMEOUT_S)  # fork them now, before any thread
        _FORKED.append((size, executor))
    except Exception:  # noqa: BLE001 - no forked helpers after all: loky's, as elsewhere
        if executor is not None:
            _stop(executor)
        executor = None
    try:
        yield
    finally:
        if executor is not None:
            _FORKED.remove((size, executor))
            _stop(executor)


def _ignore_interrupts() -> None:
    """In a forked helper: Ctrl-C is for the command, which ends its helpers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(executor: concurrent.futures.Executor) -> None:
    """End a forked pool: idle helpers exit; one still busy STOP_TIMEOUT_S later is terminated
    (its result is not needed any more). The pool's own manager thread joins (reaps) the
    helpers; this waits for that thread, never joins a helper beside it (two waits on one
    process: the second finds it reaped already and would take it for alive)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    manager = getattr(executor, "_executor_manager_thread", None)
    executor.shutdown(wait=False, cancel_futures=True)
    if manager is None:  # no task was ever submitted: no helper was started
        return
    manager.join(STOP_TIMEOUT_S)
    if manager.is_alive():  # a helper is stuck in a task
        for process in processes:
            if process.exitcode is None:
                process.terminate()
        manager.join(STOP_TIMEOUT_S)


def share(
    num_parts: int,
    run_here: Callable[[int], T],
    task: Callable[[int], tuple[Callable[..., T], tuple[Any, ...]]],
    *,
    helpers: int,
    in_flight: int = 1,
    grace: float = 0.0,
) -> list[T]:
    """Results of parts 0..num_parts-1, computed here and by `helpers` helper processes.

    This process computes part i with `run_here(i)`, from the last part down; helpers are
    handed parts from the first up, `in_flight` at a time each, as `fn(*args)` for
    `(fn, args) = task(i)` (fn must be importable by name, args picklable). When this process
    runs out of parts, handed parts no helper has started are taken back and computed here, and
    those running are waited for until one deadline, `grace` times the longest part computed
    here (parts of about equal size keep that meaningful), then computed here; a helper's
    failure (a crash, a killed process) is the same as not finishing. Deterministic parts give
    the same results whoever computes them.
    """
    if helpers < 1 or num_parts < 2:
        return [run_here(i) for i in range(num_parts)]
    try:
        executor = pool(helpers)
    except Exception:  # noqa: BLE001 - no helper process can start here: all of it here
        return [run_here(i) for i in range(num_parts)]
    results: list[Any] = [None] * num_parts
    handed: dict[int, concurrent.futures.Future] = {}
    todo = collections.deque(range(num_parts))
    longest = 0.0  # seconds of the longest part computed here
    while todo:
        busy = sum(not future.done() for future in handed.values())
        while busy < helpers * in_flight and len(todo) > 1:
            i = todo.popleft()
            fn, args = task(i)
            try:
                handed[i] = executor.submit(fn, *args)
            except Exception:  # noqa: BLE001 - a broken pool: this part is done here
                todo.appendleft(i)
                break
            busy += 1
        i = todo.pop()
        start = time.perf_counter()
        results[i] = run_here(i)
        longest = max(longest, time.perf_counter() - start)
    # Parts no helper has started are taken back now; those running get one shared deadline.
    late = [i for i, future in handed.items() if future.cancel()]
    deadline = time.monotonic() + grace * longest
    for i, future in handed.items():
        if i in late:
            continue
        try:
            results[i] = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - not back in time, or the helper failed
            late.append(i)
    for i in late:
        results[i] = run_here(i)
    return results
