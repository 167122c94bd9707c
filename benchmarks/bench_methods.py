"""Every built-in unlearning method at N = 100 on the digits default: who forgets, at what cost.

Trains the original and 100 reference models once (`train_refs.run`), runs each built-in method
(the baselines and the NeurIPS 2023 challenge entries) 100 times from the original (`apply.run`,
the default launcher: one worker process per core), scores them all (`score.run`, no bootstrap) and
prints one row per method: forgetting quality F, F as a share of the calibrated ceiling (both at
N/2 against the same halves of the references: 1 means as good as retraining), the final score F x
retain-accuracy ratio x test-accuracy ratio, the runtime ratio to retraining (the challenge
rejected methods over 0.2), accuracies, and the wall time of the method's `apply`. The ceiling
itself (retrained models against retrained models) is printed above the table, and the README's
table (F, share, final, runtime ratio) below it, in Markdown.

    python benchmarks/bench_methods.py [--num-models 100] [--store runs/bench-methods]

The store is a temporary folder unless --store is given (a given store is reused: finished
models are not retrained, so only a fresh store gives honest times). If UNLEARN_BENCH_OUT names a
folder, the table is also written to methods.json there, with the config and versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # so the script runs without an install
sys.path.insert(0, str(ROOT))


def json_ready(value: Any) -> Any:
    """NaN and infinities become null (JSON has no such numbers); containers are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(json_ready(payload), f, indent=2, allow_nan=False, default=str)
        temp = f.name
    os.replace(temp, path)


def ceiling_value(report: dict[str, Any]) -> float:
    return float(report["ceiling"]["forget_quality"])


def row(report: dict[str, Any], apply_seconds: float) -> dict[str, Any]:
    util = report["utility"]
    return {
        "method": report["method"],
        "forget_quality": report["forget_quality"],
        "final_score": report["final_score"],
        # F / ceiling with both at N // 2 against the same reference halves (score's reading)
        "share_of_ceiling": report["ceiling"].get("share", float("nan")),
        "runtime_ratio": report["runtime"]["ratio"],
        "seconds_per_run": report["runtime"]["seconds_per_model"]["unlearned"],
        "forget_accuracy": util["forget_accuracy"]["unlearned"],
        "retain_accuracy": util["retain_accuracy"]["unlearned"],
        "test_accuracy": util["test_accuracy"]["unlearned"],
        "apply_wall_seconds": apply_seconds,
    }


def print_table(rows: list[dict[str, Any]], report: dict[str, Any], n: int) -> None:
    util = report["utility"]
    retrain_s = report["runtime"]["seconds_per_model"]["retrained"]
    print(f"digits default, N = {n} reference models and {n} runs per method")
    timing = report["runtime"]["retrained_timing"]
    print(f"calibrated ceiling (retrain vs retrain, {report['ceiling']['num_models']} models per "
          f"half): F = {ceiling_value(report):.3f}")
    print(f"retraining one model: {retrain_s * 1e3:.0f} ms ({timing})")
    print(f"reference models: forget acc {util['forget_accuracy']['retrained']:.3f}, "
          f"retain acc {util['retain_accuracy']['retrained']:.3f}, "
          f"test acc {util['test_accuracy']['retrained']:.3f}")
    header = (f"{'method':<22} {'F':>6} {'share':>6} {'final':>6} {'runtime':>8} {'ms/run':>7} "
              f"{'forget':>7} {'retain':>7} {'test':>6} {'apply s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<22} {r['forget_quality']:>6.3f} {r['share_of_ceiling']:>6.2f} "
              f"{r['final_score']:>6.3f} "
              f"{r['runtime_ratio']:>8.3f} {r['seconds_per_run'] * 1e3:>7.1f} "
              f"{r['forget_accuracy']:>7.3f} {r['retain_accuracy']:>7.3f} "
              f"{r['test_accuracy']:>6.3f} {r['apply_wall_seconds']:>8.1f}")
    print("F: forgetting quality (official metric) at N; share: F / ceiling, both at N // 2 "
          "against the same reference halves (1 = as good as retraining); final: F x retain "
          "ratio x test ratio; runtime: seconds per run / seconds to retrain one model (gate "
          "0.2); forget, retain, test: mean accuracies over the runs")


def markdown_table(rows: list[dict[str, Any]], report: dict[str, Any], n: int) -> str:
    """The README's table of the methods (F, share, final, runtime ratio), as Markdown."""
    groups = {r["method"]: r.get("group", "") for r in rows}
    lines = [f"Measured on the digits default (N = {n} reference models and {n} runs per method, "
             f"`benchmarks/bench_methods.py`; ceiling at {report['ceiling']['num_models']} "
             f"models per half {ceiling_value(report):.3f}; \"share\" is F at N/2 over the "
             "ceiling at N/2):",
             "",
             "| method | F | share | final | runtime ratio |",
             "|---|---|---|---|---|"]
    previous = None
    for r in rows:
        if previous is not None and groups[r["method"]] != previous:
            lines.append("| *challenge entries* | | | | |")
        previous = groups[r["method"]]
        lines.append(f"| {r['method']} | {r['forget_quality']:.3f} | "
                     f"{r['share_of_ceiling']:.2f} | {r['final_score']:.3f} | "
                     f"{r['runtime_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    from unlearn_cli import apply, score, train_refs
    from unlearn_cli.config import load_config
    from unlearn_cli.methods import REGISTRY
    from unlearn_cli.store import versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-models", type=int, default=100)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    n = args.num_models
    cfg = load_config(None)
    methods = list(REGISTRY)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        store = args.store or Path(tmp) / "digits"
        t0 = time.perf_counter()
        train_refs.run(cfg, store, num_models=n)
        refs_s = time.perf_counter() - t0
        print(f"train-refs: original + {n} reference models in {refs_s:.1f} s", flush=True)
        apply_s = {}
        for name in methods:
            t0 = time.perf_counter()
            apply.run(cfg, store, method_spec=name, num_models=n)
            apply_s[name] = time.perf_counter() - t0
            print(f"apply {name}: {apply_s[name]:.1f} s", flush=True)
        t0 = time.perf_counter()
        reports = score.run(store, methods=methods, bootstrap=0)
        score_s = time.perf_counter() - t0
    total_s = time.perf_counter() - start

    rows = [{**row(r, apply_s[r["method"]]), "group": REGISTRY[r["method"]].group}
            for r in reports]
    print()
    print_table(rows, reports[0], n)
    print(f"apply, all {len(methods)} methods: {sum(apply_s.values()):.1f} s; score: "
          f"{score_s:.1f} s; total wall time {total_s:.1f} s "
          f"({os.cpu_count()} CPUs, {platform.machine()})")
    print()
    print(markdown_table(rows, reports[0], n))

    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        path = Path(out) / "methods.json"
        write_json_atomically(path, {
            "benchmark": "methods",
            "num_models": n,
            "ceiling_forget_quality": ceiling_value(reports[0]),
            "retrain_seconds_per_model": reports[0]["runtime"]["seconds_per_model"]["retrained"],
            "rows": rows,
            "params": {r["method"]: r["method_record"]["params"] for r in reports},
            "seconds": {"train_refs": refs_s, "apply": apply_s, "score": score_s,
                        "total": total_s},
            "config": cfg.to_dict(),
            "versions": versions(),
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
        })
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
