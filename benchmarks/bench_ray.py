"""The digits demo on the local backend and on a private Ray instance, side by side in one run.

Each side runs the demo's three commands as fresh processes (train-refs N, apply finetune, score)
on its own store, local and ray-joined taking turns (--repeats times each, the fastest compared):
- local: `--backend local` (one worker process per core);
- ray, joined: `--backend ray --address HOST:PORT`, joining a private Ray instance this script
  starts once (as a cluster that is already running would be); its start-up is timed apart;
- ray, own instance: `--backend ray --address local`, each command starting and stopping its
  own private instance (what a user without a cluster pays).
Goal (issue 10): ray (joined) at most 1.5x the local wall time, where every job is tiny.
Where the time goes: the private instance's start-up; on each backend (in this process, one slot)
the start of one worker (a process; on Ray, the slot's actor) and the cost of each further job
that does nothing; and for the joined run's train-refs and apply, the timeline Ray's driver
writes with UNLEARN_RAY_TRACE (when it had joined Ray, when its actors' processes were up and had
imported torch and the job modules, how long the command then waited for them, how long a
finished model took to reach the driver, and the exit).

    python benchmarks/bench_ray.py [--num-models 100] [--repeats 2]
Writes ray.json to $UNLEARN_BENCH_OUT when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
GOAL_RATIO = 1.5
NOOP_JOBS = 40  # no-op jobs timed after the first, for the cost of one job


def noop_job(payload: dict, *, device: str, progress: object, shared: object = None) -> None:
    """A job that does nothing: what running a job costs a backend beyond the job itself."""
    return None


def dispatch_costs(backend: str, address: str = "auto") -> tuple[float, float]:
    """On one slot of `backend`: (seconds to start its worker and run one no-op job, seconds per
    further no-op job). Ray: this process is connected to the instance already."""
    from unlearn_cli import launch

    slot = [launch.Slot("cpu", {}, 1, "bench#0")]

    def timed(count: int) -> float:
        jobs = [launch.Job(f"noop-{i}", "bench_ray:noop_job", {}) for i in range(count)]
        start = time.perf_counter()
        outcomes = launch.run_jobs(jobs, slot, backend=backend, address=address, inline=False)
        seconds = time.perf_counter() - start
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"bench_ray: a no-op job failed on {backend}: {failed[0].error}")
        return seconds

    timed(1)  # untimed: one-time costs (imports, Ray registering the actor class)
    first = timed(1)
    return first, (timed(NOOP_JOBS + 1) - first) / NOOP_JOBS


def run_demo(store: Path, n: int, launch: list[str],
             trace: Path | None = None) -> dict[str, float]:
    """Wall seconds of the demo's three commands, and with `trace` (Ray), each Ray command's
    timeline under times["timeline"][command] (see `timeline`)."""
    exe = [sys.executable, "-m", "unlearn_cli"]
    steps = {
        "train-refs": [*exe, "train-refs", "--num-models", str(n), "--store", str(store), *launch],
        "apply": [*exe, "apply", "--method", "finetune", "--store", str(store), *launch],
        "score": [*exe, "score", "--store", str(store), "--bootstrap", "0"],
    }
    times: dict = {}
    lines: dict = {}
    for name, args in steps.items():
        env = dict(os.environ)
        if trace is not None:
            trace.unlink(missing_ok=True)
            if name != "score":  # score runs no jobs
                env["UNLEARN_RAY_TRACE"] = str(trace)
        began = time.time()
        start = time.perf_counter()
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        times[name] = time.perf_counter() - start
        if trace is not None and trace.exists():
            events = [e for line in trace.read_text().splitlines()
                      for e in json.loads(line)["events"]]
            lines[name] = timeline(events, began, times[name])
    times["total"] = sum(times[name] for name in steps)
    if lines:
        times["timeline"] = lines
    return times


def timeline(events: list, began: float, wall: float) -> dict[str, float]:
    """One Ray command's timeline, in seconds since it was started (see launch_ray.mark):
    joined (Ray connected, in the background), actors_up (the last actor's process running its
    constructor), imported (the last actor done importing torch and the job modules),
    actor_cpu (CPU seconds of an actor's process by then, mean), driver_cpu (CPU seconds of the
    command's own process, at its exit), driver_ready (the command
    ready to hand out jobs), waited (how long it then waited for its first actor), jobs_done,
    disconnect (killing the actors and leaving Ray, and Ray's exit handler), exit, result_ms
    (mean delay of a finished model from its actor's yield to the driver)."""
    at: dict[str, list[float]] = {}
    for what, when in events:
        at.setdefault(what, []).append(when - began)

    def last(pred):
        hits = [t for what, ts in at.items() if pred(what) for t in ts]
        return max(hits) if hits else float("nan")

    def first(pred):
        hits = [t for what, ts in at.items() if pred(what) for t in ts]
        return min(hits) if hits else float("nan")

    cpu = [float(what.rsplit("cpu ", 1)[1].rstrip("s)")) for what in at if "imported" in what]
    # A model's result: stamped by its actor ("ray-cpu#0: result JOB", as it yields) and by the
    # driver ("result ray-cpu#0 JOB", as it receives it), in the same order.
    delays = []
    for what, sent in at.items():
        slot, _, rest = what.partition(": ")
        if rest.startswith("result "):
            got = at.get(f"result {slot} {rest[7:]}", [])
            delays += [g - s for s, g in zip(sent, got)]
    ready = first(lambda w: w.startswith("run_jobs"))
    return {"joined": first(lambda w: w == "connected"),
            "actors_up": last(lambda w: w.endswith(": init")),
            "imported": last(lambda w: "imported" in w),
            "actor_cpu": sum(cpu) / len(cpu) if cpu else float("nan"),
            "driver_cpu": next((float(w[11:-1]) for w in at if w.startswith("driver cpu ")),
                               float("nan")),
            "driver_ready": ready,
            "waited": first(lambda w: w.startswith("ready ")) - ready,
            "jobs_done": first(lambda w: w == "jobs done"),
            "disconnect": (first(lambda w: w == "disconnected") - first(lambda w: w == "jobs done")
                           + first(lambda w: w == "exit") - first(lambda w: w == "exit begins")),
            "exit": wall,
            "result_ms": 1000 * sum(delays) / len(delays) if delays else float("nan")}


def same_outputs(a: Path, b: Path, n: int) -> float:
    """The largest difference between the two stores' reference outputs (0.0 = identical)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from unlearn_cli.store import REFERENCE, Store

    worst = 0.0
    for seed in range(n):
        x, _ = Store(a).load_outputs(REFERENCE, seed)
        y, _ = Store(b).load_outputs(REFERENCE, seed)
        worst = max(worst, max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-models", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args()
    n = args.num_models
    try:
        import ray
    except ImportError:
        print("bench_ray: Ray is not installed (pip install 'unlearn-cli[ray]'); skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local_costs = dispatch_costs("local")
        # Ray's workers import what the nodes' PYTHONPATH names: this tree, and noop_job here.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(HERE), os.environ.get("PYTHONPATH")) if p)
        start = time.perf_counter()
        # A private instance for this benchmark only, stopped below: never `ray stop`.
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        cluster_start = time.perf_counter() - start
        address = ray.get_runtime_context().gcs_address
        # On a shared machine the load drifts: the two sides take turns, `--repeats` times each,
        # and the fastest run of each side is compared (the idle instance runs throughout).
        locals_, joineds = [], []
        try:
            ray_costs = dispatch_costs("ray", address)
            for k in range(args.repeats):
                locals_.append(run_demo(tmp / f"local{k}", n, ["--backend", "local"]))
                joineds.append(run_demo(tmp / f"joined{k}", n,
                                        ["--backend", "ray", "--address", address],
                                        trace=tmp / "trace.jsonl"))
        finally:
            ray.shutdown()
        own = run_demo(tmp / "own", n, ["--backend", "ray", "--address", "local"])
        local_runs = [t["total"] for t in locals_]
        joined_runs = [t["total"] for t in joineds]
        local = min(locals_, key=lambda t: t["total"])
        joined = min(joineds, key=lambda t: t["total"])
        diff = max(same_outputs(tmp / "local0", tmp / "joined0", n),
                   same_outputs(tmp / "local0", tmp / "own", n))
    print(f"digits demo, N = {n}: local backend vs Ray on this machine "
          f"({os.cpu_count()} CPUs), each command a fresh process")
    print(f"{'step':<12}{'local':>10}{'ray, joined':>14}{'ray, own instance':>20}")
    for step in ("train-refs", "apply", "score", "total"):
        print(f"{step:<12}{local[step]:>9.1f}s{joined[step]:>13.1f}s{own[step]:>19.1f}s")
    print(f"totals of the {args.repeats} alternating runs: local "
          f"{', '.join(f'{t:.1f}s' for t in local_runs)}; ray, joined "
          f"{', '.join(f'{t:.1f}s' for t in joined_runs)} (the fastest of each is shown above)")
    ratio = joined["total"] / local["total"]
    ratio_own = own["total"] / local["total"]
    print(f"ratio ray/local: {ratio:.2f}x joined to a running instance, {ratio_own:.2f}x when "
          f"each command starts its own")
    print(f"where Ray's time goes: starting a private instance took {cluster_start:.1f}s here "
          f"(paid by train-refs and apply each with --address local); starting one worker and "
          f"running a no-op job on it: {local_costs[0]:.2f}s local (a process), "
          f"{ray_costs[0]:.2f}s Ray (an actor: a new process that imports torch and the job "
          f"modules, where a local worker forks from a server that has them already); each "
          f"further no-op job: {1000 * local_costs[1]:.0f} ms local, {1000 * ray_costs[1]:.0f} "
          f"ms Ray")
    for step, t in joined.get("timeline", {}).items():
        print(f"  ray, joined, {step} (s since the command started): joined Ray {t['joined']:.1f} "
              f"(in the background); its actors' processes up {t['actors_up']:.1f}, done "
              f"importing torch and the job modules {t['imported']:.1f} ({t['actor_cpu']:.1f}s "
              f"of CPU each); the command ready to run jobs {t['driver_ready']:.1f}, then waited "
              f"{t['waited']:.1f} for its first actor; jobs done {t['jobs_done']:.1f}, exit "
              f"{t['exit']:.1f} (Ray's disconnect {t['disconnect']:.1f}); a finished model "
              f"reached the driver {t['result_ms']:.0f} ms after its actor sent it (mean); "
              f"the command's own process used {t['driver_cpu']:.1f}s of CPU")
    print(f"outputs: largest difference to the local backend {diff:.1e} (same seeds)")
    verdict = "PASS" if ratio <= GOAL_RATIO else "FAIL"
    print(f"goal: ray (joined) <= {GOAL_RATIO}x local: {verdict} ({ratio:.2f}x)")
    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "ray.json").write_text(json.dumps(
            {"num_models": n, "local_seconds": local, "local_totals": local_runs,
             "ray_joined_totals": joined_runs,
             "ray_joined_seconds": joined,
             "ray_own_instance_seconds": own, "cluster_start_seconds": cluster_start,
             "ratio_joined": ratio, "ratio_own_instance": ratio_own,
             "max_output_difference": diff, "goal_ratio": GOAL_RATIO,
             "worker_start_and_noop_job_seconds": {"local": local_costs[0],
                                                   "ray": ray_costs[0]},
             "seconds_per_noop_job": {"local": local_costs[1], "ray": ray_costs[1]},
             "pass": verdict == "PASS"}, indent=2))


if __name__ == "__main__":
    main()
