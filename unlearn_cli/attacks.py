"""Learned membership-inference attacks: the seed's metric (spec §2) and the simple MIA (spec §3).

Pure numpy/scipy maths, plus scikit-learn where the seed's own fits are reproduced: arrays in,
numbers out. Arrays are `[num models, num examples]`, as in the rest of `unlearn_cli`; inputs
are never modified in place.

The seed's metric comes in two variants that differ only in how each logistic regression is fitted:

- `seed_scores` ("seed") reproduces the seed notebook: per example and per fold the very fit that
  scikit-learn's `LogisticRegression()` makes with its defaults (lbfgs, tol 1e-4, max_iter 100).
  On losses of order 1e-5 (confident models) the gradient in the weight is below that tolerance
  at the start, lbfgs stops at w = b = 0, every decision value is 0, the attack predicts one
  class and the fold drops out. Those early stops are part of the numbers the seed reports, so
  this variant keeps them. It calls scikit-learn's own loss and scipy's L-BFGS-B with the
  arguments `LogisticRegression.fit` passes (checked bit for bit against the estimator once per
  process; the public estimator is used if they ever differ), spread over processes.
- `seed_converged_scores` ("seed-converged") fits the same objective to its optimum with a
  batched Newton method (every fit of a call at once, each 2 x 2 Newton system in closed form).
  It is a stronger attack than the seed's: it never stops early, so examples the seed drops
  are scored. It agrees with scikit-learn run to a tight tolerance, not with the seed.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logsumexp

from . import helpers

# --- Constants of the seed's metric (spec §2) --------------------------------------------------
SEED_DELTA = 1e-6  # δ of the (ε, δ) bound, as the seed notebook uses
SEED_BUCKET_WIDTH = 0.5  # ε per bucket; bucket k is worth 2^-k
SEED_N_FOLDS = 2  # StratifiedKFold(n_splits=2, shuffle=False), cross_val_score(cv=2)

# --- Constants of the starting kit's simple MIA (spec §3) --------------------------------------
MIA_N_SPLITS = 10  # StratifiedShuffleSplit(n_splits=10, ...) as in the starting kit
MIA_TEST_SIZE = 0.1  # the kit leaves test_size unset: scikit-learn's default is 0.1 of the samples
MIA_SPLIT_SEED = 0  # the kit's random_state=0 for the splitter
MIA_MIN_PER_CLASS = 10  # below this the 10% test part cannot hold both classes reliably

# --- The seed's fits: scikit-learn's LogisticRegression() defaults (scikit-learn 1.x) ------------
SEED_LOGREG_TOL = 1e-4  # LogisticRegression(tol=1e-4): lbfgs's gtol, on the projected gradient
SEED_LOGREG_MAX_ITER = 100  # LogisticRegression(max_iter=100)
SEED_LBFGS_MAX_LINE_SEARCH = 50  # what LogisticRegression passes to L-BFGS-B as maxls
SEED_LBFGS_FTOL = 64 * np.finfo(float).eps  # ... and as ftol
# Below this many examples all fits run in this process (a few hundred ms at most): not worth
# starting helper processes for.
PARALLEL_MIN_EXAMPLES = 200
CHUNKS_PER_WORKER = 8  # small chunks: this process and the helpers share them as they go

# --- The converged logistic regression (seed-converged, simple MIA) ------------------------------
LOGREG_C = 1.0  # inverse L2 strength: minimise 0.5 * w^2 + C * sum of log-losses (sklearn default)
NEWTON_MAX_ITER = 100  # typical problems converge in 5-10 iterations
# Near the optimum (Newton decrement λ² = gᵀ H⁻¹ g, about twice the distance to the optimum in
# objective units, below this) the full Newton step is taken without a line search: the expected
# decrease is then too close to the objective's rounding (~1e-14 relative) for a test to mean much,
# and Newton converges quadratically there.
NEWTON_FULL_STEP_DECREMENT = 1e-8
# A problem is done once a full Newton step moves no training logit by more than this (logit
# units): with quadratic convergence the step just taken leaves it ~1e-20 from the optimum ...
NEWTON_STEP_TOL = 1e-10
# ... or once λ² is below this, far under the objective's rounding. That catches problems whose
# logits cannot be pinned to 1e-10 in float64 (e.g. losses of 0 and 1e4: gradient rounding moves
# them by ~1e-9); every training point is then far from the boundary, so predictions are settled.
NEWTON_DECREMENT_TOL = 1e-20
# Damping: no Newton step may move any training logit by more than this (logit units). It only
# binds far from the optimum (e.g. on nearly separable data) and keeps exp() from saturating.
NEWTON_MAX_LOGIT_STEP = 20.0
LINE_SEARCH_MAX_HALVINGS = 40
ARMIJO_C = 1e-4
# scikit-learn predicts class 1 iff the decision value is > 0. An exact 0 happens at degenerate
# optima (identical or constant banks give w = b = 0); our summation order can leave ~1e-17 there
# instead, so decision values within this many logit units of 0 count as the tie (class 0).
DECISION_TIE_TOL = 1e-10


@dataclass(frozen=True)
class SeedScores:
    """The seed's metric (spec §2) for one unlearning method.

    Attributes:
        per_example: float64 [num examples], read-only. Each forget example's score, the mean of
            its two fold scores ignoring NaN folds; NaN where both folds were NaN.
        per_example_accuracy: float64 [num examples], read-only. Each example's attack accuracy
            on the held-out fold, averaged over the two folds.
        score: nanmean of `per_example`, as the seed reports it (NaN if every example dropped).
        dropped: examples whose folds were all NaN, left out of `score` (biases it upward).
        above_one: examples scoring above 1 because the attack did worse than chance
            (FPR + FNR > 1 makes ε ≤ -0.5); the seed keeps them, so does `score`.
        attack_accuracy: mean of `per_example_accuracy` over all examples (dropped ones
            included, as in the seed).
        num_models: N, models per bank.
        variant: "seed" (the seed's scikit-learn fits, early stops included) or
            "seed-converged" (every fit run to its optimum).
    """

    per_example: np.ndarray
    per_example_accuracy: np.ndarray
    score: float
    dropped: int
    above_one: int
    attack_accuracy: float
    num_models: int
    variant: str


def seed_scores(
    unlearned_losses: np.ndarray, retrained_losses: np.ndarray, *, workers: int | None = None
) -> SeedScores:
    """Score an unlearning method with the seed's learned attack, as the seed computes it (spec §2).

    Per forget example, the 2N losses (label 0 for the N retrained models, 1 for the N unlearned
    ones, in that order as the seed stacks them) are attacked by scikit-learn's
    `LogisticRegression()` with its defaults (lbfgs, tol 1e-4, max_iter 100, C = 1) under
    `cross_val_score(cv=2)`, i.e. StratifiedKFold(2) without shuffling; a test point counts as
    unlearned when its decision value is > 0, as `predict` does. Per fold, with label 1 positive,
    FPR = fp / (fp + tn), FNR = fn / (fn + tp) and
    ε = max(log(1 - δ - FPR) - log(FNR), log(1 - δ - FNR) - log(FPR)), a NaN term ignored;
    the fold scores 2 / 2^(trunc(min(ε, ln(N/2 - 1)) / 0.5) + 1). A fold is NaN when FPR or FNR
    is 0 (both 0 is perfect separation, which the seed also maps to NaN) or when both ε terms
    are NaN (FPR = FNR = 1, which the seed does not handle).

    lbfgs at tol 1e-4 stops early (often before its first step) on losses of order 1e-5: the fit
    is then w = b = 0, predicts one class and the fold is NaN. The seed reports those numbers;
    `seed_converged_scores` is the same attack with every fit run to its optimum.

    Args:
        unlearned_losses: [num models N, num examples E] loss of each unlearned model on each
            forget example. Fitted in float64 (float32 values upcast exactly).
        retrained_losses: [num models N, num examples E] the same for the models retrained
            from scratch without the forget set.
        workers: processes to spread the examples over; None = the cores this process may
            use. Below PARALLEL_MIN_EXAMPLES examples the fits run in this process.

    Returns:
        SeedScores with variant "seed"; see its docstring.

    Raises:
        ValueError: shapes differ, are not 2-D, N < 4 (ln(N/2 - 1) needs N/2 > 1 and each fold
            needs two models per bank), no examples, a loss is not finite, or workers < 1.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (or None for one per core), got {workers}")
    features, labels, folds, num_models = _seed_problem(unlearned_losses, retrained_losses)
    decisions = _lbfgs_decisions(features, labels, folds, workers=_worker_count(workers))
    # scikit-learn's predict: class 1 iff the decision value is > 0 (an exact 0 is class 0).
    return _seed_summary(decisions, labels, folds, num_models, tie=0.0, variant="seed")


def seed_converged_scores(unlearned_losses: np.ndarray, retrained_losses: np.ndarray) -> SeedScores:
    """The seed's attack (spec §2) with every logistic regression fitted to its optimum.

    Same folds, scorer and labels as `seed_scores`, but each fit minimises scikit-learn's
    objective for `LogisticRegression()` (L2 penalty on the weight only, C = 1, intercept
    fitted) to tight convergence by a batched Newton method, all examples and folds at once.
    This is a stronger attack than the seed's: where lbfgs at its default tolerance stops at
    w = b = 0 (tiny losses) and the fold drops out, this one finds the boundary and scores the
    example. Its predictions agree with scikit-learn run at tol = 1e-12, not with the seed.

    Args:
        unlearned_losses: [num models N, num examples E] loss of each unlearned model on each
            forget example.
        retrained_losses: [num models N, num examples E] the same for the retrained models.

    Returns:
        SeedScores with variant "seed-converged".

    Raises:
        ValueError: as `seed_scores`.
    """
    features, labels, folds, num_models = _seed_problem(unlearned_losses, retrained_losses)
    # One logistic regression per (fold, example), all fitted in as few batched calls as the
    # fold sizes allow (one call when N is even: both training folds hold N models).
    decisions = _fit_and_decide(
        [(features[:, train], labels[train], features[:, test]) for train, test in folds]
    )
    return _seed_summary(
        decisions, labels, folds, num_models, tie=DECISION_TIE_TOL, variant="seed-converged"
    )


def cross_entropy_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of the true class per model and example, computed in float64.

    loss = logsumexp(z) - z[label], with the stored (float32) logits z cast to float64 first:
    the losses the seed's metric attacks (the golden cases were made this way).

    Args:
        logits: [num models M, num examples K, num classes C] stored logits.
        labels: [K] integer true classes, each in [0, C).

    Returns:
        float64 [M, K] losses (>= 0 up to rounding).

    Raises:
        ValueError: shapes do not fit or a label is out of range.
    """
    z = np.asarray(logits).astype(np.float64)
    y = np.asarray(labels)
    if z.ndim != 3 or y.shape != (z.shape[1],):
        raise ValueError(
            f"logits must be [models, examples, classes] and labels [examples]; got "
            f"{z.shape} and {y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= z.shape[2]):
        raise ValueError(f"labels must lie in [0, {z.shape[2]}), got {y.min()}..{y.max()}")
    true_logit = np.take_along_axis(z, np.broadcast_to(y[None, :, None], z.shape[:2] + (1,)), -1)
    return logsumexp(z, axis=-1) - true_logit[..., 0]


def _seed_problem(
    unlearned_losses: np.ndarray, retrained_losses: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, ...]], int]:
    """Validate the banks and lay them out as the seed does.

    Returns:
        features [E, 2N] (columns 0..N-1 retrained, label 0; N..2N-1 unlearned, label 1),
        labels [2N] float64, the two (train, test) folds, and N.
    """
    unlearned = _as_float64_2d(unlearned_losses, "unlearned_losses")
    retrained = _as_float64_2d(retrained_losses, "retrained_losses")
    if unlearned.shape != retrained.shape:
        raise ValueError(
            f"unlearned_losses has shape {unlearned.shape} but retrained_losses has shape "
            f"{retrained.shape}; both must be [num models, num examples] with equal N"
        )
    num_models, num_examples = unlearned.shape
    if num_models < 4:
        raise ValueError(f"the seed's metric needs at least 4 models per bank, got {num_models}")
    if num_examples < 1:
        raise ValueError("no forget examples to score (num examples is 0)")
    features = np.concatenate([retrained.T, unlearned.T], axis=1)
    labels = np.repeat([0.0, 1.0], num_models)
    return features, labels, _stratified_kfold_splits(labels, SEED_N_FOLDS), int(num_models)


def _seed_summary(
    decisions: list[np.ndarray],
    labels: np.ndarray,
    folds: list[tuple[np.ndarray, ...]],
    num_models: int,
    *,
    tie: float,
    variant: str,
) -> SeedScores:
    """Fold scores, per-example scores and accuracies from the decision values.

    Args:
        decisions: per fold, [E, n_test] decision values on the fold's test part.
        labels: [2N] labels of the columns.
        folds: the (train, test) index pairs the decisions belong to.
        tie: a test point is predicted unlearned iff its decision value is > tie.
    """
    num_examples = decisions[0].shape[0]
    cap = np.log(num_models / 2 - 1)  # largest ε a fold of N/2 + N/2 models can show
    fold_scores = np.empty((len(folds), num_examples))
    fold_accuracy = np.empty((len(folds), num_examples))
    for k, ((_, test), decision) in enumerate(zip(folds, decisions, strict=True)):
        predicted = decision > tie  # [E, n_test]
        truth = labels[test].astype(bool)  # [n_test]
        fp = np.sum(predicted & ~truth, axis=1)
        fn = np.sum(~predicted & truth, axis=1)
        n_neg, n_pos = np.sum(~truth), np.sum(truth)
        fold_scores[k] = _seed_fold_score(fp / n_neg, fn / n_pos, cap)
        # correct / n, as accuracy_score divides (1 - errors / n can differ in the last bit).
        fold_accuracy[k] = (truth.size - fp - fn) / truth.size

    per_example = _nanmean_rows(fold_scores.T)
    per_example.setflags(write=False)
    accuracy = fold_accuracy.mean(axis=0)
    accuracy.setflags(write=False)
    kept = ~np.isnan(per_example)
    return SeedScores(
        per_example=per_example,
        per_example_accuracy=accuracy,
        score=float(per_example[kept].mean()) if kept.any() else float("nan"),
        dropped=int(np.sum(~kept)),
        above_one=int(np.sum(per_example[kept] > 1.0)),
        attack_accuracy=float(accuracy.mean()),
        num_models=num_models,
        variant=variant,
    )


# --- The seed's fits, as scikit-learn makes them -----------------------------------------------


def _worker_count(workers: int | None) -> int:
    """`workers`, or the number of cores this process may run on."""
    return workers if workers is not None else helpers.cores()


def _lbfgs_decisions(
    features: np.ndarray,
    labels: np.ndarray,
    folds: list[tuple[np.ndarray, ...]],
    *,
    workers: int,
) -> list[np.ndarray]:
    """Decision values of the seed's fits, per fold [E, n_test], spread over `workers` processes.

    The examples are cut into chunks. With workers > 1, this process works through the chunks
    from the back while workers - 1 helper processes (started once, then reused) are handed
    chunks from the front, one each at a time (`helpers.share`). A chunk a helper has not
    finished when this process runs out of work is done here as well (the fits are
    deterministic, so either copy will do): a helper still starting (it imports scikit-learn,
    about a second) or lost never makes a call slower than doing everything here, and nothing
    waits on a helper.

    Args:
        features: [E, 2N] the values of each example, columns as `labels`.
        labels: [2N] 0/1 labels.
        folds: (train, test) index pairs.
    """
    exact = _internal_fit_is_exact()
    num_examples = features.shape[0]
    if workers <= 1 or num_examples < PARALLEL_MIN_EXAMPLES:
        return _lbfgs_chunk(features, labels, folds, exact)
    rows = np.array_split(np.arange(num_examples), min(num_examples, workers * CHUNKS_PER_WORKER))
    results = helpers.share(
        len(rows),
        lambda i: _lbfgs_chunk(features[rows[i]], labels, folds, exact),
        lambda i: (_lbfgs_chunk, (features[rows[i]], labels, folds, exact)),
        helpers=workers - 1,
    )
    return [np.concatenate([part[k] for part in results]) for k in range(len(folds))]


def start_seed_helpers(workers: int | None = None) -> None:
    """Start the helper processes `seed_scores(..., workers=workers)` will use, without waiting.

    Call it before other work (reading banks, the official metric) so that the helpers have
    imported scikit-learn by the time the seed metric needs them. Optional: seed_scores is as
    fast without it when the helpers are not ready.
    """
    count = _worker_count(workers)
    if count > 1:
        helpers.pool(count - 1).submit(_import_fit_modules)


def _import_fit_modules() -> None:
    """Import what the fits need (run in a helper to warm it up)."""
    _sklearn_half_binomial()
    import scipy.optimize  # noqa: F401
    import threadpoolctl  # noqa: F401


def _lbfgs_chunk(
    features: np.ndarray, labels: np.ndarray, folds: list[tuple[np.ndarray, ...]], exact: bool
) -> list[np.ndarray]:
    """Fit every (example, fold) of a chunk as the seed does; decision values per fold [e, n_test].

    Runs in this process or in a worker. BLAS is held to one thread: L-BFGS-B's tiny LAPACK
    calls get no faster with more, and on a loaded machine threaded OpenBLAS made them ~6x slower.
    """
    from threadpoolctl import threadpool_limits

    fit = _fit_default_internal if exact else _fit_default_estimator
    out = [np.empty((features.shape[0], test.size)) for _, test in folds]
    with threadpool_limits(limits=1, user_api="blas"):
        for i, values in enumerate(features):
            for k, (train, test) in enumerate(folds):
                weight, intercept = fit(values[train], labels[train])
                # decision_function: X @ coef_.T + intercept_; with one feature, one product.
                out[k][i] = values[test] * weight + intercept
    return out


def _fit_default_estimator(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """LogisticRegression() fitted on one feature: (weight, intercept). x, y: [n]."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the seed ran with it too
        model = LogisticRegression().fit(x[:, None], y.astype(np.int64))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def _fit_default_internal(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The fit LogisticRegression().fit(x[:, None], y) makes, without its overhead.

    For a binary problem with default settings, `LogisticRegression.fit` (scikit-learn 1.x)
    validates X into a C-ordered float64 [n, 1] array, maps y to 0.0/1.0 (1.0 for the larger
    class), and minimises `LinearModelLoss(HalfBinomialLoss(), fit_intercept=True).loss_gradient`
    with scipy's L-BFGS-B from zeros, args (X, y, None, 1 / (C n), 1 thread) and options
    maxiter, maxls 50, gtol = tol, ftol 64 eps. This makes the same L-BFGS-B call on the same
    objective: `_binomial_loss_gradient` does the operations of that loss_gradient in the same
    order, minus its array-API bookkeeping. `_internal_fit_is_exact` checks the result against
    the estimator bit for bit before it is used. About 6x faster per fit.

    Args:
        x: [n] feature values. y: [n] labels 0/1 (both present).

    Returns:
        (weight, intercept).
    """
    from scipy.optimize import minimize

    design = np.ascontiguousarray(x, dtype=np.float64)[:, None]  # [n, 1]
    result = minimize(
        _binomial_loss_gradient,
        np.zeros(2),
        method="L-BFGS-B",
        jac=True,
        args=(design, (y == 1).astype(np.float64), 1.0 / (LOGREG_C * x.size)),
        options={
            "maxiter": SEED_LOGREG_MAX_ITER,
            "maxls": SEED_LBFGS_MAX_LINE_SEARCH,
            "gtol": SEED_LOGREG_TOL,
            "ftol": SEED_LBFGS_FTOL,
        },
    )
    return float(result.x[0]), float(result.x[1])


def _binomial_loss_gradient(
    coef: np.ndarray, design: np.ndarray, y: np.ndarray, l2_reg_strength: float
) -> tuple[float, np.ndarray]:
    """scikit-learn's mean binomial loss + L2 penalty and its gradient, one feature + intercept.

    The operations of `LinearModelLoss.loss_gradient` (binary, no sample weights), in its order,
    with its compiled per-sample loss (`HalfBinomialLoss`), so every rounding is the same.

    Args:
        coef: [2] (weight, intercept). design: [n, 1] C-ordered float64. y: [n] 0.0/1.0.
        l2_reg_strength: 1 / (C n).

    Returns:
        (objective, gradient [2]).
    """
    weights, intercept = coef[:-1], coef[-1]
    raw_prediction = design @ weights + intercept
    loss, grad_pointwise = _sklearn_half_binomial().loss_gradient(
        y_true=y, raw_prediction=raw_prediction, sample_weight=None, n_threads=1
    )
    num_samples = design.shape[0]
    value = float(np.sum(loss) / num_samples)
    value += float(0.5 * l2_reg_strength * (weights @ weights))
    grad_pointwise /= num_samples
    grad = np.empty_like(coef)
    grad[:-1] = design.T @ grad_pointwise + l2_reg_strength * weights
    grad[-1] = np.sum(grad_pointwise)
    return value, grad


@functools.cache
def _sklearn_half_binomial():
    """scikit-learn's compiled binomial loss (per-sample loss and gradient)."""
    from sklearn._loss.loss import HalfBinomialLoss

    return HalfBinomialLoss()


@functools.cache
def _internal_fit_is_exact() -> bool:
    """Whether `_fit_default_internal` gives the estimator's weight and intercept bit for bit.

    Checked once per process on fixed problems of the kinds the seed meets: tiny losses (lbfgs
    stops at its first iterate), ordinary overlap, large shifts (many iterations), separable
    banks and constant banks. If scikit-learn's internals moved (or cannot be imported), the
    public estimator is used instead: slower, the same numbers.
    """
    rng = np.random.default_rng(20231)
    labels = np.repeat([0.0, 1.0], 25)
    base = rng.gamma(2.0, 0.5, size=(6, 50))
    problems = [
        base[0] * 1e-5,
        base[1],
        base[2] + 0.3 * labels,
        base[3] + 5.0 * labels,
        np.where(labels == 1, 1e4, 0.0),
        np.full(50, 0.7),
    ]
    try:
        for x in problems:
            if _fit_default_internal(x, labels) != _fit_default_estimator(x, labels):
                raise ValueError("scikit-learn's internal fit no longer matches its estimator")
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        warnings.warn(
            f"the seed metric falls back to LogisticRegression per fit (slower, same numbers): "
            f"{error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def simple_mia(forget_losses: np.ndarray, test_losses: np.ndarray, *, seed: int = 0) -> float:
    """The starting kit's population attack (spec §3): mean attack accuracy over models.

    For each unlearned model, the larger of its forget and test loss sets is shuffled and cut to
    the size of the smaller (the test set when sizes are equal, as the kit does); a logistic
    regression on the loss (forget = 1, test = 0) is scored by accuracy under
    StratifiedShuffleSplit(n_splits=10, test_size=0.1, random_state=0), the kit's splitter; the
    mean over splits is the model's accuracy. About 0.5 is ideal.

    Args:
        forget_losses: [num models M, num forget examples F] per-sample losses on the forget set.
        test_losses: [num models M, num test examples T] per-sample losses on the test set.
        seed: seeds the subsampling (the kit used numpy's global, unseeded, generator).

    Returns:
        Mean over the M models of the mean accuracy over the 10 splits.

    Raises:
        ValueError: not 2-D, different numbers of models, min(F, T) < 10, or a non-finite loss.
    """
    # Only the splitter comes from scikit-learn, so the splits are the kit's exactly; imported
    # here because scikit-learn takes about a second to import and the seed metric needs none of it.
    from sklearn.model_selection import StratifiedShuffleSplit

    forget = _as_float64_2d(forget_losses, "forget_losses")
    test = _as_float64_2d(test_losses, "test_losses")
    if forget.shape[0] != test.shape[0]:
        raise ValueError(
            f"forget_losses has {forget.shape[0]} models but test_losses has {test.shape[0]}; "
            "both must be [num models, num examples] for the same models"
        )
    per_class = min(forget.shape[1], test.shape[1])
    if per_class < MIA_MIN_PER_CLASS:
        raise ValueError(
            f"simple MIA needs at least {MIA_MIN_PER_CLASS} forget and test losses per model, "
            f"got {forget.shape[1]} forget and {test.shape[1]} test"
        )
    if forget.shape[0] < 1:
        raise ValueError("no models to attack (num models is 0)")

    rng = np.random.default_rng(seed)
    rows = []
    for forget_row, test_row in zip(forget, test, strict=True):
        if forget_row.size > test_row.size:
            forget_row = rng.permutation(forget_row)[:per_class]
        else:
            test_row = rng.permutation(test_row)[:per_class]
        rows.append(np.concatenate([test_row, forget_row]))
    samples = np.stack(rows)  # [M, 2 * per_class]: test (label 0) then forget (label 1)
    labels = np.repeat([0.0, 1.0], per_class)

    # The labels are the same for every model, so the kit's splitter gives every model the same
    # splits; fit all (model, split) problems in one batched solve.
    splitter = StratifiedShuffleSplit(
        n_splits=MIA_N_SPLITS, test_size=MIA_TEST_SIZE, random_state=MIA_SPLIT_SEED
    )
    splits = list(splitter.split(np.zeros((labels.size, 1)), labels))
    decisions = _fit_and_decide([(samples[:, tr], labels[tr], samples[:, te]) for tr, te in splits])
    accuracy = np.stack(
        [
            np.mean((decision > DECISION_TIE_TOL) == labels[te].astype(bool), axis=1)
            for (_, te), decision in zip(splits, decisions, strict=True)
        ]
    )  # [splits, M]
    return float(accuracy.mean(axis=0).mean())


# --- Internals -----------------------------------------------------------------------------------


def _as_float64_2d(values: np.ndarray, name: str) -> np.ndarray:
    """A float64 copy-or-view of a 2-D array of finite values; raises ValueError otherwise."""
    array = np.asarray(values, dtype=np.float64)  # float32 losses upcast exactly, as sklearn does
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num models, num examples], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds {np.sum(~np.isfinite(array))} non-finite values")
    return array


def _stratified_kfold_splits(labels: np.ndarray, n_splits: int) -> list[tuple[np.ndarray, ...]]:
    """(train, test) index pairs of StratifiedKFold(n_splits, shuffle=False).split(labels).

    scikit-learn sorts the class codes, deals them round-robin over folds to get how many of each
    class each fold's test part holds, then gives fold 0 the first such members of each class
    (in order of appearance), fold 1 the next, and so on. With N models per class and N even,
    each fold's test part is the first (fold 0) or second (fold 1) half of each class.

    Args:
        labels: [num samples] class labels.
    """
    _, codes = np.unique(labels, return_inverse=True)
    # scikit-learn numbers classes by first appearance; the allocation below does not depend on it.
    ordered = np.sort(codes)
    n_classes = codes.max() + 1
    allocation = np.stack(
        [np.bincount(ordered[i::n_splits], minlength=n_classes) for i in range(n_splits)]
    )  # [n_splits, n_classes]
    test_fold = np.empty(labels.size, dtype=np.int64)
    for k in range(n_classes):
        test_fold[codes == k] = np.repeat(np.arange(n_splits), allocation[:, k])
    everything = np.arange(labels.size)
    return [(everything[test_fold != i], everything[test_fold == i]) for i in range(n_splits)]


def _fit_and_decide(
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> list[np.ndarray]:
    """Fit a logistic regression per row of each block and return decision values on its test part.

    Blocks whose training sets have the same size are stacked into one batched solve.

    Args:
        blocks: (x_train [P, n], y_train [n], x_test [P, m]) per block; row p of x_train and
            x_test belongs to problem p; y_train is shared by the block's problems.

    Returns:
        decision values w * x_test + b, [P, m] per block.
    """
    sizes = {x_train.shape[1] for x_train, _, _ in blocks}
    if len(sizes) == 1:
        x = np.concatenate([x_train for x_train, _, _ in blocks])
        y = np.concatenate(
            [np.broadcast_to(y_train, x_train.shape) for x_train, y_train, _ in blocks]
        )
        weight, intercept = _fit_logistic_1d(x, y)
        bounds = np.cumsum([0] + [x_train.shape[0] for x_train, _, _ in blocks])
        fits = [(weight[a:b], intercept[a:b]) for a, b in itertools.pairwise(bounds)]
    else:
        fits = [_fit_logistic_1d(x_train, y_train) for x_train, y_train, _ in blocks]
    return [
        w[:, None] * x_test + b[:, None]
        for (w, b), (_, _, x_test) in zip(fits, blocks, strict=True)
    ]


def _softplus(u: np.ndarray) -> np.ndarray:
    """log(1 + exp(u)) without overflow."""
    return np.maximum(u, 0.0) + np.log1p(np.exp(-np.abs(u)))


def _fit_logistic_1d(
    x: np.ndarray, y: np.ndarray, *, C: float = LOGREG_C
) -> tuple[np.ndarray, np.ndarray]:
    """Batched L2 logistic regression on one feature, by damped Newton to tight convergence.

    Problem p minimises 0.5 * w_p^2 + C * sum_i log(1 + exp(-t_pi * (w_p * x_pi + b_p))) with
    t = 2y - 1: scikit-learn's LogisticRegression(C=C) objective (it divides the whole objective
    by C * n, which moves no optimum), intercept b unpenalised. The objective is strictly convex
    with a finite optimum even on separable data, because the penalty bounds w and both classes
    bound b.

    Internally x is centred per problem (b' = b + w * mean(x)): the same objective, since b is
    free, but a better-conditioned Hessian when losses have a large mean and a small spread.

    Args:
        x: [P, n] feature values, one problem per row.
        y: [n] or [P, n] labels in {0, 1}; both classes must occur in every row.
        C: inverse L2 strength.

    Returns:
        (w [P], b [P]): weight and intercept on the raw feature, so decision = w * x + b.
    """
    x = np.asarray(x, dtype=np.float64)
    sign = 2.0 * np.broadcast_to(np.asarray(y, dtype=np.float64), x.shape) - 1.0  # t, [P, n]
    y01 = (sign + 1.0) / 2.0
    centre = x.mean(axis=1)
    xc = x - centre[:, None]
    reach = np.abs(xc).max(axis=1)  # [P], bounds |Δz| of a step: |Δw| * reach + |Δb|

    num = x.shape[0]
    w = np.zeros(num)
    b = np.zeros(num)  # intercept in centred coordinates
    active = np.arange(num)
    for _ in range(NEWTON_MAX_ITER):
        if active.size == 0:
            break
        xa, ta, ya = xc[active], sign[active], y01[active]
        wa, ba = w[active], b[active]
        z = wa[:, None] * xa + ba[:, None]
        p = expit(z)
        s = p * expit(-z)  # p(1 - p), accurate when p is near 1
        residual = p - ya
        g_w = wa + C * np.einsum("pi,pi->p", residual, xa)
        g_b = C * residual.sum(axis=1)
        sx = s * xa
        h_ww = 1.0 + C * np.einsum("pi,pi->p", sx, xa)
        h_wb = C * sx.sum(axis=1)
        h_bb = C * s.sum(axis=1)
        # det >= h_bb by Cauchy-Schwarz; it is 0 only when every s underflowed, far from the
        # optimum, where the tiny floor just gives a long step that the damping below shortens.
        det = np.maximum(h_ww * h_bb - h_wb**2, 1e-300)
        step_w = -(h_bb * g_w - h_wb * g_b) / det
        step_b = -(h_ww * g_b - h_wb * g_w) / det
        decrement = -(g_w * step_w + g_b * step_b)  # λ² = gᵀ H⁻¹ g >= 0
        logit_step = np.abs(step_w) * reach[active] + np.abs(step_b)  # max |Δz| over the samples
        scale = np.minimum(1.0, NEWTON_MAX_LOGIT_STEP / np.maximum(logit_step, 1e-300))
        step_w *= scale
        step_b *= scale
        slope = -decrement * scale  # directional derivative gᵀ(step), <= 0

        # Backtracking (Armijo) line search, vectorised, skipped near the optimum.
        f_now = 0.5 * wa**2 + C * _softplus(-ta * z).sum(axis=1)
        alpha = np.ones(active.size)
        accepted = decrement <= NEWTON_FULL_STEP_DECREMENT
        done = accepted & ((logit_step <= NEWTON_STEP_TOL) | (decrement <= NEWTON_DECREMENT_TOL))
        for _ in range(LINE_SEARCH_MAX_HALVINGS):
            trial = np.flatnonzero(~accepted)
            if trial.size == 0:
                break
            w_try = wa[trial] + alpha[trial] * step_w[trial]
            b_try = ba[trial] + alpha[trial] * step_b[trial]
            z_try = w_try[:, None] * xa[trial] + b_try[:, None]
            f_try = 0.5 * w_try**2 + C * _softplus(-ta[trial] * z_try).sum(axis=1)
            ok = f_try <= f_now[trial] + ARMIJO_C * alpha[trial] * slope[trial]
            accepted[trial[ok]] = True
            alpha[trial[~ok]] *= 0.5
        # No decrease found at all (never seen in practice): take no step; the problem stays
        # active and is reported below if it never converges.
        alpha[~accepted] = 0.0
        w[active] = wa + alpha * step_w
        b[active] = ba + alpha * step_b
        active = active[~done]
    if active.size:
        warnings.warn(
            f"logistic regression did not converge for {active.size} of {num} problems in "
            f"{NEWTON_MAX_ITER} Newton iterations",
            RuntimeWarning,
            stacklevel=3,
        )
    return w, b - w * centre


def _seed_fold_score(fpr: np.ndarray, fnr: np.ndarray, cap: float) -> np.ndarray:
    """Bucket score of one fold per example (spec §2); NaN where the seed gives none.

    Args:
        fpr, fnr: [E] false positive and false negative rates of the fold's attack.
        cap: largest ε, ln(N/2 - 1).

    Returns:
        [E] 2 / 2^(trunc(min(ε, cap) / 0.5) + 1), i.e. 2^-trunc(...): 1 for |ε| < 0.5, halving
        per 0.5 of ε above, doubling per 0.5 below -0.5 (attack worse than chance).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        # log(0) = -inf and log(negative) = NaN are the seed's np.log results too.
        e1 = np.log(1.0 - SEED_DELTA - fpr) - np.log(fnr)
        e2 = np.log(1.0 - SEED_DELTA - fnr) - np.log(fpr)
    epsilon = np.fmax(e1, e2)  # like the seed's np.nanmax: a NaN term is ignored
    # trunc toward zero, as Python's int() in the seed.
    bucket = np.trunc(np.minimum(epsilon, cap) / SEED_BUCKET_WIDTH)
    valid = (fpr > 0) & (fnr > 0) & ~np.isnan(epsilon)
    with np.errstate(invalid="ignore"):
        return np.where(valid, np.exp2(-bucket), np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of each row ignoring NaN; NaN (without a warning) for an all-NaN row. [R, C] -> [R]."""
    present = ~np.isnan(values)
    count = present.sum(axis=1)
    total = np.where(present, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
