"""How fast `unlearn` answers: --help, the method list and argument errors, as whole processes.

Issue 9.8: each must answer in under 0.5 s (start-up included), because none needs torch. Every
call is a fresh `python -m unlearn_cli ...` process, timed from spawn to exit, run REPEATS times;
the median is reported. Beside them, side by side in the same run: the bare interpreter
(`python -c pass`), and `python -c "import torch"`, what each answer would cost if it imported
torch. Argument errors that need a store get a tiny one (2 reference models, 1 epoch), made once.

    python benchmarks/bench_cli.py [--repeats 5]
Writes cli.json to $UNLEARN_BENCH_OUT when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 0.5
# (label, arguments); {store}: a trained store, {tmp}: a scratch folder. Expected exit code 0 for
# help and listings, 1 for errors.
CALLS = [
    ("--help", "--help", 0),
    ("methods", "methods", 0),
    ("apply --help", "apply --help", 0),
    ("--version", "--version", 0),
    ("train-refs --num-models 0", "train-refs --num-models 0 --store {tmp}/a", 1),
    ("train-refs --num-models 99999999999", "train-refs --num-models 99999999999 --store {tmp}/a",
     1),
    ("train-refs --device cuda:", "train-refs --device cuda: --store {tmp}/a", 1),
    ("train-refs --set train.epoch=3", "train-refs --set train.epoch=3 --store {tmp}/a", 1),
    ("apply --num-models 0", "apply --method none --num-models 0 --store {store}", 1),
    ("apply --method forgetful", "apply --method forgetful --store {store}", 1),
    ("apply (no store)", "apply --method none --store {tmp}/nowhere", 1),
    ("apply (other config)", "apply --method none --store {store} --set train.epochs=5", 1),
    ("score --metric nope", "score --metric nope --store {store}", 1),
    ("score (no store)", "score --store {tmp}/nowhere", 1),
]


def time_process(args: list[str], expect: int, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        if proc.returncode != expect:
            raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                             f"{proc.stdout}{proc.stderr}")
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    exe = [sys.executable]
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    load = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        subprocess.run([*exe, "-m", "unlearn_cli", "train-refs", "--num-models", "2", "--store",
                        str(store), "--set", "train.epochs=1", "--workers", "1"], cwd=ROOT,
                       check=True, capture_output=True)
        base, _ = time_process([*exe, "-c", "pass"], 0, args.repeats)
        torch_cost, _ = time_process([*exe, "-c", "import torch"], 0, args.repeats)
        for label, line, expect in CALLS:
            argv = line.format(store=store, tmp=tmp).split()
            median, times = time_process([*exe, "-m", "unlearn_cli", *argv], expect, args.repeats)
            results[label] = {"median_seconds": median, "seconds": times}
    worst = max(r["median_seconds"] for r in results.values())
    print(f"unlearn's quick answers as whole processes (median of {args.repeats}; load average "
          f"{load:.2f} at the start)")
    print(f"  python -c pass: {base:.3f} s; python -c 'import torch': {torch_cost:.3f} s")
    for label, r in results.items():
        flag = "" if r["median_seconds"] <= TARGET_SECONDS else "  > target"
        print(f"  {label:<38}{r['median_seconds']:>7.3f} s{flag}")
    verdict = "PASS" if worst <= TARGET_SECONDS else "FAIL"
    print(f"slowest {worst:.3f} s, target <= {TARGET_SECONDS} s: {verdict}")
    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        doc = {"load_average": load, "python_pass_seconds": base, "import_torch_seconds":
               torch_cost, "calls": results, "target_seconds": TARGET_SECONDS, "verdict": verdict}
        (Path(out) / "cli.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
