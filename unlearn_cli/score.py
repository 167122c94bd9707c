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

from . import helpers, metrics
from .errors import StoreError, UnlearnError
from .store import ORIGINAL, REFERENCE, UNLEARNED, Store, now, versions

SCHEMA = "unlearn.report/2"  # 2: seed_converged, lira, klom; seed_metric.variant/per_example
RUNTIME_GATE = 0.2  # the challenge rejected methods slower than ~20% of retraining
METRICS = ("official", "seed", "seed-converged", "lira", "klom", "all")
MIN_MODELS = 3  # per bank: below this the buckets of H are empty (ceil(ln(N - 1)) = 0)


def _bank(store: Store, kind: str, seeds: Sequence[int], method: str | None = None
          ) -> dict[str, Any]:
    """Stack one bank's outputs: forget/test logits [N, E, C], retain correctness [N, R], ..."""
    parts: dict[str, list[np.ndarray]] = {}
    walls, cpus, devices, timings, loads, threads = [], [], [], [], [], []
    probes: dict[str, list[float]] = {"cpu": [], "wall": []}
    for seed in seeds:
        arrays, meta = store.load_outputs(kind, seed, method)
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
        walls.append(float(meta.get("wall_seconds", np.nan)))
        cpus.append(float(meta.get("cpu_seconds", np.nan)))  # absent in older stores
        devices.append(str(meta.get("device", "")))
        timings.append(meta.get("timing", "sequential"))
        loads.append(float(meta.get("load_average", np.nan)))  # absent in older stores
        threads.append(meta.get("threads"))
        for clock, values in probes.items():  # the speed probe around it (train_refs.Probe)
            values.append(float(meta.get(f"probe_{clock}_seconds", np.nan)))
    bank: dict[str, Any] = {k: np.stack(v) for k, v in parts.items()}
    bank["wall_seconds"] = np.asarray(walls)
    bank["cpu_seconds"] = np.asarray(cpus)
    bank["device"] = devices
    bank["timing"] = timings
    bank["load_average"] = np.asarray(loads)
    bank["threads"] = threads
    for clock, values in probes.items():
        bank[f"probe_{clock}_seconds"] = np.asarray(values)
    return bank


