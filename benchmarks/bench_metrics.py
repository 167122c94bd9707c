"""Benchmark of the official epsilon: fast `per_example_epsilons` against the straightforward
`per_example_epsilons_reference`, on synthetic confidences.

    python benchmarks/bench_metrics.py                          # prints a table
    UNLEARN_BENCH_OUT=out python benchmarks/bench_metrics.py    # + out/metrics_official.json

Targets (docs/performance.md, Scoring): 1,000 forget examples x (512 + 512) models in <= 4 s on a
2-core machine, peak memory <= 2 GiB. A missed target prints FAIL; the exit code stays 0.

What is measured:
- fast path: wall time of `per_example_epsilons` on all examples, median of REPEATS runs;
- reference: wall time on the first REFERENCE_EXAMPLES examples only (10-20 ms per example),
  extrapolated linearly to all examples; the speed-up is the ratio of ms per example, both measured
  in this run;
- agreement: fast == reference, exactly, on those examples;
- peak memory, in a fresh subprocess that builds the data and runs the fast path once: its peak
  resident set size (resource.getrusage ru_maxrss; the whole process counts: interpreter, numpy,
  data), checked against the target; and the peak of the memory numpy and Python allocate during
  the call alone (tracemalloc, in a second run of the call), for information.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from unlearn_cli.metrics import (  # noqa: E402  (needs the repo root on sys.path)
    bootstrap_forget_quality,
    per_example_epsilons,
    per_example_epsilons_reference,
)

# --- Settings -------------------------------------------------------------------------------------
NUM_EXAMPLES = 1_000  # forget examples
SIZES = (512, 100)  # models per bank; 512 is the target size
REFERENCE_EXAMPLES = 50  # examples timed with the reference (it is slow), then extrapolated
REPEATS = 3  # runs of the fast path; the median is reported
TARGET_SECONDS = 4.0  # for NUM_EXAMPLES x (512 + 512)
TARGET_PEAK_MIB = 2048.0  # 2 GiB
BOOTSTRAP_SHAPE = (100, 150)  # (models per bank, examples) of the bootstrap timing
SEED = 0


def synthetic_banks(num_models: int, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unlearned and retrained confidences `[num_models, num_examples]`, a mix of kinds of example:
    40% same distribution, 30% mean shift of 0.1-1.5 sd, 20% spread mismatch (unlearned sd
    0.3-0.8 of the retrained sd), 10% same distribution rounded to 0.1 (ties)."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-2.0, 8.0, num_examples)  # logit-scaled confidences of held-out examples
    sd = rng.uniform(0.5, 3.0, num_examples)
    kind = rng.choice(4, size=num_examples, p=[0.4, 0.3, 0.2, 0.1])
    shift = np.where(kind == 1, rng.uniform(0.1, 1.5, num_examples) * sd, 0.0)
    spread = np.where(kind == 2, rng.uniform(0.3, 0.8, num_examples), 1.0)
    retrained = rng.normal(mean, sd, (num_models, num_examples))
    unlearned = rng.normal(mean + shift, sd * spread, (num_models, num_examples))
    discrete = kind == 3
    retrained[:, discrete] = np.round(retrained[:, discrete], 1)
    unlearned[:, discrete] = np.round(unlearned[:, discrete], 1)
    return unlearned, retrained


def time_call(fn, *args, repeats: int = 1) -> tuple[float, object]:
    """Median wall time in seconds over `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


_PEAK_MEMORY_CHILD = """
import json, resource, sys, tracemalloc
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench_dir!r})
from bench_metrics import synthetic_banks
from unlearn_cli.metrics import per_example_epsilons
u, r = synthetic_banks({n}, {e}, {seed})
per_example_epsilons(u, r)
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
tracemalloc.start()
per_example_epsilons(u, r)
call_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({{"peak_rss_kib": peak_kib, "call_peak_bytes": call_peak}}))
"""


def peak_memory_mib(num_models: int, num_examples: int) -> tuple[float, float]:
    """(peak RSS of the whole subprocess, tracemalloc peak of the call alone), in MiB."""
    code = _PEAK_MEMORY_CHILD.format(
        root=str(REPO_ROOT),
        bench_dir=str(Path(__file__).resolve().parent),
        n=num_models,
        e=num_examples,
        seed=SEED,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["peak_rss_kib"] / 1024.0, data["call_peak_bytes"] / 2**20


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON next to its final place, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
        tmp = Path(f.name)
    os.replace(tmp, path)


def main() -> int:
    rows = []
    for num_models in SIZES:
        unlearned, retrained = synthetic_banks(num_models, NUM_EXAMPLES, SEED)
        per_example_epsilons(unlearned[:, :5], retrained[:, :5])  # warm-up: tables, imports
        fast_s, fast_eps = time_call(per_example_epsilons, unlearned, retrained, repeats=REPEATS)
        sub_u, sub_r = unlearned[:, :REFERENCE_EXAMPLES], retrained[:, :REFERENCE_EXAMPLES]
        ref_s, ref_eps = time_call(per_example_epsilons_reference, sub_u, sub_r)
        fast_ms = 1e3 * fast_s / NUM_EXAMPLES
        ref_ms = 1e3 * ref_s / REFERENCE_EXAMPLES
        mismatches = int(np.sum(fast_eps[:REFERENCE_EXAMPLES] != ref_eps))
        rows.append(
            {
                "num_models_per_bank": num_models,
                "num_examples": NUM_EXAMPLES,
                "fast_seconds": fast_s,
                "fast_ms_per_example": fast_ms,
                "reference_examples_timed": REFERENCE_EXAMPLES,
                "reference_ms_per_example": ref_ms,
                "reference_seconds_extrapolated": ref_ms * NUM_EXAMPLES / 1e3,
                "speedup": ref_ms / fast_ms,
                "mismatches_on_reference_examples": mismatches,
            }
        )
    target = rows[0]
    peak_mib, call_peak_mib = peak_memory_mib(SIZES[0], NUM_EXAMPLES)
    target["peak_rss_mib"] = peak_mib
    target["call_tracemalloc_peak_mib"] = call_peak_mib

    boot_u, boot_r = synthetic_banks(*BOOTSTRAP_SHAPE, SEED + 1)
    boot_s, _ = time_call(bootstrap_forget_quality, boot_u, boot_r)

    time_ok = target["fast_seconds"] <= TARGET_SECONDS
    memory_ok = peak_mib <= TARGET_PEAK_MIB
    agree_ok = all(row["mismatches_on_reference_examples"] == 0 for row in rows)

    print(f"Official epsilon, {NUM_EXAMPLES} forget examples; fast = median of {REPEATS} runs;")
    print(f"reference timed on the first {REFERENCE_EXAMPLES} examples and extrapolated.")
    header = (
        f"{'models/bank':>11} {'fast s':>8} {'fast ms/ex':>10} {'ref ms/ex':>9} "
        f"{'ref s (extrap.)':>15} {'speed-up':>8} {'agree':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        agree = "yes" if row["mismatches_on_reference_examples"] == 0 else "NO"
        print(
            f"{row['num_models_per_bank']:>11} {row['fast_seconds']:>8.2f} "
            f"{row['fast_ms_per_example']:>10.3f} {row['reference_ms_per_example']:>9.2f} "
            f"{row['reference_seconds_extrapolated']:>15.1f} {row['speedup']:>7.1f}x {agree:>6}"
        )
    print()
    print(
        f"peak memory, {SIZES[0]} models/bank: {peak_mib:.0f} MiB peak RSS of a fresh subprocess "
        f"(ru_maxrss, whole process); the call alone allocates at most {call_peak_mib:.1f} MiB "
        f"(tracemalloc)"
    )
    print(
        f"target time   {NUM_EXAMPLES} x ({SIZES[0]} + {SIZES[0]}) <= {TARGET_SECONDS:.0f} s: "
        f"{target['fast_seconds']:.2f} s  {'PASS' if time_ok else 'FAIL'}"
    )
    print(
        f"target memory <= {TARGET_PEAK_MIB:.0f} MiB: {peak_mib:.0f} MiB  "
        f"{'PASS' if memory_ok else 'FAIL'}"
    )
    print(f"fast == reference on the timed examples: {'PASS' if agree_ok else 'FAIL'}")
    print(
        f"bootstrap_forget_quality, {BOOTSTRAP_SHAPE[1]} examples x {BOOTSTRAP_SHAPE[0]} models "
        f"per bank, 100 resamples: {boot_s:.2f} s"
    )

    out_dir = os.environ.get("UNLEARN_BENCH_OUT")
    if out_dir:
        payload = {
            "benchmark": "metrics_official",
            "rows": rows,
            "target_seconds": TARGET_SECONDS,
            "target_peak_mib": TARGET_PEAK_MIB,
            "time_pass": time_ok,
            "memory_pass": memory_ok,
            "agreement_pass": agree_ok,
            "peak_memory_method": (
                "peak_rss_mib: resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh subprocess "
                "(whole process); call_tracemalloc_peak_mib: tracemalloc peak during one call"
            ),
            "bootstrap_seconds": boot_s,
            "bootstrap_shape_models_examples": list(BOOTSTRAP_SHAPE),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }
        path = Path(out_dir) / "metrics_official.json"
        write_json_atomic(path, payload)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
