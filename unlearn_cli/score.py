"""`unlearn score`: read the stored per-sample outputs and compute the metric. Runs no model.

Unequal bank sizes: the official metric compares two banks of N models each (its bucket count and
its largest finite epsilon depend on N). When the store holds N_R reference models and N_U
unlearning runs with N_R != N_U, the first N = min(N_R, N_U) of each bank (by seed) are scored and
the report says so under `num_models.scored`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .errors import StoreError, UnlearnError
from .store import ORIGINAL, REFERENCE, UNLEARNED, Store, now, versions

SCHEMA = "unlearn.report/1"
RUNTIME_GATE = 0.2  # the challenge rejected methods slower than ~20% of retraining
METRICS = ("official", "seed", "all")
MIN_MODELS = 3  # per bank: below this the buckets of H are empty (ceil(ln(N - 1)) = 0)


def _bank(store: Store, kind: str, seeds: Sequence[int], method: str | None = None
          ) -> dict[str, Any]:
    """Stack one bank's outputs: forget/test logits [N, E, C], retain correctness [N, R], ..."""
    parts: dict[str, list[np.ndarray]] = {}
    walls, timings = [], []
    for seed in seeds:
        arrays, meta = store.load_outputs(kind, seed, method)
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
        walls.append(float(meta.get("wall_seconds", np.nan)))
        timings.append(meta.get("timing", "sequential"))
    bank: dict[str, Any] = {k: np.stack(v) for k, v in parts.items()}
    bank["wall_seconds"] = np.asarray(walls)
    bank["timing"] = timings
    return bank


