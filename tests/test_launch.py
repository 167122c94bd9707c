import os
import sys
import time

import pytest

from unlearn_cli import launch
from unlearn_cli.errors import UnlearnError
from unlearn_cli.launch import MAX_TRIES, Job, Slot, plan_slots, run_jobs


def _jobs(tmp_path, kinds):
    return [
        Job(f"job-{i}", f"launch_jobs:{kind}", {"out": str(tmp_path / f"out-{i}"), "value": i})
        for i, kind in enumerate(kinds)
    ]


def _pids(events):
    """label -> worker PIDs in the order they became ready."""
    out = {}
    for kind, label, value in events:
        if kind == "worker":
            out.setdefault(label, []).append(value)
    return out


def _wait_gone(pids, timeout=10.0):
    """Wait (bounded) until none of the PIDs is a live process; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.05)
    return alive


def test_two_workers_one_failing_job(tmp_path):
    jobs = _jobs(tmp_path, ["ok_job", "failing_job", "ok_job", "ok_job", "ok_job"])
    slots = plan_slots("cpu", workers=2, workers_per_gpu=1, num_jobs=len(jobs))
    assert len(slots) == 2
    events = []
    outcomes = run_jobs(jobs, slots, on_event=lambda *e: events.append(e))
    assert [o.ok for o in outcomes] == [True, False, True, True, True]
    assert outcomes[1].id == "job-1" and "ValueError: bad value 1" in outcomes[1].error
    assert "Traceback" in outcomes[1].detail
    pids = {int((tmp_path / f"out-{i}").read_text().split()[1]) for i in (0, 2, 3, 4)}
    workers = _pids(events)
    assert set(workers) <= {"cpu#0", "cpu#1"}  # one may still be importing torch at the end
    # Long-lived workers: the jobs ran in the workers that said ready, several jobs per process.
    assert pids <= {p for ps in workers.values() for p in ps} and len(pids) <= 2
    assert sum(v for kind, _, v in events if kind == "progress") == 4
    assert not _wait_gone(pids), "a worker outlived run_jobs"


def test_a_dying_worker_is_replaced_by_a_new_process_and_its_job_retried(tmp_path):
    jobs = _jobs(tmp_path, ["dying_job", "ok_job", "ok_job"])
    events = []
    outcomes = run_jobs(jobs, [Slot("cpu", {}, 1, "cpu#0")], inline=False,
                        on_event=lambda *e: events.append(e))
    assert not outcomes[0].ok
    assert f"died (exit code 7) while running it, {MAX_TRIES} times" in outcomes[0].error
    assert outcomes[1].ok and outcomes[2].ok
    pids = _pids(events)["cpu#0"]
    # One worker per try of the dying job, then one more for the rest: each a new process.
    assert len(pids) == MAX_TRIES + 1 == len(set(pids))
    ran_ok = {int((tmp_path / f"out-{i}").read_text().split()[1]) for i in (1, 2)}
    assert ran_ok == {pids[-1]}
    starts = [v for kind, job_id, v in events if kind == "start" and job_id == "job-0"]
    assert len(starts) == MAX_TRIES


def test_inline_path_reports_the_same_way(tmp_path):
    jobs = _jobs(tmp_path, ["ok_job", "failing_job"])
    outcomes = run_jobs(jobs, plan_slots("cpu", workers=1, workers_per_gpu=1, num_jobs=2))
    assert [o.ok for o in outcomes] == [True, False]


def test_gpu_workers_are_pinned(tmp_path, monkeypatch):
    monkeypatch.setattr("unlearn_cli.launch.gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = plan_slots("cuda:0,1", workers=0, workers_per_gpu=2, num_jobs=10)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert all(s.device == "cuda:0" for s in slots)
    # The environment reaches the worker before it imports torch (run on CPU: no GPU needed).
    cpu_slot = Slot("cpu", {"CUDA_VISIBLE_DEVICES": "1"}, 1, "fake-gpu1")
    jobs = _jobs(tmp_path, ["ok_job"])
    assert run_jobs(jobs, [cpu_slot], inline=False)[0].ok
    assert (tmp_path / "out-0").read_text().split()[2] == "1"


def test_bad_device_specs(monkeypatch):
    monkeypatch.setattr("unlearn_cli.launch.gpu_count", lambda: 1)
    with pytest.raises(UnlearnError, match="expected auto, cpu, cuda"):
        plan_slots("gpu", workers=0, workers_per_gpu=1, num_jobs=1)
    with pytest.raises(UnlearnError, match="GPU 3 does not exist"):
        plan_slots("cuda:3", workers=0, workers_per_gpu=1, num_jobs=1)
    monkeypatch.setattr("unlearn_cli.launch.gpu_count", lambda: 0)
    with pytest.raises(UnlearnError, match="no GPU is visible"):
        plan_slots("cuda", workers=0, workers_per_gpu=1, num_jobs=1)
    assert plan_slots("auto", workers=0, workers_per_gpu=1, num_jobs=1)[0].device == "cpu"


@pytest.mark.parametrize("inline", [True, False])
def test_sys_exit_in_a_job_is_a_failure_not_a_hang(tmp_path, inline):
    jobs = _jobs(tmp_path, ["exiting_job", "ok_job"])
    outcomes = run_jobs(jobs, [Slot("cpu", {}, 1, "cpu#0")], inline=inline)
    assert not outcomes[0].ok and "SystemExit" in outcomes[0].error
    assert outcomes[1].ok


def test_a_worker_exiting_cleanly_mid_job_fails_that_job(tmp_path):
    jobs = _jobs(tmp_path, ["vanishing_job", "ok_job"])
    outcomes = run_jobs(jobs, [Slot("cpu", {}, 1, "cpu#0")], inline=False)
    assert not outcomes[0].ok and "died (exit code 0)" in outcomes[0].error
    assert outcomes[1].ok


@pytest.mark.slow  # two workers import torch: seconds each
def test_threads_per_job_do_not_depend_on_the_worker_count(monkeypatch):
    """launch.threads, not cores // workers: the same float sums with 1 or 2 workers."""
    monkeypatch.setattr("unlearn_cli.launch.cpu_count", lambda: 64)
    assert len(plan_slots("cpu", workers=0, workers_per_gpu=1, num_jobs=100)) == 64
    slots4 = plan_slots("cpu", workers=0, workers_per_gpu=1, num_jobs=100, threads=4)
    assert len(slots4) == 16 and {s.threads for s in slots4} == {4}
    assert {s.threads for s in plan_slots("cpu", workers=0, workers_per_gpu=1, num_jobs=1,
                                          threads=100)} == {64}  # capped at the cores
    monkeypatch.undo()
    jobs = [Job(f"j{i}", "launch_jobs:threads_job", {"value": i}) for i in range(4)]
    want = min(2, launch.cpu_count())
    for workers, inline in ((1, True), (2, False)):
        got = []
        slots = plan_slots("cpu", workers=workers, workers_per_gpu=1, num_jobs=4, threads=2)
        outcomes = run_jobs(jobs, slots, inline=inline,
                            on_result=lambda job_id, item, got=got: got.append(item) or True)
        assert all(o.ok for o in outcomes)
        assert len(got) == 4 and {r["threads"] for r in got} == {want}


