"""The Ray backend on a private two-node cluster simulated on this machine (CPU).

One Ray session serves the whole module (Ray takes seconds to start): a head node and one worker
node of one CPU each, shut down at the end. Tests run in file order; the GPU test adds a node
with fake GPUs and removes it; the node-loss test goes last because it removes the worker node.
Nothing here calls `ray stop` or kills by name. Ray's workers get this folder on their
PYTHONPATH, for the job targets of `ray_job_targets.py`.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from typer.testing import CliRunner

from unlearn_cli import apply, launch, launch_ray, train_refs
from unlearn_cli.cli import app
from unlearn_cli.config import load_config
from unlearn_cli.store import ORIGINAL, REFERENCE, UNLEARNED, Store

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'unlearn-cli[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster takes seconds to start on 2 cores

ROOT = Path(__file__).resolve().parents[1]
# chunk_size fixes how seeds are grouped into jobs, whatever the number of slots, so that both
# backends train exactly the same ensembles.
BASE = [s for s in FAST if not s.startswith("launch")] + ["launch.chunk_size=2"]
LOCAL = BASE + ["launch.workers=1"]
RAY = BASE + ["launch.backend=ray"]


@pytest.fixture(scope="module")
def cluster():
    # Ray's worker processes inherit the environment of the nodes started here.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), before) if p)
    try:
        c = Cluster(initialize_head=True, connect=True,
                    head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c, worker
        ray.shutdown()
        c.shutdown()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def _outputs(store, kind, seed=None, method=None):
    return Store(store).load_outputs(kind, seed, method)[0]


def _assert_same_outputs(a, b, kind, seeds, method=None):
    for seed in seeds:
        x, y = _outputs(a, kind, seed, method), _outputs(b, kind, seed, method)
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-6,
                                       err_msg=f"{kind} {seed} {key}")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "s"
    cfg = load_config(None, LOCAL)
    train_refs.run(cfg, root, num_models=4)
    apply.run(cfg, root, method_spec="finetune")
    return root


def test_train_refs_and_apply_on_ray_equal_the_local_backend(cluster, local_store, tmp_path):
    root = tmp_path / "ray"
    events = []
    cfg = load_config(None, RAY)
    result = train_refs.run(cfg, root, num_models=4, on_event=lambda *e: events.append(e))
    assert result.trained == [0, 1, 2, 3] and result.trained_original
    applied = apply.run(cfg, root, method_spec="finetune", on_event=lambda *e: events.append(e))
    assert applied.trained == [1_000_000 + i for i in range(4)]
    (line,) = {v for kind, _, v in events if kind == "cluster"}
    assert "Ray cluster at" in line and "2 node(s), 2 CPUs" in line
    assert sum(v for kind, _, v in events if kind == "progress") == 5 + 4
    _assert_same_outputs(root, local_store, REFERENCE, range(4))
    _assert_same_outputs(root, local_store, ORIGINAL, [None])
    _assert_same_outputs(root, local_store, UNLEARNED, range(1_000_000, 1_000_004), "finetune")
    assert not list(root.rglob("*.tmp-*"))
    # A rerun does only what is missing: nothing.
    again = train_refs.run(cfg, root, num_models=4)
    assert again.trained == [] and not again.trained_original


RAISES = '''
def odd_fails(model, data, params, *, device, seed):
    if seed % 2:
        raise RuntimeError("kaboom")
    return model
'''


def test_a_raising_job_is_reported_with_its_id_once(cluster, local_store, tmp_path):
    root = tmp_path / "raise"
    shutil.copytree(local_store, root)
    plugin = tmp_path / "raising.py"
    plugin.write_text(RAISES)
    spec = f"{plugin}:odd_fails"
    result = CliRunner().invoke(app, ["apply", "--method", spec, "--store", str(root),
                                      "--num-models", "4", "--backend", "ray",
                                      "--set", "launch.chunk_size=1"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "2 of 4 unlearning jobs failed" in out
    assert f"{spec}-1: method {spec!r} failed at seed 1000001: RuntimeError: kaboom" in out
    assert out.count("failed at seed 1000003") == 2  # once on the bar, once in the summary
    assert Store(root).done_seeds(UNLEARNED, spec) == [1_000_000, 1_000_002]


def _run_on_ray(jobs, slots, shared=None):
    """launch.run_jobs on the module's cluster: (outcomes, results by job id, events)."""
    results, events = {}, []

    def keep(job_id, item):
        results.setdefault(job_id, []).append(item)
        return True

    outcomes = launch.run_jobs(jobs, slots, backend="ray", shared=shared, on_result=keep,
                               on_event=lambda *e: events.append(e))
    return outcomes, results, events


