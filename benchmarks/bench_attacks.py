"""Benchmark: the seed's metric (spec §2), both variants, vs the seed notebook's scikit-learn loop.

Run: python benchmarks/bench_attacks.py
- `seed_scores` (the seed's fits, issue 18): 1,000 forget examples x (100 + 100) models in <= 5 s
  on the project's 2-core machines, spread over the cores. Timed cold (the first call of a
  process, helper processes starting, as in `unlearn score`) and warm (median of repeats).
- `seed_converged_scores` (batched Newton): <= 0.3 s (performance.md, Scoring).
- `held_out_lira` and `klom_per_example` (issue 14): <= 0.5 s each on the same sizes, beside a
  straightforward per-example loop (timed on a subset, extrapolated per example).
The notebook's loop (cross_val_score twice per example, 4 fits) is timed on a subset and
extrapolated per example, since its full loop takes tens of seconds. If UNLEARN_BENCH_OUT names a
folder, the numbers are also written to attacks_seed.json there. Exits 0 even when a target fails.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, make_scorer
from sklearn.model_selection import cross_val_score

REPO_ROOT = Path(__file__).resolve().parents[1]  # so the script runs without an install
NUM_EXAMPLES = 1_000  # forget examples
NUM_MODELS = 100  # models per bank
SKLEARN_SUBSET = 100  # examples run through scikit-learn, extrapolated to NUM_EXAMPLES
REPEATS = 5  # seed_converged_scores timings; the median is reported
FAITHFUL_REPEATS = 3  # warm seed_scores timings after the cold one
TARGET_S = 5.0  # seconds for seed_scores on NUM_EXAMPLES x (NUM_MODELS + NUM_MODELS)
CONVERGED_TARGET_S = 0.3  # seconds for seed_converged_scores on the same
SECOND_OPINION_TARGET_S = 0.5  # seconds for held_out_lira and for klom_per_example, each
LOOP_SUBSET = 50  # examples run through the per-example loops, extrapolated
DATA_SEED = 0
DELTA = 1e-6


def synthetic_losses(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-example cross-entropy-like losses, [NUM_MODELS, NUM_EXAMPLES] per bank.

    Each example has its own typical loss; the unlearned bank matches the retrained one for 40%
    of the examples, is shifted up by 0.3 of a spread for 30%, by 1.5 spreads for 20% and is
    far off (near separable) for the remaining 10%.
    """
    level = rng.uniform(-3.0, 1.0, size=NUM_EXAMPLES)  # log of the typical loss per example
    draw = rng.random(NUM_EXAMPLES)
    shift = np.select([draw < 0.4, draw < 0.7, draw < 0.9], [0.0, 0.3, 1.5], default=5.0)
    retrained = np.exp(level + 0.5 * rng.standard_normal((NUM_MODELS, NUM_EXAMPLES)))
    unlearned = np.exp(level + 0.5 * (shift + rng.standard_normal((NUM_MODELS, NUM_EXAMPLES))))
    # The seed's losses come from float32 tensors.
    return unlearned.astype(np.float32), retrained.astype(np.float32)


