"""Calibrate a method's digits defaults by the rule in methods/__init__.py, on a small grid.

For each grid point, runs the method N times (seeds 1,000,000 + i, as `apply`) from the stored
original of a digits store with N reference models, in this process, and prints the mean
logit-scaled confidence of the forget examples over runs and examples (to compare with the
reference models' and the original's), the mean test accuracy (to compare with the original's:
the rule keeps values within 1 point) and the seconds per run. It never computes F.

    python benchmarks/calibrate_methods.py --method noisy-finetune \
        --grid noise_std=0.05,0.1,0.2 --grid lr=0.01,0.05 [--set epochs=3] [--num-models 20]
        [--store DIR]

Several --grid options make a product grid; --set holds a key fixed at every point. The store
(default: a temporary folder) is made with `train_refs.run` under the digits default when it holds
no experiment yet.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key] = values.split(",")
    return grid


def main() -> int:
    import torch

    from unlearn_cli import apply, train_refs
    from unlearn_cli.config import load_config
    from unlearn_cli.context import context
    from unlearn_cli.launch import resolve_shared
    from unlearn_cli.methods import REGISTRY, method_params
    from unlearn_cli.metrics import logit_scaled_confidence
    from unlearn_cli.models import build_model
    from unlearn_cli.store import ORIGINAL, REFERENCE, Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=list(REGISTRY))
    parser.add_argument("--grid", action="append", default=[])
    parser.add_argument("--set", dest="fixed", action="append", default=[],
                        help="key=value held fixed at every grid point")
    parser.add_argument("--num-models", type=int, default=20)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each launcher worker
    grid = parse_grid(args.grid)
    base = load_config(None)
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        root = args.store or Path(tmp) / "digits"
        store = Store(root)
        if not store.exists() or len(store.done_seeds(REFERENCE)) < args.num_models:
            train_refs.run(base, root, num_models=args.num_models)
        split = store.load_split()
        forget_y = split["forget_labels"]
        refs = store.done_seeds(REFERENCE)[: args.num_models]
        ref_conf = np.mean([logit_scaled_confidence(store.load_outputs(REFERENCE, s)[0]
                                                    ["forget_logits"], forget_y).mean()
                            for s in refs])
        outputs, _ = store.load_outputs(ORIGINAL)
        orig_conf = logit_scaled_confidence(outputs["forget_logits"], forget_y).mean()
        orig_test = (outputs["test_logits"].argmax(1) == split["test_labels"]).mean()
        fixed = f" with {', '.join(args.fixed)}" if args.fixed else ""
        print(f"{args.method}{fixed}: N = {args.num_models}; forget confidence: retrained "
              f"{ref_conf:.2f}, original {orig_conf:.2f}; original test accuracy {orig_test:.3f}")
        original = store.load_model(ORIGINAL)
        ctx = context({"config": base.to_dict()}, "cpu",
                      resolve_shared(apply._shared(base, store, original)))
        data = apply._method_data(ctx)
        test_x, test_y = ctx.subset("test")
        forget_x = ctx.subset("forget")[0]
        method = REGISTRY[args.method]
        keys = list(grid)
        print(f"{'  '.join(keys) or 'defaults':<30} {'conf':>6} {'gap':>6} {'test':>6} "
              f"{'d test':>7} {'s/run':>6}")
        for values in itertools.product(*(grid[k] for k in keys)):
            sets = [f"method.{args.method}.{item}" for item in args.fixed]
            sets += [f"method.{args.method}.{k}={v}" for k, v in zip(keys, values)]
            params = method_params(method, load_config(None, sets))
            confs, tests, seconds = [], [], []
            for i in range(args.num_models):
                seed = apply.unlearn_seed(i)
                model = build_model(original["model"])
                model.load_state_dict(original["state_dict"])
                model.eval()
                torch.manual_seed(seed)
                start = time.perf_counter()
                model = method.fn(model, data, params, device=torch.device("cpu"), seed=seed)
                seconds.append(time.perf_counter() - start)
                with torch.no_grad():
                    model.eval()
                    confs.append(logit_scaled_confidence(model(forget_x).numpy(),
                                                         forget_y).mean())
                    tests.append((model(test_x).argmax(1) == test_y).float().mean().item())
            conf, test = float(np.mean(confs)), float(np.mean(tests))
            label = "  ".join(values) or "defaults"
            print(f"{label:<30} {conf:>6.2f} {conf - ref_conf:>+6.2f} {test:>6.3f} "
                  f"{test - orig_test:>+7.3f} {np.mean(seconds):>6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