def _job(name, target="whoami", **payload):
    return launch.Job(name, f"ray_job_targets:{target}", {"name": name, **payload})


def _gone(pids, seconds=30):
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not [p for p in pids if _alive(p)]


CPU_SLOTS = [launch.Slot("cpu", {}, 1, f"ray-cpu#{k}") for k in range(2)]


def test_a_slot_runs_its_jobs_in_one_long_lived_actor(cluster):
    shared = {"token": np.arange(4)}
    jobs = [_job(f"j{i}") for i in range(6)]
    outcomes, results, events = _run_on_ray(jobs, CPU_SLOTS, shared)
    assert all(o.ok for o in outcomes), outcomes
    rows = [r for job in jobs for r in results[job.id]]
    by_pid = {}
    for row in rows:
        by_pid.setdefault(row["pid"], []).append(row)
    # At most one actor process per slot (two) ran the six jobs: each ran every job handed to it,
    # one after the other (its count goes 1, 2, 3...), and kept the shared inputs it resolved once
    # (the same object for each of its jobs). Which actor ran how many is up to timing (a no-op
    # job is quick: the first actor up may run them all).
    workers = {pid for kind, _, pid in events if kind == "worker"}
    assert set(by_pid) <= workers and len(workers) <= 2
    for mine in by_pid.values():
        assert sorted(r["count"] for r in mine) == list(range(1, len(mine) + 1))
        assert len({r["shared_id"] for r in mine}) == 1 and {r["token"] for r in mine} == {6}
    assert sum(len(m) for m in by_pid.values()) == 6 and max(map(len, by_pid.values())) >= 3
    assert _gone(workers), "an actor outlived its run"


def test_prestarted_actors_are_adopted_by_the_run_and_the_spare_one_is_killed(cluster):
    """launch.prestart (what train-refs and apply call first thing) joins Ray and creates the
    slots' actors in the background, where they import torch before any job; the run then uses
    those very processes, hands them its shared inputs, and kills the actor it has no slot for."""
    launch.prestart(load_config(None, RAY).launch, num_jobs=2)
    assert launch_ray._early["done"].wait(60)
    early = [handle for _, handle in launch_ray._early["actors"]]
    assert len(early) == 2  # one per CPU of the cluster: launch.threads is 1
    pids = ray.get([handle.ready.remote(None) for handle in early], timeout=120)
    jobs = [_job("a"), _job("b")]
    outcomes, results, events = _run_on_ray(jobs, CPU_SLOTS[:1], {"token": np.arange(4)})
    assert all(o.ok for o in outcomes), outcomes
    (worker,) = [pid for kind, _, pid in events if kind == "worker"]
    assert worker in pids  # adopted: no new process was started
    rows = [r for job in jobs for r in results[job.id]]
    assert {r["pid"] for r in rows} == {worker} and {r["token"] for r in rows} == {6}
    assert all(r["torch_imported"] for r in rows)  # by the constructor, before the first job
    assert not launch_ray._early  # the next command prestarts its own
    assert _gone(pids), "a prestarted actor outlived the run"


