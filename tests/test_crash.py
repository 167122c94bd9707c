"""Kill `train-refs` mid-run (kill -9, Ctrl-C); the rerun trains only what is missing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from unlearn_cli import train_refs
from unlearn_cli.config import load_config
from unlearn_cli.store import REFERENCE, Store

SLOW = ["train.epochs=40", "launch.chunk_size=1", "launch.workers=2"]
N = 12


def _start(store: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "unlearn_cli", "train-refs", "--num-models", str(N),
            "--store", str(store)]
    for s in SLOW:
        args += ["--set", s]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])


def _wait_for_models(store: Path, proc: subprocess.Popen, count: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(Store(store).done_seeds(REFERENCE)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"train-refs ended early: {proc.stdout.read().decode()}")
        time.sleep(0.05)
    raise AssertionError("no models appeared in time")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until_gone(pgid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (its launcher workers), read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_for_workers(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = _children(proc.pid)
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not start in time")


def _wait_pids_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait (bounded) for the PIDs to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and "Z" not in (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3])]
        time.sleep(0.05)
    return alive


def _snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file() and p.name in ("model.pt", "outputs.npz")}


def test_kill_9_then_rerun_trains_each_model_once(tmp_path):
    store = tmp_path / "s"
    proc = _start(store)
    _wait_for_models(store, proc, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = set(Store(store).done_seeds(REFERENCE))
    assert 3 <= len(done_before) < N, "the kill came too late to test resuming"
    files_before = _snapshot(store)
    # A half-written file such as a killed write leaves behind.
    leftover = store / "reference" / "seed-000011" / ".outputs.npz.tmp-killed"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half")

    planned = []
    result = train_refs.run(load_config(None, SLOW), store, num_models=N,
                            on_plan=lambda todo, reused: planned.append((todo, reused)),
                            inline=True)
    # Only the missing models were trained, each once; the finished ones were not touched.
    assert sorted(result.trained) == sorted(set(range(N)) - done_before)
    assert set(result.reused) == done_before
    assert Store(store).done_seeds(REFERENCE) == list(range(N))
    files_after = _snapshot(store)
    for path, stamp in files_before.items():
        assert files_after[path] == stamp, f"{path} was rewritten"
    assert not list(store.rglob("*.tmp-*"))
    # A third run finds nothing to do.
    again = train_refs.run(load_config(None, SLOW), store, num_models=N, inline=True)
    assert again.trained == [] and not again.trained_original
    assert _snapshot(store) == files_after


def test_ctrl_c_stops_every_worker(tmp_path):
    store = tmp_path / "s"
    proc = _start(store)
    _wait_for_models(store, proc, 1)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out.decode()
    assert "interrupted" in out.decode() and "rerun the same command" in out.decode()
    _wait_until_gone(proc.pid)
    assert not _group_alive(proc.pid), "a worker outlived Ctrl-C"


def test_workers_die_with_their_parent(tmp_path):
    """Only the parent is killed (OOM killer, `kill -9 PID`): no orphan goes on writing."""
    store = tmp_path / "s"
    proc = _start(store)
    _wait_for_models(store, proc, 1)
    workers = _wait_for_workers(proc, 2)  # two workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    files = _snapshot(store)
    # The workers exit (each one of the PIDs seen before the kill); only then is the store final,
    # and it is what it was when the parent died: workers never write the store.
    assert not _wait_pids_gone(workers), "a worker outlived its parent"
    _wait_until_gone(proc.pid)
    assert not _group_alive(proc.pid), "a process of the command outlived its parent"
    assert _snapshot(store) == files, "something was written after the parent died"


def test_sigterm_stops_the_workers_like_ctrl_c(tmp_path):
    store = tmp_path / "s"
    proc = _start(store)
    _wait_for_models(store, proc, 1)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out.decode()
    _wait_until_gone(proc.pid)
    assert not _group_alive(proc.pid)