def _first(bank: dict[str, Any], n: int) -> dict[str, Any]:
    """The first n models of a bank (by seed)."""
    return {k: v[:n] for k, v in bank.items()}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-model accuracy. logits [N, K, C], labels [K] -> [N]."""
    return (logits.argmax(axis=-1) == labels[None, :]).mean(axis=1)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _kept(bank: dict[str, Any], alone_only: bool) -> tuple[list[int], str]:
    """The models whose times count: those timed alone (apply and train-refs time
    launch.timed_alone models of a lockstep bank alone, train_refs.timed_alone; every run of a
    method without a lockstep form is timed alone)."""
    keep = [i for i, t in enumerate(bank["timing"]) if t == "sequential" or not alone_only]
    if keep:
        return keep, f"median of {len(keep)} models timed alone"
    # Several workers on one GPU without MPS take turns: their wall times are not "alone".
    keep = [i for i, t in enumerate(bank["timing"]) if t == "shared-gpu"]
    if keep:
        return keep, (f"median of {len(keep)} models trained while other workers shared their "
                      "GPU (not alone)")
    # Only ensemble shares (older stores): say that they understate.
    return list(range(len(bank["timing"]))), "share of ensemble training (understates)"


def _probed_ratio(unl: dict[str, Any], u_keep: list[int], refs: dict[str, Any],
                  r_keep: list[int], clock: str) -> tuple[float, int, int] | None:
    """The runtime ratio in units of the speed probe (train_refs.Probe), from the counted models
    that were timed between two probes (launch.timed_alone a bank): median(time / probe) of the
    unlearning runs over the same for the retrained models, with how many of each it used; None
    when either side has none (stores made before probes). Each time is divided by the machine's
    speed of its moment, so a bank timed on a quiet machine and a method timed on a busy one
    still compare their work."""
    parts, counts = [], []
    for bank, keep in ((unl, u_keep), (refs, r_keep)):
        probe = bank[f"probe_{clock}_seconds"][keep]
        probed = np.isfinite(probe) & (probe > 0)
        if not probed.any():
            return None
        seconds = bank[f"{clock}_seconds"][keep][probed]
        parts.append(float(np.median(seconds / probe[probed])))
        counts.append(int(probed.sum()))
    return _ratio(*parts), counts[0], counts[1]


def _clock(*sides: tuple[dict[str, Any], list[int]]) -> str:
    """`cpu` when every counted model of both sides ran on a CPU and has its CPU seconds (then
    the ratio does not depend on what else the machine ran meanwhile; see
    train_refs.CpuClock), else `wall`."""
    for bank, keep in sides:
        if not all(bank["device"][i] == "cpu" and np.isfinite(bank["cpu_seconds"][i])
                   for i in keep):
            return "wall"
    return "cpu"


def _timed(bank: dict[str, Any], keep: list[int], how: str, clock: str) -> dict[str, Any]:
    """Seconds per model as the median over `keep` (each timed warm, after the same untimed
    warm-up on both sides) on `clock`, with the load and threads they were timed under.

    The median, not the mean: a model that shared its core with a burst of other work is an
    outlier of one, not a shift of the whole bank.
    """
    loads = bank["load_average"][keep]
    threads = sorted({t for t in (bank["threads"][i] for i in keep) if t is not None})
    return {
        "seconds": float(np.median(bank[f"{clock}_seconds"][keep])),
        "how": how,
        "load_average": float(np.median(loads)) if np.isfinite(loads).any() else None,
        "threads": threads,
    }


def _official_part(u_conf: np.ndarray, r_conf: np.ndarray, *, bootstrap: int, seed: int,
                   cache: dict | None = None) -> dict[str, Any]:
    # Like for like: the ceiling is F at N // 2 (two halves of the references), so the method is
    # also scored at N // 2 against the same reference halves; `share` compares those two.
    # One batched pass for the point estimate and the resamples; the ceiling's own splits once
    # per reference bank when `cache` is kept across methods (metrics.official_scores).
    part = metrics.official_scores(u_conf, r_conf, num_resamples=bootstrap, seed=seed,
                                   cache=cache)
    out: dict[str, Any] = {
        "forget_quality": part["forget_quality"],
        "epsilon": part["epsilon"],
        "score": part["score"],
        "ceiling": part["ceiling"],
    }
    if part["interval"] is not None:
        out["interval"] = [float(part["interval"][0]), float(part["interval"][1])]
    return out


def score_method(store: Store, method: str, *, metric: str = "official",
                 bootstrap: int = metrics.DEFAULT_RESAMPLES,
                 seed: int = 0, references: dict[str, Any] | None = None,
                 keep_confidences: bool = False, cache: dict | None = None) -> dict[str, Any]:
    """The report for one stored method (see the README for its fields).

    references: every stored reference model's outputs as `_bank` stacks them, when the caller
    scores several methods and loads them once; read from the store otherwise.
    keep_confidences: also return both banks' forget confidences, `[N, E]` float64 each, under
    "confidences" (for the HTML report and figures, which take them out before JSON is written).
    cache: a dict kept across the methods of one run (work that depends only on the reference
    bank, e.g. the ceiling's splits, is done once; see metrics.official_scores).
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
        # Name the command for the bank that is short (both when both are).
        fixes = []
        if len(ref_seeds) < MIN_MODELS:
            fixes.append(f"`unlearn train-refs --num-models {MIN_MODELS} --store {store.root}`")
        if len(unl_seeds) < MIN_MODELS:
            fixes.append(f"`unlearn apply --method {method} --num-models "
                         f"{max(MIN_MODELS, len(ref_seeds))} --store {store.root}`")
        raise StoreError(
            f"the official metric needs at least {MIN_MODELS} models per bank; store {store.root} "
            f"has {len(ref_seeds)} reference model(s) and {len(unl_seeds)} run(s) of {method!r}: "
            f"run {' and then '.join(fixes)}"
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

    # Every model's outputs were checked by the store when read (shapes, classes, finite).
    u_conf, r_conf = conf(unl), conf(refs)
    utility = {}
    for name, fn in (
        ("retain_accuracy", lambda b: b["retain_correct"].mean(axis=1)),
        ("test_accuracy", lambda b: _accuracy(b["test_logits"], test_y)),
        ("forget_accuracy", lambda b: _accuracy(b["forget_logits"], forget_y)),
    ):
        u, r = float(np.mean(fn(unl))), float(np.mean(fn(refs)))
        utility[name] = {"unlearned": u, "retrained": r, "ratio": _ratio(u, r)}
    forget_cfg = exp.get("config", {}).get("data", {}).get("forget") or {}
    if forget_cfg.get("kind") == "class":  # class unlearning: test accuracy per side
        gone = np.isin(test_y, forget_cfg.get("classes", []))
        for name, mask in (("test_accuracy_remaining_classes", ~gone),
                           ("test_accuracy_forgotten_classes", gone)):
            u, r = (float(np.mean(_accuracy(b["test_logits"][:, mask], test_y[mask])))
                    if mask.any() else float("nan") for b in (unl, refs))
            utility[name] = {"unlearned": u, "retrained": r, "ratio": _ratio(u, r)}
    original: dict[str, Any] = {}
    if store.is_done(ORIGINAL):
        o_arrays, _ = store.load_outputs(ORIGINAL)
        original = {
            "retain_accuracy": float(o_arrays["retain_correct"].mean()),
            "test_accuracy": float(_accuracy(o_arrays["test_logits"][None], test_y)[0]),
            "forget_accuracy": float(_accuracy(o_arrays["forget_logits"][None], forget_y)[0]),
        }

    u_keep, r_keep = _kept(unl, alone_only=True), _kept(refs, alone_only=True)
    clock = _clock((unl, u_keep[0]), (refs, r_keep[0]))
    u_time, r_time = _timed(unl, *u_keep, clock), _timed(refs, *r_keep, clock)
    u_sec, r_sec = u_time["seconds"], r_time["seconds"]
    raw_ratio = _ratio(u_sec, r_sec)
    probed = _probed_ratio(unl, u_keep[0], refs, r_keep[0], clock)
    runtime_ratio = raw_ratio if probed is None else probed[0]
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
        part = _official_part(u_conf, r_conf, bootstrap=bootstrap, seed=seed, cache=cache)
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
        report["seed_metric"] = seed_part(unl, refs, forget_y, test_y,
                                          workers=_workers(exp))
    if metric in ("seed-converged", "all"):
        report["seed_converged"] = seed_part(unl, refs, forget_y, test_y, converged=True)
    if metric in ("lira", "all"):
        report["lira"] = lira_part(u_conf, r_conf, seed=seed)
    if metric in ("klom", "all"):
        report["klom"] = klom_part(unl, refs, forget_y, test_y)
    report["utility"] = utility
    report["original"] = original
    report["runtime"] = {
        "seconds_per_model": {"unlearned": u_sec, "retrained": r_sec},
        "retrained_timing": r_time["how"],
        "clock": clock,  # cpu: CPU seconds of the process (on CPUs); wall: wall seconds
        # What each side was timed under: a ratio of times taken under different loads or
        # thread counts is not a ratio of costs.
        "load_average": {"unlearned": u_time["load_average"],
                         "retrained": r_time["load_average"]},
        "threads": {"unlearned": u_time["threads"], "retrained": r_time["threads"]},
        # ratio: in units of the speed probe taken around each model timed alone
        # (launch.timed_alone a bank) when both sides have such models (normalised: how many
        # of each), else seconds over seconds; ratio_raw: always the latter.
        "normalised": (None if probed is None
                       else {"unlearned": probed[1], "retrained": probed[2]}),
        "ratio_raw": raw_ratio,
        "ratio": runtime_ratio,
        "gate": RUNTIME_GATE,
        "over_gate": bool(runtime_ratio > RUNTIME_GATE),
    }
    report["method_record"] = store.method_record(method)
    report["config"] = exp.get("config", {})
    report["versions"] = {"scored_with": versions(), "store": exp.get("versions", {})}
    report["created"] = now()
    if keep_confidences:
        report["confidences"] = {"unlearned": u_conf, "retrained": r_conf}
    return report


def seed_part(unl: dict[str, Any], refs: dict[str, Any], forget_y: np.ndarray,
              test_y: np.ndarray, *, converged: bool = False, workers: int | None = None
              ) -> dict[str, Any]:
    """The seed's learned-attack variant (spec section 2), as the seed fits it or converged, and
    the starting kit's simple MIA (section 3), on float64 cross-entropy of the stored logits."""
    from . import attacks

    u_forget = attacks.cross_entropy_losses(unl["forget_logits"], forget_y)
    r_forget = attacks.cross_entropy_losses(refs["forget_logits"], forget_y)
    try:
        if converged:
            result = attacks.seed_converged_scores(u_forget, r_forget)
        else:
            result = attacks.seed_scores(u_forget, r_forget, workers=workers)
        mia = attacks.simple_mia(u_forget,
                                 attacks.cross_entropy_losses(unl["test_logits"], test_y))
    except ValueError as error:  # too few models or examples for these attacks
        name = "seed-converged" if converged else "seed"
        raise StoreError(f"--metric {name} cannot score this store: {error}; train more models "
                         "(unlearn train-refs --num-models N, then unlearn apply) or use "
                         "--metric official, lira or klom") from error
    return {
        "variant": result.variant,
        "score": float(result.score),
        "dropped": int(result.dropped),
        "above_one": int(result.above_one),
        "attack_accuracy": float(result.attack_accuracy),
        "simple_mia_accuracy": float(mia),
        "per_example": {"score": result.per_example.tolist(),
                        "attack_accuracy": result.per_example_accuracy.tolist()},
    }


def lira_part(u_conf: np.ndarray, r_conf: np.ndarray, *, seed: int) -> dict[str, Any]:
    """The held-out likelihood-ratio attack on the forget set's confidences [N, E] (README)."""
    from . import second_opinions

    lira = second_opinions.held_out_lira(u_conf, r_conf, seed=seed)
    tpr = dict(zip(("tpr_at_1pct_fpr", "tpr_at_5pct_fpr"), lira.mean_tpr_at_fpr, strict=True))
    return {
        "balanced_accuracy": lira.mean_balanced_accuracy,
        **tpr,
        "share_beating_chance": lira.share_beating_chance,
        "alpha": lira.alpha, "folds": lira.folds, "seed": lira.seed,
        "per_example": {
            "balanced_accuracy": lira.balanced_accuracy.tolist(),
            "tpr_at_1pct_fpr": lira.tpr_at_fpr[0].tolist(),
            "tpr_at_5pct_fpr": lira.tpr_at_fpr[1].tolist(),
            "p_value": lira.p_value.tolist(),
        },
    }


def klom_part(unl: dict[str, Any], refs: dict[str, Any], forget_y: np.ndarray,
              test_y: np.ndarray) -> dict[str, Any]:
    """KLOM of the margins on the forget set and on the test set (README)."""
    from . import second_opinions as so

    result = so.klom(so.margins(unl["forget_logits"], forget_y),
                     so.margins(refs["forget_logits"], forget_y),
                     so.margins(unl["test_logits"], test_y),
                     so.margins(refs["test_logits"], test_y))
    return {
        "forget": {"p95": result.forget_p95, "mean": result.forget_mean},
        "test": {"p95": result.test_p95, "mean": result.test_mean},
        "bins": so.KLOM_BINS, "eps": so.KLOM_EPS, "clip": so.KLOM_CLIP,
        "per_example": {"forget": result.forget.tolist()},
    }


MAX_PROCESSES = 8  # processes (this one and helpers) for the metrics' work by default: each
# helper imports numpy (and scikit-learn for the seed metric) and a method's few hundred chunks of
# work would not keep more busy (a judgement, not measured beyond 2 cores)


def _workers(exp: dict[str, Any]) -> int:
    """Processes for the metrics' work (the epsilon engine, the seed metric's fits, one pool of
    helpers for both): the stored launch.workers, or one per core up to MAX_PROCESSES if 0;
    never more than the cores (more would only take turns)."""
    workers = exp.get("config", {}).get("launch", {}).get("workers", 0)
    if isinstance(workers, int) and not isinstance(workers, bool) and workers > 0:
        return min(workers, helpers.cores())
    return min(helpers.cores(), MAX_PROCESSES)


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
        bootstrap: int = metrics.DEFAULT_RESAMPLES, seed: int = 0, keep_confidences: bool = False
        ) -> list[dict[str, Any]]:
    """Score the named methods (all stored ones by default); one report per method."""
    if bootstrap == 1 or bootstrap < 0:
        raise UnlearnError(f"--bootstrap {bootstrap}: expected 0 (no interval) or at least 2 "
                           f"resamples, e.g. --bootstrap {metrics.DEFAULT_RESAMPLES}")
    if metric not in METRICS:
        raise UnlearnError(f"--metric {metric!r} is not known; expected one of: "
                           f"{', '.join(METRICS)}")
    store = Store(store_root)
    workers = _workers(store.read_experiment())  # first: a missing store says so
    if methods:
        chosen = list(methods)
    else:
        chosen = store.stored_methods()
        if not chosen:
            raise StoreError(
                f"store {store.root} holds no unlearning runs yet; run `unlearn apply --method "
                f"finetune --store {store.root}` first"
            )
    # Every model scored was made under the experiment's settings (the other methods' runs are
    # not read, so not checked here).
    store.check_identity(methods=chosen)
    # Helper processes share the epsilon engine's work (the same processes as the seed's fits).
    with metrics.sharing_work(workers):
        if metric in ("seed", "all"):
            from . import attacks

            if len(store.load_split()["forget"]) >= attacks.PARALLEL_MIN_EXAMPLES:
                # The helpers import scikit-learn while the banks are read and scored.
                attacks.start_seed_helpers(workers)
        # The reference bank is the same for every method: read its outputs once.
        references = _bank(store, REFERENCE, store.done_seeds(REFERENCE))
        cache: dict = {}  # shared work across methods (the ceiling's splits)
        return [score_method(store, m, metric=metric, bootstrap=bootstrap, seed=seed,
                             references=references, keep_confidences=keep_confidences,
                             cache=cache)
                for m in chosen]