def test_a_dead_actor_is_replaced_and_its_job_runs_again_in_a_new_one(cluster, tmp_path):
    marker = tmp_path / "pid"
    jobs = [_job("dies-once", "dies_once", marker=str(marker)),
            _job("always-dies", "always_dies"), _job("a"), _job("b")]
    outcomes, results, events = _run_on_ray(jobs, CPU_SLOTS)
    ok = {o.id: o for o in outcomes}
    assert ok["dies-once"].ok and ok["a"].ok and ok["b"].ok
    (rerun,) = results["dies-once"]
    dead = int(marker.read_text())
    assert rerun["pid"] != dead  # another actor, not the dead one
    assert not ok["always-dies"].ok
    assert f"lost {launch.MAX_TRIES} times" in ok["always-dies"].error
    starts = [job for kind, job, _ in events if kind == "start"]
    assert starts.count("dies-once") == 2 and starts.count("always-dies") == launch.MAX_TRIES
    assert starts.count("a") == starts.count("b") == 1  # not retried: their actors lived
    workers = [pid for kind, _, pid in events if kind == "worker"]
    # Each actor is a process of its own: replacements are new processes, none reused.
    assert len(set(workers)) == len(workers) >= 3 and {dead, rerun["pid"]} <= set(workers)
    assert _gone(workers)


def test_jobs_fail_with_a_clear_line_when_ray_cannot_place_an_actor(cluster, monkeypatch):
    monkeypatch.setattr(launch_ray, "STARTUP_SECONDS", 2.0)
    too_big = [launch.Slot("cpu", {}, 8, "ray-cpu#0")]  # 8 CPUs: no node has more than one
    start = time.monotonic()
    outcomes, results, events = _run_on_ray([_job("a"), _job("b")], too_big)
    assert time.monotonic() - start < 60
    assert not results and not [e for e in events if e[0] in ("worker", "start")]
    for outcome in outcomes:
        assert not outcome.ok
        assert outcome.error.startswith("not run: no Ray actor could start in 2s: each asks "
                                        "for 8 CPU(s) on one node")
        assert "lower launch.threads" in outcome.error

def test_gpu_slots_ask_ray_for_their_share_of_a_gpu(cluster):
    """A node with two fake GPUs (Ray schedules on the count; there is no GPU here)."""
    c, _ = cluster
    gpu_node = c.add_node(num_cpus=4, num_gpus=2)
    try:
        c.wait_for_nodes()
        cfg = load_config(None, RAY + ["launch.workers_per_gpu=2"])
        slots = launch_ray.plan_slots(cfg.launch, num_jobs=3)
        assert [(s.device, s.gpu_share) for s in slots] == [("cuda:0", 0.5)] * 3
        assert launch_ray.actor_options(slots[0]) == {
            "num_cpus": 1, "num_gpus": 0.5, "max_restarts": 0, "max_task_retries": 0}
        outcomes, results, _ = _run_on_ray([_job(f"g{i}", "resources") for i in range(4)],
                                           slots)
        assert all(o.ok for o in outcomes), outcomes
        rows = [r for rs in results.values() for r in rs]
        assert len(rows) == 4 and len({r["pid"] for r in rows}) <= 3
        for row in rows:
            assert row["assigned"] == {"CPU": 1.0, "GPU": 0.5}
            assert row["device"] == "cuda:0" and row["cuda_visible"] in {"0", "1"}
            assert not row["cuda_initialized"]  # neither the actor nor the job touched CUDA
        # Each actor keeps the one GPU Ray gave it for all of its jobs.
        assert len({(r["pid"], r["cuda_visible"]) for r in rows}) == len({r["pid"] for r in rows})
    finally:
        c.remove_node(gpu_node)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("GPU", 0) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not ray.cluster_resources().get("GPU", 0), "the fake GPU node was not removed"


