"""The local launcher under fire: workers killed at random moments, many times, under CPU load.

What must hold every time: `run_jobs` returns (bounded here by a deadline), every job has one
outcome, a killed worker is replaced by a new process (a new PID), every result that arrives is
whole, and a message a worker left half-written is dropped with it.
"""

import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import pytest

from unlearn_cli.launch import MAX_TRIES, Job, Slot, run_jobs
from unlearn_cli.launch_local import HEADER, _Worker

ROUNDS = 2
JOBS = 20  # per round
KILLS_PER_ROUND = 8
RUN_DEADLINE = 60.0  # seconds one round may take before the test calls it a hang


def _busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _one_round(seed: int) -> dict:
    rng = random.Random(seed)
    jobs = [Job(f"r{seed}-{i}", "launch_jobs:blob_job",
                {"value": seed * 1000 + i, "count": 3, "size": 300_000, "pause": 0.05}, 3)
            for i in range(JOBS)]
    slots = [Slot("cpu", {}, 1, f"cpu#{k}") for k in range(2)]
    lock = threading.Lock()
    live: dict[str, int] = {}  # label -> pid of its current worker
    pids: list[int] = []
    results: dict[tuple, dict] = {}
    progress = 0

    def on_event(kind, label, value):
        nonlocal progress
        with lock:
            if kind == "worker":
                live[label] = value
                pids.append(value)
            elif kind == "progress":
                progress += value

    def on_result(job_id, item):
        assert hashlib.sha256(item["blob"]).hexdigest() == item["sha"], "a torn result arrived"
        assert item["tag"] == "shared-ok"
        with lock:
            new = item["key"] not in results
            results.setdefault(item["key"], item)
        return new

    box: dict = {}

    def target():
        box["outcomes"] = run_jobs(jobs, slots, inline=False, on_event=on_event,
                                   on_result=on_result, shared={"tag": "shared-ok"})

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    killed = []
    deadline = time.monotonic() + RUN_DEADLINE
    while runner.is_alive() and len(killed) < KILLS_PER_ROUND and time.monotonic() < deadline:
        # Workers fork from a warm server in milliseconds, so a round is short: kill often.
        time.sleep(rng.uniform(0.02, 0.2))
        with lock:
            victims = [p for p in live.values() if p not in killed]
        if victims:
            victim = rng.choice(victims)
            try:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            except ProcessLookupError:
                pass
    runner.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not runner.is_alive(), f"run_jobs hung (round {seed}, {len(killed)} kills)"
    return {"outcomes": box["outcomes"], "killed": killed, "pids": pids, "results": results,
            "progress": progress, "jobs": jobs}


@pytest.mark.slow  # ~8 s idle, ~30 s on a loaded 2-core machine
def test_random_kills_under_load_always_finish():
    load = [_busy_loop() for _ in range(2)]
    try:
        rounds = [_one_round(seed) for seed in range(ROUNDS)]
    finally:
        for proc in load:
            proc.kill()
            proc.wait(timeout=10)
    total_kills = 0
    for r in rounds:
        outcomes = r["outcomes"]
        assert [o.id for o in outcomes] == [j.id for j in r["jobs"]]
        for o in outcomes:
            assert o.ok or f"{MAX_TRIES} times" in o.error, o.error
        # Each finished job delivered all of its results, each counted once.
        for job, o in zip(r["jobs"], outcomes):
            if o.ok:
                assert all((job.payload["value"], k) in r["results"] for k in range(3))
        assert r["progress"] == len(r["results"])
        # A killed worker is replaced by a new process: PIDs are never reused by the launcher,
        # and every killed PID was followed by a fresh one while work remained.
        assert len(r["pids"]) == len(set(r["pids"]))
        assert len(r["pids"]) >= 2 + len(r["killed"]) - 2  # the last kills may end the run
        total_kills += len(r["killed"])
    assert total_kills >= ROUNDS * KILLS_PER_ROUND // 2, "too few kills landed to test anything"


def test_a_half_written_message_is_dropped_with_its_worker():
    read_fd, write_fd = os.pipe()
    first = pickle.dumps(("progress", "job-1", 1))
    os.write(write_fd, HEADER.pack(len(first)) + first)
    second = pickle.dumps(("result", "job-1", b"y" * 1000))
    os.write(write_fd, HEADER.pack(len(second)) + second[:500])  # then the worker dies
    os.close(write_fd)
    conn = Connection(read_fd, writable=False)
    os.set_blocking(read_fd, False)
    w = _Worker(Slot("cpu", {}, 1, "cpu#0"), None, None, conn, time.monotonic())
    w.read()
    assert w.closed  # end of file: the worker is gone
    assert w.whole_messages() == [("progress", "job-1", 1)]
    assert len(w.inbox) == HEADER.size + 500  # the torn message is never unpickled
    conn.close()
