"""What the HTML report adds to `unlearn score`: 12 methods x 100 models on digits (issue 13).

Side by side in one run, each a fresh process as a user runs it, alternated and repeated (the
fastest of each kind is kept):
- `unlearn score --out a.json`                  (the baseline)
- `unlearn score --out b.json --html b.html`    (the report: best rules, figures, page)
- `unlearn score --out c.json --plots DIR`      (for information: every figure as PNG and SVG)
Target: the report adds <= 3 s to score.

The store: the digits default's real split (1,347 training examples, 135 forget examples and their
8x8 images, 450 test examples), with 100 reference models and 12 methods x 100 runs whose outputs
are drawn at random instead of trained (seconds instead of minutes). What the report costs depends
on the number of methods, models and forget examples and on how often the interval family of
attacks wins, not on how the logits were made; the draws give every method a different overlap
with the references, so both families win somewhere. Pass --store to time a real store instead.

    python benchmarks/bench_report.py [--store PATH] [--repeats 2] [--bootstrap 0]
Writes report.json to $UNLEARN_BENCH_OUT when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_SECONDS = 3.0
# The twelve built-in methods' names, as labels only: their outputs are drawn, not trained.
METHODS = ("retrain", "finetune", "reset-head", "neggrad", "neggrad-plus", "random-label", "scrub",
           "salun", "l1-sparse", "bad-teacher", "ssd", "none")


def synthetic_store(root: Path, num_models: int, seed: int = 0) -> Path:
    """A digits store whose model outputs are random draws (see the module docstring)."""
    from unlearn_cli.config import load_config
    from unlearn_cli.data import _digits_arrays, make_split
    from unlearn_cli.store import REFERENCE, UNLEARNED, Store, hash_split

    cfg = load_config(None)
    _, labels = _digits_arrays()
    split = make_split(labels, cfg.data)
    for part in ("train", "test", "forget", "retain"):
        split[f"{part}_labels"] = labels[split[part]].astype(np.int64)
    store = Store(root)
    store.init_experiment(cfg, split)
    # The provenance every stored model carries (the store checks it when reading).
    prov = {"config_hash": cfg.identity_hash(), "split_hash": hash_split(split)}
    rng = np.random.default_rng(seed)
    forget_y, test_y = split["forget_labels"], split["test_labels"]
    num_forget, num_test, num_retain = forget_y.size, test_y.size, split["retain"].size
    margin = rng.normal(3.0, 1.0, num_forget)  # how confidently a reference model knows each
    spread = rng.uniform(0.2, 1.0, num_forget)  # per-example spread across seeds

    def outputs(shift: float, width: float) -> dict[str, np.ndarray]:
        forget = rng.normal(0.0, 1.0, (num_forget, 10)).astype(np.float32)
        forget[np.arange(num_forget), forget_y] = margin + shift + width * spread * rng.normal(
            size=num_forget)
        test = rng.normal(0.0, 1.0, (num_test, 10)).astype(np.float32)
        test[np.arange(num_test), test_y] += 3.0
        return {"forget_logits": forget, "test_logits": test,
                "retain_loss": rng.uniform(0, 0.2, num_retain).astype(np.float32),
                "retain_correct": rng.random(num_retain) < 0.97}

    for s in range(num_models):
        store.save_outputs(REFERENCE, s, outputs(0.0, 1.0),
                           {**prov, "wall_seconds": 5.0, "timing": "sequential"})
    for j, method in enumerate(METHODS):
        store.save_method(method, {"name": method, "spec": method, "params": {}})
        shift, width = 1.5 * j / (len(METHODS) - 1), 0.5 + j % 3 * 0.4
        for s in range(num_models):
            store.save_outputs(UNLEARNED, 1_000_000 + s, outputs(shift, width),
                               {**prov, "wall_seconds": 0.3 + 0.1 * j, "timing": "sequential"},
                               method=method)
    return root


def timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `unlearn` command in a fresh process. CPU seconds count
    the process and the workers it forked and reaped; on a loaded machine they are the steadier
    of the two."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unlearn_cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="time this store instead of a drawn one")
    parser.add_argument("--num-models", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="resamples for F's interval; the report's cost does not depend on it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.store is None:
            start = time.perf_counter()
            store = synthetic_store(tmp / "store", args.num_models)
            print(f"drew a digits store: 100 reference models, {len(METHODS)} methods x "
                  f"{args.num_models} runs ({time.perf_counter() - start:.1f} s)")
        else:
            store = args.store
        common = ["score", "--store", str(store), "--bootstrap", str(args.bootstrap)]
        load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        plain, html, plots = [], [], []
        for r in range(args.repeats):
            plain.append(timed([*common, "--out", str(tmp / f"a{r}.json")]))
            html.append(timed([*common, "--out", str(tmp / f"b{r}.json"),
                               "--html", str(tmp / f"b{r}.html")]))
            plots.append(timed([*common, "--out", str(tmp / f"c{r}.json"),
                                "--plots", str(tmp / f"plots{r}")]))
        load_after = os.getloadavg()[0]
        doc = json.loads((tmp / "b0.json").read_text())
        methods = len(doc.get("methods", [doc]))
        n = doc.get("methods", [doc])[0]["num_models"]["scored"]
        size = (tmp / "b0.html").stat().st_size
        files = len(list((tmp / "plots0").iterdir()))
    def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return min(w for w, _ in runs), min(c for _, c in runs)

    def runs(timings: list[tuple[float, float]]) -> str:
        return ", ".join(f"{w:.2f}" for w, _ in timings)

    added = best(html)[0] - best(plain)[0]
    added_cpu = best(html)[1] - best(plain)[1]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"unlearn score, {methods} methods x N = {n} on digits, bootstrap {args.bootstrap}, "
          f"fastest of {args.repeats} (fresh process each); {cores} cores, load average "
          f"{load_before:.1f} before, {load_after:.1f} after; wall and CPU seconds:")
    print(f"  score --out               {best(plain)[0]:7.2f} s  {best(plain)[1]:7.2f} cpu-s"
          f"  (wall of each run: {runs(plain)})")
    print(f"  score --out --html        {best(html)[0]:7.2f} s  {best(html)[1]:7.2f} cpu-s"
          f"  (wall of each run: {runs(html)}); page {size / 1e6:.2f} MB")
    print(f"  score --out --plots DIR   {best(plots)[0]:7.2f} s  {best(plots)[1]:7.2f} cpu-s"
          f"  ({files} files)")
    verdict = "PASS" if added <= TARGET_SECONDS else "FAIL"
    print(f"the HTML report adds {added:.2f} s to score ({added_cpu:.2f} cpu-s); target <= "
          f"{TARGET_SECONDS:.0f} s: {verdict}")
    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.json").write_text(json.dumps(
            {"methods": methods, "num_models": n, "bootstrap": args.bootstrap,
             "score_wall_cpu_seconds": plain, "score_html_wall_cpu_seconds": html,
             "score_plots_wall_cpu_seconds": plots, "added_seconds": added,
             "added_cpu_seconds": added_cpu, "html_bytes": size, "plot_files": files,
             "target_seconds": TARGET_SECONDS, "pass": verdict == "PASS",
             "cores": cores, "load_average_before": load_before,
             "load_average_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