def test_losing_a_node_mid_run_still_stores_each_model_once(cluster, tmp_path, monkeypatch):
    c, worker = cluster
    n = 24
    settings = BASE + ["launch.chunk_size=1", "train.engine=loop"]
    writes = {}
    original_save = Store.save_outputs

    def counting_save(self, kind, seed, *args, **kwargs):
        writes[(kind, seed)] = writes.get((kind, seed), 0) + 1
        return original_save(self, kind, seed, *args, **kwargs)

    monkeypatch.setattr(Store, "save_outputs", counting_save)
    root = tmp_path / "lost"
    stored_at_removal = []

    def remove_worker_node():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = len(Store(root).done_seeds(REFERENCE)) if (root / "reference").is_dir() else 0
            if done >= 4:
                stored_at_removal.append(done)
                c.remove_node(worker, allow_graceful=False)
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_worker_node, daemon=True)
    remover.start()
    events = []
    result = train_refs.run(load_config(None, settings + ["launch.backend=ray"]), root,
                            num_models=n, on_event=lambda *e: events.append(e))
    remover.join(timeout=10)
    assert stored_at_removal and stored_at_removal[0] < n, "the node was not removed mid-run"
    assert sorted(result.trained) == list(range(n)) and all(o.ok for o in result.outcomes)
    assert Store(root).done_seeds(REFERENCE) == list(range(n))
    assert set(writes.values()) == {1} and len(writes) == n + 1  # each model stored once
    assert not list(root.rglob("*.tmp-*"))
    retried = [job for kind, job, _ in events if kind == "start"]
    print(f"jobs started {len(retried)} times for {n + 1} jobs")
    local = tmp_path / "local"
    monkeypatch.undo()
    train_refs.run(load_config(None, settings + ["launch.workers=1"]), local, num_models=n)
    _assert_same_outputs(root, local, REFERENCE, range(n))


def _descendants(pid):
    """Every process below `pid` (children, their children...), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_cancels_every_task_and_keeps_finished_models(tmp_path):
    """A private Ray instance (--address local) in a subprocess; SIGINT to its process group."""
    store = tmp_path / "s"
    n = 10
    args = [sys.executable, "-m", "unlearn_cli", "train-refs", "--num-models", str(n),
            "--store", str(store), "--backend", "ray", "--address", "local",
            "--set", "train.epochs=20", "--set", "launch.chunk_size=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if len(Store(store).done_seeds(REFERENCE)) >= 2:
            break
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.1)
    else:
        raise AssertionError("no model was stored in time")
    started = _descendants(proc.pid)  # raylet, GCS, Ray workers...: what this command started
    assert started
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode()
    assert "interrupted" in out.decode()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in started if _alive(p)], "a Ray process outlived Ctrl-C"
    kept = Store(store).done_seeds(REFERENCE)
    assert 2 <= len(kept) < n
    assert not list(store.rglob("*.tmp-*"))  # an interrupted write removes its temp file
    # The rerun finishes only what is missing (locally: the store does not care who trained it).
    result = train_refs.run(load_config(None, ["train.epochs=20", "launch.chunk_size=1",
                                               "launch.workers=1"]), store, num_models=n)
    assert sorted(result.trained) == sorted(set(range(n)) - set(kept))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path):
    import socket

    port = _closed_port()
    assert "ConnectionRefusedError" in launch_ray._listening(f"127.0.0.1:{port}")
    for address in ("auto", "local", "ray://head:10001"):
        assert launch_ray._listening(address) is None
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert launch_ray._listening(f"127.0.0.1:{server.getsockname()[1]}") is None
    # The command, in a fresh process (not joined to any Ray): one line, exit 1, no 2-minute
    # wait in ray.init's retries.
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "unlearn_cli", "train-refs", "--num-models", "2", "--store",
         str(tmp_path / "s"), "--backend", "ray", "--address", f"127.0.0.1:{port}",
         *[x for s in FAST for x in ("--set", s)]],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines()
              if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stdout + proc.stderr
    assert f"no Ray cluster found at 127.0.0.1:{port} (nothing answers there" in errors[0]
    assert time.monotonic() - start < 60