def seed_loop_with_sklearn(unlearned: np.ndarray, retrained: np.ndarray) -> np.ndarray:
    """The seed's per-example loop (spec §2), scikit-learn at default settings. [E] scores.

    As in the seed notebook: cross_val_score(LogisticRegression(), cv=2) twice per example, once
    with the ε-bucket scorer and once for accuracy, so 4 fits per example.
    """
    num_models = unlearned.shape[0]
    cap = math.log(num_models / 2 - 1)
    labels = np.array([0] * num_models + [1] * num_models)

    def fold_score(y_true, y_pred):
        tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
        fpr, fnr = fp / (fp + tn), fn / (fn + tp)
        if fpr == 0 or fnr == 0:
            return np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            epsilon = np.nanmax(
                [np.log(1 - DELTA - fpr) - np.log(fnr), np.log(1 - DELTA - fnr) - np.log(fpr)]
            )
        if np.isnan(epsilon):
            return np.nan
        return 2 / 2 ** (int(min(epsilon, cap) / 0.5) + 1)

    scorer = make_scorer(fold_score)
    scores = []
    for e in range(unlearned.shape[1]):
        x = np.concatenate([retrained[:, e], unlearned[:, e]])[:, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN folds, as in the seed
            per_fold = cross_val_score(LogisticRegression(), x, labels, cv=2, scoring=scorer)
            cross_val_score(LogisticRegression(), x, labels, cv=2, scoring="accuracy")
            scores.append(np.nanmean(per_fold))
    return np.array(scores)


def lira_loop(unlearned: np.ndarray, retrained: np.ndarray, null_draws: int) -> float:
    """Seconds per example of a per-example held-out LiRA (k folds with scipy.stats, TPR at 1%
    and 5% FPR, the Monte-Carlo p-value): the straightforward way, no vectorisation."""
    from scipy.stats import norm

    from unlearn_cli.second_opinions import LIRA_FOLDS

    num_models = unlearned.shape[0]
    rng = np.random.default_rng(0)
    parts_u = np.array_split(rng.permutation(num_models), LIRA_FOLDS)
    parts_r = np.array_split(rng.permutation(num_models), LIRA_FOLDS)

    def one(u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        llr_u, llr_r = np.empty(num_models), np.empty(num_models)
        for held_u, held_r in zip(parts_u, parts_r, strict=True):
            fit_u, fit_r = np.delete(u, held_u), np.delete(r, held_r)
            sd_u = max(np.std(fit_u, ddof=1), 1e-6)
            sd_r = max(np.std(fit_r, ddof=1), 1e-6)
            for x, held, out in ((u, held_u, llr_u), (r, held_r, llr_r)):
                out[held] = norm.logpdf(x[held], fit_u.mean(), sd_u) - norm.logpdf(
                    x[held], fit_r.mean(), sd_r
                )
        return llr_u, llr_r

    start = time.perf_counter()
    null_rng = np.random.default_rng(1)
    null = []
    subset = LOOP_SUBSET
    for _ in range(subset):  # the null: the same work per simulated example
        a, b = one(null_rng.standard_normal(num_models), null_rng.standard_normal(num_models))
        null.append(np.sum(a > 0) + np.sum(b <= 0))
    null = np.sort(null)
    for e in range(subset):
        llr_u, llr_r = one(unlearned[:, e], retrained[:, e])
        correct = np.sum(llr_u > 0) + np.sum(llr_r <= 0)
        _ = (1 + np.sum(null >= correct)) / (1 + null.size)
        for fpr in (0.01, 0.05):
            threshold = np.sort(llr_r)[::-1][int(fpr * num_models)]
            _ = np.mean(llr_u > threshold)
    return (time.perf_counter() - start) / (2 * subset)


def klom_loop(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """Seconds per example of KLOM the bench's way: per example np.linspace, np.histogram and
    scipy.stats.entropy."""
    from scipy.stats import entropy

    start = time.perf_counter()
    for e in range(LOOP_SUBSET):
        p, q = np.clip(unlearned[:, e], -100, 100), np.clip(retrained[:, e], -100, 100)
        low, high = min(p.min(), q.min()), max(p.max(), q.max())
        edges = np.linspace(low, high if high > low else low + 1, 21)
        p_prob = np.histogram(p, edges)[0] / p.size
        q_prob = np.histogram(q, edges)[0] / q.size
        entropy(pk=p_prob, qk=np.where(p_prob > 0, np.maximum(q_prob, 1e-5), q_prob))
    return (time.perf_counter() - start) / LOOP_SUBSET


def second_opinions(rng: np.random.Generator) -> dict:
    """Time held_out_lira and klom_per_example on NUM_EXAMPLES x (NUM_MODELS + NUM_MODELS)."""
    from unlearn_cli.second_opinions import LIRA_NULL_DRAWS, held_out_lira, klom_per_example

    # Confidences / margins of confident models: per-example level, some examples shifted.
    level = rng.uniform(2.0, 8.0, size=NUM_EXAMPLES)
    shift = np.where(rng.random(NUM_EXAMPLES) < 0.5, 0.0, 0.8)
    retrained = level + rng.standard_normal((NUM_MODELS, NUM_EXAMPLES))
    unlearned = level + shift + rng.standard_normal((NUM_MODELS, NUM_EXAMPLES))
    out = {}
    for name, run, loop, loop_examples in (
        ("lira", lambda: held_out_lira(unlearned, retrained),
         lambda: lira_loop(unlearned, retrained, LIRA_NULL_DRAWS),
         NUM_EXAMPLES + LIRA_NULL_DRAWS),
        ("klom", lambda: klom_per_example(unlearned, retrained),
         lambda: klom_loop(unlearned, retrained), NUM_EXAMPLES),
    ):
        run()  # warm-up
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        ours = float(np.median(times))
        per_example = loop()
        loop_s = per_example * loop_examples
        out[name] = {"seconds": ours, "runs_s": times, "loop_per_example_s": per_example,
                     "loop_extrapolated_s": loop_s, "ratio": loop_s / ours,
                     "passed": ours <= SECOND_OPINION_TARGET_S}
        extra = f" (+ {LIRA_NULL_DRAWS} simulated null examples)" if name == "lira" else ""
        print(
            f"  {name}: {ours:.3f} s (median of {REPEATS}); per-example loop "
            f"{1e3 * per_example:.2f} ms per example, {loop_s:.1f} s extrapolated to "
            f"{NUM_EXAMPLES} examples{extra}: {loop_s / ours:.0f}x; target <= "
            f"{SECOND_OPINION_TARGET_S} s: {'PASS' if ours <= SECOND_OPINION_TARGET_S else 'FAIL'}"
        )
    return out


def write_json_atomically(path: Path, payload: dict) -> None:
    """Write JSON to a temp file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
        temp = f.name
    os.replace(temp, path)


def main() -> int:
    sys.path.insert(0, str(REPO_ROOT))
    from unlearn_cli.attacks import _worker_count, seed_converged_scores, seed_scores

    rng = np.random.default_rng(DATA_SEED)
    unlearned, retrained = synthetic_losses(rng)
    workers = _worker_count(None)

    # The seed's fits: the first call pays for scikit-learn's import and the helpers' start.
    start = time.perf_counter()
    faithful = seed_scores(unlearned, retrained)
    cold_s = time.perf_counter() - start
    warm_times = []
    for _ in range(FAITHFUL_REPEATS):
        start = time.perf_counter()
        seed_scores(unlearned, retrained)
        warm_times.append(time.perf_counter() - start)
    warm_s = float(np.median(warm_times))
    start = time.perf_counter()
    seed_scores(unlearned, retrained, workers=1)
    one_process_s = time.perf_counter() - start

    seed_converged_scores(unlearned[:, :10], retrained[:, :10])  # warm-up (allocator)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        converged = seed_converged_scores(unlearned, retrained)
        times.append(time.perf_counter() - start)
    converged_s = float(np.median(times))

    start = time.perf_counter()
    reference = seed_loop_with_sklearn(unlearned[:, :SKLEARN_SUBSET], retrained[:, :SKLEARN_SUBSET])
    sklearn_subset_s = time.perf_counter() - start
    sklearn_per_example_s = sklearn_subset_s / SKLEARN_SUBSET
    sklearn_full_s = sklearn_per_example_s * NUM_EXAMPLES

    def agreement(per_example: np.ndarray) -> tuple[np.ndarray, float]:
        ours = per_example[:SKLEARN_SUBSET]
        same = (ours == reference) | (np.isnan(ours) & np.isnan(reference))
        return same, abs(float(np.nanmean(ours)) - float(np.nanmean(reference)))

    same, score_diff = agreement(faithful.per_example)
    same_converged, converged_diff = agreement(converged.per_example)
    passed = cold_s <= TARGET_S
    converged_passed = converged_s <= CONVERGED_TARGET_S

    print(f"seed metric, {NUM_EXAMPLES} examples x ({NUM_MODELS} + {NUM_MODELS}) models, "
          f"{workers} process(es)")
    print(
        f"  seed_scores (the seed's fits): {cold_s:.2f} s cold (first call, helpers starting), "
        f"{warm_s:.2f} s warm (median of {FAITHFUL_REPEATS}), {one_process_s:.2f} s in one process"
    )
    print(
        f"    score {faithful.score:.4f}, dropped {faithful.dropped}, above one "
        f"{faithful.above_one}, attack accuracy {faithful.attack_accuracy:.4f}"
    )
    print(
        f"  seed_converged_scores (batched Newton): {converged_s:.3f} s  (median of {REPEATS}: "
        + ", ".join(f"{t:.3f}" for t in times)
        + ")"
    )
    print(
        f"    score {converged.score:.4f}, dropped {converged.dropped}, above one "
        f"{converged.above_one}, attack accuracy {converged.attack_accuracy:.4f}"
    )
    print(
        f"  the notebook's loop (default LogisticRegression, 4 fits per example): "
        f"{sklearn_subset_s:.2f} s for {SKLEARN_SUBSET} examples = "
        f"{1e3 * sklearn_per_example_s:.1f} ms per example, {sklearn_full_s:.1f} s extrapolated "
        f"to {NUM_EXAMPLES}"
    )
    print(
        f"  ratio to the notebook's loop (this run): seed_scores {sklearn_full_s / cold_s:.1f}x "
        f"cold, {sklearn_full_s / warm_s:.1f}x warm; seed_converged_scores "
        f"{sklearn_full_s / converged_s:.0f}x"
    )
    print(
        f"  agreement with the notebook on the {SKLEARN_SUBSET}-example subset: seed_scores "
        f"{same.mean():.1%} identical examples (score difference {score_diff:.4f}); "
        f"seed_converged_scores {same_converged.mean():.1%} (difference {converged_diff:.4f})"
    )
    print(f"  target seed_scores cold <= {TARGET_S} s: {'PASS' if passed else 'FAIL'}; "
          f"seed_converged_scores <= {CONVERGED_TARGET_S} s: "
          f"{'PASS' if converged_passed else 'FAIL'}")

    print(f"second opinions, {NUM_EXAMPLES} forget examples x ({NUM_MODELS} + {NUM_MODELS}) "
          "models")
    opinions = second_opinions(rng)

    out = os.environ.get("UNLEARN_BENCH_OUT")
    if out:
        path = Path(out) / "attacks_seed.json"
        write_json_atomically(
            path,
            {
                "benchmark": "attacks_seed",
                "num_examples": NUM_EXAMPLES,
                "num_models_per_bank": NUM_MODELS,
                "data_seed": DATA_SEED,
                "workers": workers,
                "seed_scores_cold_s": cold_s,
                "seed_scores_warm_s": warm_s,
                "seed_scores_warm_runs_s": warm_times,
                "seed_scores_one_process_s": one_process_s,
                "seed_converged_scores_s": converged_s,
                "seed_converged_scores_runs_s": times,
                "sklearn_subset_examples": SKLEARN_SUBSET,
                "sklearn_subset_s": sklearn_subset_s,
                "sklearn_per_example_s": sklearn_per_example_s,
                "sklearn_extrapolated_s": sklearn_full_s,
                "ratio_cold": sklearn_full_s / cold_s,
                "ratio_warm": sklearn_full_s / warm_s,
                "ratio_converged": sklearn_full_s / converged_s,
                "identical_fraction_seed": float(same.mean()),
                "identical_fraction_converged": float(same_converged.mean()),
                "score_difference_converged": converged_diff,
                "seed": {"score": faithful.score, "dropped": faithful.dropped,
                         "above_one": faithful.above_one,
                         "attack_accuracy": faithful.attack_accuracy},
                "converged": {"score": converged.score, "dropped": converged.dropped,
                              "above_one": converged.above_one,
                              "attack_accuracy": converged.attack_accuracy},
                "target_s": TARGET_S,
                "passed": passed,
                "converged_target_s": CONVERGED_TARGET_S,
                "converged_passed": converged_passed,
                "second_opinions": opinions,
                "second_opinion_target_s": SECOND_OPINION_TARGET_S,
                "versions": {
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "scipy": scipy.__version__,
                    "sklearn": sklearn.__version__,
                },
                "machine": platform.platform(),
                "cpu_count": os.cpu_count(),
            },
        )
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