def _first(bank: dict[str, Any], n: int) -> dict[str, Any]:
    """The first n models of a bank (by seed)."""
    return {k: v[:n] for k, v in bank.items()}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-model accuracy. logits [N, K, C], labels [K] -> [N]."""
    return (logits.argmax(axis=-1) == labels[None, :]).mean(axis=1)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _retrain_seconds(bank: dict[str, Any]) -> tuple[float, str]:
    """Mean seconds to retrain one model, from models timed alone where there are any."""
    sequential = [w for w, t in zip(bank["wall_seconds"], bank["timing"]) if t == "sequential"]
    if sequential:
        return float(np.mean(sequential)), f"mean of {len(sequential)} models trained alone"
    shared = [w for w, t in zip(bank["wall_seconds"], bank["timing"]) if t == "shared-gpu"]
    if shared:
        return float(np.mean(shared)), (f"mean of {len(shared)} models trained while other "
                                         "workers shared their GPU (not alone)")
    return float(np.mean(bank["wall_seconds"])), "share of ensemble training (understates)"


def _official_part(u_conf: np.ndarray, r_conf: np.ndarray, *, bootstrap: int, seed: int
                   ) -> dict[str, Any]:
    eps = metrics.per_example_epsilons(u_conf, r_conf)
    n = u_conf.shape[0]
    scores = metrics.example_scores(eps, n)
    fq = float(np.mean(scores))
    # Like for like: the ceiling is F at N // 2 (two halves of the references), so the method is
    # also scored at N // 2 against the same reference halves; `share` compares those two.
    ceiling = metrics.calibrated_ceiling(r_conf, unlearned=u_conf, seed=seed)
    out: dict[str, Any] = {
        "forget_quality": fq,
        "epsilon": eps,
        "score": scores,
        "ceiling": ceiling,
    }
    if bootstrap > 0:
        lo, hi = metrics.bootstrap_forget_quality(
            u_conf, r_conf, num_resamples=bootstrap, seed=seed
        )
        out["interval"] = [float(lo), float(hi)]
    return out


def score_method(store: Store, method: str, *, metric: str = "official", bootstrap: int = 100,
                 seed: int = 0, references: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report for one stored method (see the README for its fields).

    references: every stored reference model's outputs as `_bank` stacks them, when the caller
    scores several methods and loads them once; read from the store otherwise.
    """
    exp = store.read_experiment()
    split = store.load_split()
    ref_seeds = store.done_seeds(REFERENCE)
    unl_seeds = store.done_seeds(UNLEARNED, method)
    if not ref_seeds:
        raise StoreError(f"store {store.root} has no reference models; run "
                         f"`unlearn train-refs --store {store.root}` first")
    if not unl_seeds:
        raise StoreError(f"store {store.root} has no runs of method {method!r}; run "
                         f"`unlearn apply --method {method} --store {store.root}` first")
    n = min(len(ref_seeds), len(unl_seeds))
    if n < MIN_MODELS:
        raise StoreError(
            f"the official metric needs at least {MIN_MODELS} models per bank; store {store.root} "
            f"has {len(ref_seeds)} reference model(s) and {len(unl_seeds)} run(s) of {method!r}: "
            f"run `unlearn train-refs --num-models {MIN_MODELS}` and `unlearn apply` again"
        )
    if references is None:
        references = _bank(store, REFERENCE, ref_seeds)
    refs = _first(references, n)
    unl = _bank(store, UNLEARNED, unl_seeds[:n], method)
    forget_y, test_y = split["forget_labels"], split["test_labels"]

    def conf(bank: dict[str, Any]) -> np.ndarray:
        logits = bank["forget_logits"]  # [N, E, C]
        flat = metrics.logit_scaled_confidence(
            logits.reshape(-1, logits.shape[-1]), np.tile(forget_y, logits.shape[0])
        )
        return flat.reshape(logits.shape[0], logits.shape[1])  # [N, E]

    for name, bank, seeds in (("reference models", refs, ref_seeds), (method, unl, unl_seeds)):
        bad = [s for s, lg in zip(seeds, bank["forget_logits"]) if not np.isfinite(lg).all()]
        if bad:
            raise StoreError(
                f"{name} in store {store.root}: the outputs of seed(s) {bad[:5]} are not finite "
                "(a diverged model); delete those seed folders and rerun the command that made them"
            )

    u_conf, r_conf = conf(unl), conf(refs)
    utility = {}
    for name, fn in (
        ("retain_accuracy", lambda b: b["retain_correct"].mean(axis=1)),
        ("test_accuracy", lambda b: _accuracy(b["test_logits"], test_y)),
        ("forget_accuracy", lambda b: _accuracy(b["forget_logits"], forget_y)),
    ):
        u, r = float(np.mean(fn(unl))), float(np.mean(fn(refs)))
        utility[name] = {"unlearned": u, "retrained": r, "ratio": _ratio(u, r)}
    original: dict[str, Any] = {}
    if store.is_done(ORIGINAL):
        o_arrays, _ = store.load_outputs(ORIGINAL)
        original = {
            "retain_accuracy": float(o_arrays["retain_correct"].mean()),
            "test_accuracy": float(_accuracy(o_arrays["test_logits"][None], test_y)[0]),
            "forget_accuracy": float(_accuracy(o_arrays["forget_logits"][None], forget_y)[0]),
        }

    u_sec = float(np.mean(unl["wall_seconds"]))
    r_sec, r_how = _retrain_seconds(refs)
    runtime_ratio = _ratio(u_sec, r_sec)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "method": method,
        "metric": metric,
        "store": str(store.root),
        "num_models": {"retrained": len(ref_seeds), "unlearned": len(unl_seeds), "scored": n},
        "num_forget_examples": int(u_conf.shape[1]),
    }
    ra, ta = utility["retain_accuracy"]["ratio"], utility["test_accuracy"]["ratio"]
    if metric in ("official", "all"):
        part = _official_part(u_conf, r_conf, bootstrap=bootstrap, seed=seed)
        fq = part["forget_quality"]
        ceiling = part["ceiling"]
        report["forget_quality"] = fq
        report["forget_quality_interval"] = part.get("interval")
        report["ceiling"] = ceiling
        report["reading"] = reading(ceiling)
        report["final_score"] = fq * ra * ta
        report["final_score_clipped"] = fq * min(ra, 1.0) * min(ta, 1.0)
        report["per_example"] = {
            "index": split["forget"].tolist(),
            "epsilon": part["epsilon"].tolist(),
            "score": part["score"].tolist(),
        }
    if metric in ("seed", "all"):
        report["seed_metric"] = seed_part(unl, refs, forget_y, test_y)
    report["utility"] = utility
    report["original"] = original
    report["runtime"] = {
        "seconds_per_model": {"unlearned": u_sec, "retrained": r_sec},
        "retrained_timing": r_how,
        "ratio": runtime_ratio,
        "gate": RUNTIME_GATE,
        "over_gate": bool(runtime_ratio > RUNTIME_GATE),
    }
    report["method_record"] = store.method_record(method)
    report["config"] = exp.get("config", {})
    report["versions"] = {"scored_with": versions(), "store": exp.get("versions", {})}
    report["created"] = now()
    return report