def test_backend_ray_without_ray_installed_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from unlearn_cli.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(app, ["train-refs", "--num-models", "2", "--store",
                                      str(tmp_path / "s"), "--backend", "ray"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "pip install 'unlearn-cli[ray]'" in lines[0] and "--backend local" in lines[0]
    assert not (tmp_path / "s" / "reference").exists()


def test_bad_backend_is_refused_with_the_valid_names(tmp_path):
    from typer.testing import CliRunner

    from unlearn_cli.cli import app

    result = CliRunner().invoke(app, ["train-refs", "--num-models", "2", "--store",
                                      str(tmp_path / "s"), "--backend", "slurm"])
    assert result.exit_code == 1
    assert "launch.backend: expected local or ray, got 'slurm'" in result.output


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_see_the_parent_environment_of_the_moment_they_start(tmp_path, monkeypatch,
                                                                     method):
    """Workers fork from a server started earlier (launch_local.prestart), yet each one takes the
    command's environment and import path as they are when it starts, as a spawned one would."""
    from unlearn_cli import launch_local

    monkeypatch.setenv("UNLEARN_START_METHOD", method)
    launch_local.prestart()  # the server (if any) starts before the variable below is set
    monkeypatch.setenv("UNLEARN_TEST_MARK", f"mark-{method}")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = []
    slots = plan_slots("cpu", workers=2, workers_per_gpu=1, num_jobs=2)
    outcomes = run_jobs([Job(f"j{i}", "launch_jobs:env_job", {"path": str(tmp_path)})
                         for i in range(2)], slots, inline=False,
                        on_result=lambda job_id, value: results.append(value) or True)
    assert all(o.ok for o in outcomes)
    assert [r["value"] for r in results] == [f"mark-{method}"] * 2
    assert all(r["path"] for r in results)
    assert launch_local.start_method() == method
    # Forked from the server, a worker has torch already (imported once, there).
    assert all(r["torch_loaded"] for r in results) == (method == "forkserver")


def test_the_fork_server_preload_never_initialises_cuda():
    """Forked workers may use CUDA only if the server never touched it: importing every
    preloaded module must leave CUDA uninitialised (checked in a fresh interpreter)."""
    import subprocess

    from unlearn_cli.launch_local import PRELOAD

    code = (f"import torch\nfor m in {PRELOAD!r}: __import__(m)\n"
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_shared_inputs_with_many_tensors_reach_forked_workers(tmp_path, monkeypatch):
    """A state dict of 400 tensors (more than a fork server passes as file descriptors in one
    process start) reaches every worker whole."""
    import torch

    monkeypatch.setenv("UNLEARN_START_METHOD", "forkserver")
    shared = {"tensors": {f"t{i}": torch.full((3,), float(i)) for i in range(400)}}
    results = []
    slots = plan_slots("cpu", workers=2, workers_per_gpu=1, num_jobs=2)
    outcomes = run_jobs([Job(f"j{i}", "launch_jobs:sum_shared", {}) for i in range(2)], slots,
                        shared=shared, inline=False,
                        on_result=lambda job_id, value: results.append(value) or True)
    assert all(o.ok for o in outcomes), outcomes
    assert results == [3.0 * sum(range(400))] * 2


def test_a_refused_command_leaves_no_fork_server_behind(trained_store, tmp_path):
    """apply starts the fork server before its slower checks; refused by one of them, the command
    must not leave that server importing torch after it exits (its own session is empty)."""
    import subprocess

    log = tmp_path / "out.txt"
    with open(log, "w") as out:  # a file, not a pipe: a pipe's reader would wait for the server
        proc = subprocess.Popen([sys.executable, "-m", "unlearn_cli", "apply", "--method",
                                 "retrain", "--store", str(trained_store), "--workers", "2",
                                 "--set", "train.epochs=5"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.wait(timeout=120)
    assert proc.returncode == 1 and "different config" in log.read_text(), log.read_text()
    # The session's processes: none soon after the command is gone. An orphaned server would
    # still be importing torch for seconds; reaping a killed one takes milliseconds.
    deadline = time.monotonic() + 1.0
    while True:
        out = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,args="], capture_output=True,
                             text=True, timeout=30).stdout.splitlines()
        rows = [line.split(None, 3) for line in out]
        # Zombies (stat Z) have exited: only the reaper is left to notice.
        left = [row[1:] for row in rows if row[0] == str(proc.pid) and not row[2].startswith("Z")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == [], f"processes of the refused command still running: {left}"


# ------------------------------------------------------------ where jobs run: the cost model


def _cost_store(root):
    from unlearn_cli.store import Store

    store = Store(root)
    store.root.mkdir(parents=True, exist_ok=True)
    return store


def _cpu_slots(n):
    return [Slot("cpu", {}, 1, f"cpu#{k}") for k in range(n)]


def _sized_jobs(sizes):
    return [Job(f"job-{i}", "launch_jobs:ok_job", {}, size) for i, size in enumerate(sizes)]


def test_the_cost_model_weighs_measured_work_against_worker_start_up(tmp_path):
    store = _cost_store(tmp_path / "s")
    slots = _cpu_slots(2)
    # Nothing measured yet: workers, and the plan says why.
    inline, note = launch.CostModel(store, "apply:x").decide(_sized_jobs([5, 5]), slots,
                                                             "local", None)
    assert inline is False and note == "; no measured cost yet: workers"
    store.record_costs("apply:x", launch.machine(),
                       {"model_seconds": 0.05, "startup_seconds": 0.4})
    costs = launch.CostModel(store, "apply:x")
    # 2 runs: 0.1 s here against 0.4 + 0.05 s on workers -> this process
    inline, note = costs.decide(_sized_jobs([1, 1]), slots, "local", None)
    assert inline is True, note
    assert "~0.1 s in this process, ~0.5 s on 2 workers" in note and "measured" in note
    assert costs.stays_here([1, 1], 2) and not costs.stays_here([50, 50], 2)
    # 100 runs: 5 s here against 0.4 + 2.5 s -> workers
    inline, note = costs.decide(_sized_jobs([50, 50]), slots, "local", None)
    assert inline is False and note.endswith(": workers"), note
    # One job holding every run gains nothing from a second worker.
    assert costs.decide(_sized_jobs([100]), slots, "local", None)[0] is True
    # The caller's choice, Ray, GPUs, one slot and user code are left alone.
    assert costs.decide(_sized_jobs([1, 1]), slots, "local", False) == (False, "")
    assert costs.decide(_sized_jobs([1, 1]), slots, "ray", None) == (None, "")
    gpu = [Slot("cuda:0", {}, 1, f"gpu0#{k}", gpu=0) for k in range(2)]
    assert costs.decide(_sized_jobs([1, 1]), gpu, "local", None) == (None, "")
    assert costs.decide(_sized_jobs([1]), _cpu_slots(1), "local", None) == (None, "")
    plugin = launch.CostModel(store, "apply:x", enabled=False)
    assert plugin.decide(_sized_jobs([1, 1]), slots, "local", None) == (None, "")
    assert not plugin.stays_here([1, 1], 2)
    assert launch.user_code("my.py:m", "mlp") and launch.user_code(None, "nets.py:build")
    assert not launch.user_code("finetune", "torchvision:resnet18")


def test_a_slow_measured_start_up_counts_for_at_most_the_cap(tmp_path):
    store = _cost_store(tmp_path / "s")
    store.record_costs("k", launch.machine(), {"model_seconds": 0.1, "startup_seconds": 60.0})
    # 40 models: 4 s here; on 2 workers 3 s (capped) + 2 s = 5 s -> here; uncapped it would
    # stay here up to 1,200 models, and the start-up would never be measured again.
    costs = launch.CostModel(store, "k")
    inline, note = costs.decide(_sized_jobs([20, 20]), _cpu_slots(2), "local", None)
    assert inline is True and "3.0 s start-up, measured, counted as at most this" in note
    assert costs.decide(_sized_jobs([50, 50]), _cpu_slots(2), "local", None)[0] is False


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"machine": 1, "costs": {}}', "[" * 100_000 + "]" * 100_000,
    '{"machine": {"host": "elsewhere", "cpus": 64}, "costs": {"k": {"model_seconds": 1}}}',
])
def test_unreadable_or_foreign_costs_are_ignored_and_replaced(tmp_path, text):
    store = _cost_store(tmp_path / "s")
    store.costs_file.write_text(text)
    assert store.read_costs("k", launch.machine()) == {}
    store.record_costs("k", launch.machine(), {"model_seconds": 0.5})
    assert store.read_costs("k", launch.machine()) == {"model_seconds": 0.5}


@pytest.mark.parametrize("value", ["NaN", "-1", "1e308", "true", "1" + "0" * 400, '"3"'])
def test_costs_that_are_not_plausible_seconds_are_dropped(tmp_path, value):
    import json

    store = _cost_store(tmp_path / "s")
    text = json.dumps({"machine": launch.machine(),
                       "costs": {"k": {"model_seconds": "VALUE", "startup_seconds": 0.2}}})
    store.costs_file.write_text(text.replace('"VALUE"', value))
    assert store.read_costs("k", launch.machine()) in ({}, {"startup_seconds": 0.2})
    assert "model_seconds" not in store.read_costs("k", launch.machine())
    store.record_costs("j", launch.machine(), {"model_seconds": 2.0})
    assert store.read_costs("j", launch.machine()) == {"model_seconds": 2.0}


def test_a_run_on_workers_records_its_costs_and_a_small_top_up_runs_here(tmp_path):
    from conftest import FAST

    from unlearn_cli import apply, train_refs
    from unlearn_cli.config import load_config

    root = tmp_path / "s"
    train_refs.run(load_config(None, FAST), root, num_models=2)  # one slot: nothing recorded
    store = _cost_store(root)
    assert store.read_costs("train-refs", launch.machine()) == {}
    cfg = load_config(None, [*FAST, "launch.workers=2"])
    train_refs.run(cfg, root, num_models=4)
    apply.run(cfg, root, method_spec="none", num_models=4)
    for key in ("train-refs", "apply:none"):
        costs = store.read_costs(key, launch.machine())
        assert costs["model_seconds"] > 0 and costs["startup_seconds"] > 0, (key, costs)
    # Runs so cheap against starting workers: the 2 runs of the top-up stay in this process.
    store.record_costs("apply:none", launch.machine(),
                       {"model_seconds": 1e-4, "startup_seconds": 2.0})
    plans = []
    result = apply.run(cfg, root, method_spec="none", num_models=6,
                       on_event=lambda kind, job_id, value:
                       plans.append(value) if kind == "plan" else None)
    assert len(plans) == 1 and plans[0].endswith(": this process"), plans
    assert "job(s) in this process" in plans[0] and "2.0 s start-up, measured" in plans[0]
    assert len(result.trained) == 2 and store.done_seeds("unlearned", "none")[-1] == 1_000_005
    # ... and, having run in this process, it measured nothing new.
    assert store.read_costs("apply:none", launch.machine()) == {"model_seconds": 1e-4,
                                                               "startup_seconds": 2.0}


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_without_the_main_guard_can_use_workers(tmp_path, method):
    # multiprocessing would run such a script again in the fork server and each worker, where
    # it would start its experiment again (refused: workers "dying at start-up").
    import subprocess
    from pathlib import Path

    from conftest import FAST

    script = tmp_path / "experiment.py"
    script.write_text(
        "from unlearn_cli import train_refs\n"
        "from unlearn_cli.config import load_config\n"
        f"cfg = load_config(None, {[*FAST, 'launch.workers=2']!r})\n"
        f"result = train_refs.run(cfg, {str(tmp_path / 's')!r}, num_models=2)\n"
        "print('trained', len(result.trained))\n"
    )
    env = {**os.environ, "UNLEARN_START_METHOD": method,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "trained 2" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
