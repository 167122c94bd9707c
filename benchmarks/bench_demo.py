"""The demo, timed: original + N reference models + N finetune runs + score, on the digits default.

Side by side in one run:
- as the demo runs it: the three CLI commands, each a fresh process, with the default launcher
  (one worker process per core, forked from a server that imports torch while the command checks;
  reference models and finetune runs trained as lockstep ensembles);
- the baseline: the same jobs one after another in one process (one model at a time, no workers);
- `apply` again on a copy of the demo's store with --workers 1 (in the command's own process), to
  show whether starting workers pays for itself;
- the demo again with fewer models timed alone for the runtime ratio (launch.timed_alone=12),
  to show what the default's count costs.
Targets (issue 16): the demo in <= 20 s wall on this project's 2-core machine, and >= 3x faster
than the one-process baseline of the same run; apply with workers not slower than without.

    python benchmarks/bench_demo.py [--num-models 100]
Writes demo.json to $UNLEARN_BENCH_OUT when that is set.
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
sys.path.insert(0, str(ROOT))
TARGET_SECONDS = 20.0
TARGET_SPEEDUP = 3.0
FEWER_TIMED = 12  # the demo again with this many models timed alone a command: what timing costs


def run_cli(store: Path, n: int, settings: tuple[str, ...] = ()) -> dict[str, float]:
    exe = [sys.executable, "-m", "unlearn_cli"]
    extra = [arg for setting in settings for arg in ("--set", setting)]
    steps = {
        "train-refs": [*exe, "train-refs", "--num-models", str(n), "--store", str(store), *extra],
        "apply": [*exe, "apply", "--method", "finetune", "--store", str(store), *extra],
        "score": [*exe, "score", "--store", str(store), "--out", str(store / "report.json")],
    }
    times = {}
    for name, args in steps.items():
        start = time.perf_counter()
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        times[name] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def run_apply_in_process(demo_store: Path, copy: Path) -> float:
    """`unlearn apply --method finetune --workers 1` on a copy of the demo store without its runs:
    the same command and work as the demo's apply, in the command's own process."""
    import shutil

    shutil.copytree(demo_store, copy)
    shutil.rmtree(copy / "unlearned")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unlearn_cli", "apply", "--method", "finetune",
                    "--workers", "1", "--store", str(copy)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_sequential(store: Path, n: int) -> dict[str, float]:
    start = time.perf_counter()
    from unlearn_cli import apply, score, train_refs
    from unlearn_cli.config import load_config

    cfg = load_config(None, ["launch.workers=1", "train.engine=loop"])
    times = {"imports": time.perf_counter() - start}
    t = time.perf_counter()
    train_refs.run(cfg, store, num_models=n, inline=True)
    times["train-refs"] = time.perf_counter() - t
    t = time.perf_counter()
    apply.run(cfg, store, method_spec="finetune", inline=True)
    times["apply"] = time.perf_counter() - t
    t = time.perf_counter()
    score.run(store, methods=["finetune"])
    times["score"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return times


def main() -> None:
    from unlearn_cli.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-models", type=int, default=100)
    args = parser.parse_args()
    n = args.num_models
    with tempfile.TemporaryDirectory() as tmp:
        demo = run_cli(Path(tmp) / "demo", n)
        report = json.loads((Path(tmp) / "demo" / "report.json").read_text())
        base = run_sequential(Path(tmp) / "sequential", n)
        apply_inline = run_apply_in_process(Path(tmp) / "demo", Path(tmp) / "inline")
        fewer = run_cli(Path(tmp) / "fewer", n, (f"launch.timed_alone={FEWER_TIMED}",))
    print(f"demo on digits, N = {n} (original + {n} reference models + {n} finetune runs + score)")
    print(f"{'step':<12}{'demo (CLI, workers)':>22}{'one process, sequential':>26}")
    for step in ("train-refs", "apply", "score", "total"):
        print(f"{step:<12}{demo[step]:>21.1f}s{base[step]:>25.1f}s")
    ratio = base["total"] / demo["total"]
    print(f"speed-up of the demo over the sequential baseline (this run): {ratio:.2f}x")
    print(f"apply --workers 1 (in the command's process) on a copy of the demo store: "
          f"{apply_inline:.1f} s, against {demo['apply']:.1f} s with the default workers")
    default = load_config(None).launch.timed_alone
    print(f"the demo again with launch.timed_alone={FEWER_TIMED} (the default before 2026-11-30; "
          f"default {default}), after the rest: {fewer['total']:.1f} s (train-refs "
          f"{fewer['train-refs']:.1f}, apply {fewer['apply']:.1f}, score {fewer['score']:.1f})")
    verdict = "PASS" if demo["total"] <= TARGET_SECONDS else "FAIL"
    print(f"target: demo <= {TARGET_SECONDS:.0f} s wall: {verdict} ({demo['total']:.1f} s)")
    fast = "PASS" if ratio >= TARGET_SPEEDUP else "FAIL"
    print(f"target: demo >= {TARGET_SPEEDUP:.0f}x the sequential baseline: {fast} ({ratio:.2f}x)")
    workers_ok = "PASS" if demo["apply"] <= apply_inline else "FAIL"
    print(f"target: apply with workers not slower than in-process: {workers_ok} "
          f"({demo['apply']:.1f} s vs {apply_inline:.1f} s)")
    print(f"demo score: F = {report['forget_quality']:.4f}, final = {report['final_score']:.4f}, "
          f"runtime ratio = {report['runtime']['ratio']:.3f}")
    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "demo.json").write_text(json.dumps(
            {"num_models": n, "demo_seconds": demo, "sequential_seconds": base,
             "speedup": ratio, "apply_in_process_seconds": apply_inline,
             "fewer_timed_alone": {"timed_alone": FEWER_TIMED, "seconds": fewer},
             "target_seconds": TARGET_SECONDS, "target_speedup": TARGET_SPEEDUP,
             "pass": verdict == fast == workers_ok == "PASS"},
            indent=2))


if __name__ == "__main__":
    main()