def seed_part(unl: dict[str, Any], refs: dict[str, Any], forget_y: np.ndarray,
              test_y: np.ndarray) -> dict[str, Any]:
    """The seed's learned-attack variant and the starting kit's simple MIA (spec sections 2-3)."""
    from . import attacks

    def losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Cross-entropy per model and example: logits [N, K, C], labels [K] -> [N, K]."""
        z = logits.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=-1))
        true = np.take_along_axis(z, labels[None, :, None].repeat(z.shape[0], 0), -1)[..., 0]
        return log_norm - true

    u_forget = losses(unl["forget_logits"], forget_y)
    r_forget = losses(refs["forget_logits"], forget_y)
    seed = attacks.seed_scores(u_forget, r_forget)
    mia = attacks.simple_mia(u_forget, losses(unl["test_logits"], test_y))
    return {
        "score": float(seed.score),
        "dropped": int(seed.dropped),
        "above_one": int(seed.above_one),
        "attack_accuracy": float(seed.attack_accuracy),
        "simple_mia_accuracy": float(mia),
    }


def reading(ceiling: dict[str, Any]) -> str:
    """One line that tells a user how to read F: its share of the ceiling, at matched N."""
    share, half = ceiling.get("share", float("nan")), ceiling["num_models"]
    if not np.isfinite(share):
        return (f"no ceiling: halves of {half} models are too few (at least 6 models per bank "
                "are needed); compare F only with other methods at the same N")
    verdict = (
        "indistinguishable from retraining" if share >= 0.9
        else "partly forgets" if share >= 0.3
        else "barely forgets" if share > 0.05
        else "does not forget"
    )
    return (f"F is {share:.2f} of what a perfect unlearner scores at N = {half} "
            f"({ceiling['method_forget_quality']:.3f} vs ceiling {ceiling['forget_quality']:.3f}, "
            f"same reference halves): {verdict}")


def run(store_root: str | Path, *, methods: Sequence[str] | None = None, metric: str = "official",
        bootstrap: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Score the named methods (all stored ones by default); one report per method."""
    if bootstrap == 1 or bootstrap < 0:
        raise UnlearnError(f"--bootstrap {bootstrap}: expected 0 (no interval) or at least 2 "
                           "resamples, e.g. --bootstrap 100")
    if metric not in METRICS:
        raise UnlearnError(f"--metric {metric!r} is not known; expected one of: "
                           f"{', '.join(METRICS)}")
    store = Store(store_root)
    store.read_experiment()
    stored = store.stored_methods()
    if methods:
        chosen = list(methods)
    else:
        chosen = stored
        if not chosen:
            raise StoreError(
                f"store {store.root} holds no unlearning runs yet; run `unlearn apply --method "
                f"finetune --store {store.root}` first"
            )
    # The reference bank is the same for every method: read its outputs once.
    references = _bank(store, REFERENCE, store.done_seeds(REFERENCE))
    return [score_method(store, m, metric=metric, bootstrap=bootstrap, seed=seed,
                         references=references)
            for m in chosen]
