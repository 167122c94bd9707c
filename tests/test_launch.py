import pytest

from unlearn_cli.errors import UnlearnError
from unlearn_cli.launch import Job, Slot, plan_slots, run_jobs


def _jobs(tmp_path, kinds):
    return [
        Job(f"job-{i}", f"launch_jobs:{kind}", {"out": str(tmp_path / f"out-{i}"), "value": i})
        for i, kind in enumerate(kinds)
    ]


def test_two_workers_one_failing_job(tmp_path):
    jobs = _jobs(tmp_path, ["ok_job", "failing_job", "ok_job", "ok_job", "ok_job"])
    slots = plan_slots("cpu", workers=2, workers_per_gpu=1, num_jobs=len(jobs))
    assert len(slots) == 2
    events = []
    outcomes = run_jobs(jobs, slots, on_event=lambda *e: events.append(e))
    assert [o.ok for o in outcomes] == [True, False, True, True, True]
    assert outcomes[1].id == "job-1" and "ValueError: bad value 1" in outcomes[1].error
    assert "Traceback" in outcomes[1].detail
    pids = {(tmp_path / f"out-{i}").read_text().split()[1] for i in (0, 2, 3, 4)}
    assert 1 <= len(pids) <= 2  # long-lived workers: several jobs per process
    assert sum(v for kind, _, v in events if kind == "progress") == 4


def test_a_dying_worker_fails_its_job_and_is_replaced(tmp_path):
    jobs = _jobs(tmp_path, ["dying_job", "ok_job", "ok_job"])
    outcomes = run_jobs(jobs, [Slot("cpu", {}, 1, "cpu#0")], inline=False)
    assert not outcomes[0].ok and "died (exit code 7)" in outcomes[0].error
    assert outcomes[1].ok and outcomes[2].ok


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
