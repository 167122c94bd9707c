"""Second opinions on the same banks: a held-out likelihood-ratio attack and KLOM.

Pure numpy/scipy maths: arrays in, numbers out. Banks are `[num models, num examples]`, as in
the rest of `unlearn_cli`; inputs are never modified in place. Neither reading needs a ceiling:
a perfect unlearner (both banks drawn from one distribution) reads 0.5 (attack) and about 0
(KLOM, up to the sampling noise of a histogram of N models) at any N.

**Held-out likelihood-ratio attack** (U-LiRA, Hayes et al. 2024, arXiv:2403.01218, after LiRA,
Carlini et al. 2022). Per forget example, fit one Gaussian to the unlearned bank's logit-scaled
confidences and one to the retrained bank's, on part of the models; classify each held-out model
as unlearned when its confidence is more likely under the unlearned Gaussian. The paper's
choices kept here: the statistic is the logit-scaled confidence of the true class, the same the
official metric uses; one Gaussian per bank and per example with its own mean and variance
(LiRA's "online" per-example variance); the attack is judged on models it was not fitted to,
and by its accuracy on a balanced set of unlearned and retrained models (0.5 = the attacker
cannot tell). Choices the paper leaves open, made here:
- models are rotated by k-fold (k = 5, or N when N < 5) over each bank, folds drawn by a seeded
  permutation, so every model is held out once and scored by Gaussians fitted to the other
  (k - 1)/k of both banks;
- variances are unbiased (ddof = 1) and floored at 1e-12 (a constant bank, e.g. `none`, whose
  runs are identical, gets a spike, not a division by zero);
- a held-out model is called unlearned iff log-likelihood ratio > 0 (an exact tie, e.g. two equal
  Gaussians, counts as retrained: the attack then reads exactly 0.5);
- TPR at a false-positive rate α: the share of unlearned held-out models scoring above the
  (floor(α N) + 1)-th highest retrained score, i.e. the best threshold rule with at most α N false
  positives among the N retrained models (at N < 100, 1% FPR allows none);
- "beats chance": a one-sided Monte-Carlo test at α = 0.05 of the number of correct held-out
  calls among 2N. Its null distribution is drawn once per call from 2,000 simulated examples
  whose two banks come from one Gaussian, run through the same folds: the attack is unchanged
  by any affine change of an example's confidences, so under a Gaussian null this one
  distribution serves every example. p = (1 + #null draws >= observed) / (1 + 2,000). (A plain
  binomial test against Binomial(2N, 1/2) is not valid here: cross-validated calls are
  correlated, and it passed 7% of same-distribution examples at N = 50.) Under a perfect
  unlearner about 5% of examples pass, fewer at small N (the count is discrete); read the share
  against that.

**KLOM** (KL divergence of margins; Georgiev, Rinberg et al. 2024, arXiv:2410.23232, Appendix
E.1; the Data Unlearning Bench). Per example, the margin of each model is the true-class logit
minus the log-sum-exp of the other logits (equal to the logit-scaled confidence, computed
without going through probabilities), in float64 from the stored logits. KLOM is
KL(unlearned || retrained) between the two banks' margin histograms, binned as the bench does:
margins clipped to [-100, 100]; 20 equal-width bins spanning the smallest to the largest margin
of both banks together (a span of zero becomes [m, m + 1]); bin probabilities = counts / models;
retrained probabilities floored at 1e-5 where the unlearned bank has mass, then renormalised (as
scipy.stats.entropy does). One deliberate difference: the bench's np.digitize leaves a margin
equal to the top edge (the largest of the pair, at least one model) out of the counts, which can
empty a whole constant bank (its KL is then NaN or 0); here it counts in the last bin, as
np.histogram does. KLOM lies in [0, log((1 + 1e-5) / 1e-5) = 11.51]; banks that share no bin
read log(1 / 1e-5) = 11.51 minus the entropy of the unlearned bank's histogram (about).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

# --- The held-out likelihood-ratio attack --------------------------------------------------------
LIRA_FOLDS = 5  # k of the k-fold rotation over models: fit on 80%, score the held-out 20%
LIRA_VAR_FLOOR = 1e-12  # confidence units squared: a constant bank becomes a narrow spike
LIRA_FPRS = (0.01, 0.05)  # false-positive rates at which the TPR is reported
LIRA_ALPHA = 0.05  # level of the per-example test against chance
LIRA_NULL_DRAWS = 2000  # simulated same-distribution examples that calibrate the test
MIN_MODELS = 3  # per bank: 3 models leave 2 per fit (a variance needs 2)

# --- KLOM, as the Data Unlearning Bench bins it ------------------------------------------------
KLOM_BINS = 20
KLOM_EPS = 1e-5  # floor of a retrained bin probability where the unlearned bank has mass
KLOM_CLIP = 100.0  # margins are clipped to [-KLOM_CLIP, KLOM_CLIP] (logit units)
KLOM_PERCENTILE = 95.0
KLOM_CHUNK = 4096  # examples binned at once (bounds memory: chunk x models x bins booleans)


@dataclass(frozen=True)
class LiraScores:
    """The held-out likelihood-ratio attack on one method's banks.

    Attributes:
        balanced_accuracy: float64 [E], per example: mean of the TPR and the TNR of the
            held-out calls (with equal banks, the accuracy). 0.5 = chance.
        tpr_at_fpr: float64 [len(fprs), E], per example the TPR at each FPR in `fprs`.
        p_value: float64 [E], one-sided Monte-Carlo p-value of the correct calls against a
            same-distribution (Gaussian) null.
        beats_chance: bool [E], p_value < alpha.
        fprs: the false-positive rates of `tpr_at_fpr`.
        mean_balanced_accuracy, mean_tpr_at_fpr (one per FPR): means over the examples.
        share_beating_chance: mean of `beats_chance`.
        num_models: N per bank. folds: k. seed: of the fold permutation. alpha: the test level.
    """

    balanced_accuracy: np.ndarray
    tpr_at_fpr: np.ndarray
    p_value: np.ndarray
    beats_chance: np.ndarray
    fprs: tuple[float, ...]
    mean_balanced_accuracy: float
    mean_tpr_at_fpr: tuple[float, ...]
    share_beating_chance: float
    num_models: int
    folds: int
    seed: int
    alpha: float


def held_out_lira(
    unlearned_conf: np.ndarray,
    retrained_conf: np.ndarray,
    *,
    folds: int = LIRA_FOLDS,
    seed: int = 0,
    fprs: tuple[float, ...] = LIRA_FPRS,
    alpha: float = LIRA_ALPHA,
) -> LiraScores:
    """Per-example held-out likelihood-ratio attack (U-LiRA style); see the module docstring.

    Args:
        unlearned_conf: [N, E] logit-scaled confidence of each unlearned model on each forget
            example.
        retrained_conf: [N, E] the same for the retrained (reference) models.
        folds: k of the k-fold rotation; min(k, N) is used.
        seed: seeds the permutation that deals each bank's models to folds.
        fprs: false-positive rates, each in [0, 1), for the TPR.
        alpha: level of the per-example test against chance.

    Returns:
        LiraScores.

    Raises:
        ValueError: shapes differ or are not 2-D, N < 3, no examples, a value is not finite,
            folds < 2, or an FPR or alpha outside its range.
    """
    unlearned = _finite_2d(unlearned_conf, "unlearned_conf")
    retrained = _finite_2d(retrained_conf, "retrained_conf")
    num_models, num_examples = _same_banks(unlearned, retrained)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if not all(0.0 <= f < 1.0 for f in fprs):
        raise ValueError(f"every FPR must lie in [0, 1), got {fprs}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k = min(folds, num_models)

    rng = np.random.default_rng(seed)
    parts_u = np.array_split(rng.permutation(num_models), k)
    parts_r = np.array_split(rng.permutation(num_models), k)
    llr_u, llr_r = _held_out_llr(unlearned, retrained, parts_u, parts_r)
    called_u = np.sum(llr_u > 0.0, axis=0)  # true positives  [E]
    called_r = np.sum(llr_r > 0.0, axis=0)  # false positives [E]
    balanced = 0.5 * (called_u / num_models + 1.0 - called_r / num_models)
    correct = called_u + (num_models - called_r)

    # The test's null: same-distribution Gaussian banks through the same folds.
    null = np.random.default_rng([seed, 1]).standard_normal((2, num_models, LIRA_NULL_DRAWS))
    null_u, null_r = _held_out_llr(null[0], null[1], parts_u, parts_r)
    null_correct = np.sort(np.sum(null_u > 0.0, axis=0) + np.sum(null_r <= 0.0, axis=0))
    at_least = null_correct.size - np.searchsorted(null_correct, correct, side="left")
    p_value = (1.0 + at_least) / (1.0 + null_correct.size)
    tpr = np.stack([_tpr_at_fpr(llr_u, llr_r, fpr) for fpr in fprs])
    beats = p_value < alpha
    for array in (balanced, tpr, p_value, beats):
        array.setflags(write=False)
    return LiraScores(
        balanced_accuracy=balanced,
        tpr_at_fpr=tpr,
        p_value=p_value,
        beats_chance=beats,
        fprs=tuple(float(f) for f in fprs),
        mean_balanced_accuracy=float(balanced.mean()),
        mean_tpr_at_fpr=tuple(float(t) for t in tpr.mean(axis=1)),
        share_beating_chance=float(beats.mean()),
        num_models=num_models,
        folds=k,
        seed=seed,
        alpha=float(alpha),
    )


def _held_out_llr(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    parts_u: list[np.ndarray],
    parts_r: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out log-likelihood ratios (unlearned Gaussian over retrained), fold by fold.

    Args:
        unlearned, retrained: [N, E] confidences. parts_u, parts_r: the k folds of model
            indices of each bank.

    Returns:
        ([N, E], [N, E]): each model's ratio from the Gaussians fitted without its fold.
    """
    llr_u = np.empty(unlearned.shape)
    llr_r = np.empty(retrained.shape)
    for held_u, held_r in zip(parts_u, parts_r, strict=True):
        gauss_u = _gaussian(np.delete(unlearned, held_u, axis=0))
        gauss_r = _gaussian(np.delete(retrained, held_r, axis=0))
        for bank, held, out in ((unlearned, held_u, llr_u), (retrained, held_r, llr_r)):
            out[held] = _log_pdf(bank[held], *gauss_u) - _log_pdf(bank[held], *gauss_r)
    return llr_u, llr_r


def _gaussian(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and floored unbiased variance of a bank [n, E] -> ([E], [E])."""
    return bank.mean(axis=0), np.maximum(bank.var(axis=0, ddof=1), LIRA_VAR_FLOOR)


def _log_pdf(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Gaussian log density of x [n, E] under per-example (mean [E], var [E])."""
    return -0.5 * (np.log(2.0 * np.pi * var) + (x - mean) ** 2 / var)


def _tpr_at_fpr(scores_pos: np.ndarray, scores_neg: np.ndarray, fpr: float) -> np.ndarray:
    """Best TPR of "score > t" rules with at most floor(fpr * n) false positives, per column.

    Args:
        scores_pos, scores_neg: [n, E] scores of the positives (unlearned) and negatives.

    Returns:
        [E] the share of positives above the (floor(fpr * n) + 1)-th highest negative score.
    """
    allowed = int(np.floor(fpr * scores_neg.shape[0] + 1e-9))  # false positives allowed
    threshold = -np.sort(-scores_neg, axis=0)[allowed]  # [E]
    return np.mean(scores_pos > threshold, axis=0)


@dataclass(frozen=True)
class KlomScores:
    """KLOM of one method on the forget set and the test set.

    Attributes:
        forget: float64 [E], KL(unlearned || retrained) of the margin histograms per forget
            example. test: float64 [T], the same per test example.
        forget_p95, forget_mean, test_p95, test_mean: 95th percentile (numpy's linear
            interpolation) and mean over each set. 0 = the banks' histograms match.
        num_models: N per bank.
    """

    forget: np.ndarray
    test: np.ndarray
    forget_p95: float
    forget_mean: float
    test_p95: float
    test_mean: float
    num_models: int


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """True-class logit minus log-sum-exp of the other logits, in float64.

    Args:
        logits: [M, K, C] stored logits of M models on K examples, C >= 2 classes.
        labels: [K] true classes in [0, C).

    Returns:
        float64 [M, K] margins.

    Raises:
        ValueError: shapes do not fit, fewer than 2 classes, a label out of range, or a
            non-finite logit.
    """
    z = np.asarray(logits)
    y = np.asarray(labels)
    if z.ndim != 3 or y.shape != (z.shape[1],) or z.shape[2] < 2:
        raise ValueError(
            f"logits must be [models, examples, classes >= 2] and labels [examples]; got "
            f"{z.shape} and {y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= z.shape[2]):
        raise ValueError(f"labels must lie in [0, {z.shape[2]}), got {y.min()}..{y.max()}")
    z = z.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"logits hold {np.sum(~np.isfinite(z))} non-finite values")
    index = np.broadcast_to(y[None, :, None], z.shape[:2] + (1,))
    true_logit = np.take_along_axis(z, index, axis=-1)[..., 0]
    np.put_along_axis(z, index, -np.inf, axis=-1)  # z is a private float64 copy
    return true_logit - logsumexp(z, axis=-1)


def klom_per_example(
    unlearned_margins: np.ndarray,
    retrained_margins: np.ndarray,
    *,
    bins: int = KLOM_BINS,
    eps: float = KLOM_EPS,
    clip: float = KLOM_CLIP,
) -> np.ndarray:
    """KL(unlearned || retrained) of the binned margins, per example; see the module docstring.

    Args:
        unlearned_margins: [N, K] margins of the unlearned models.
        retrained_margins: [N, K] margins of the retrained models.
        bins: equal-width bins over each example's joint range. eps: floor of a retrained bin
            probability where the unlearned bank has mass. clip: margins are clipped to
            [-clip, clip].

    Returns:
        float64 [K], each in [0, log((1 + eps) / eps)].

    Raises:
        ValueError: shapes differ or are not 2-D, N < 3, no examples, a non-finite margin, or
            bins < 1 / eps outside (0, 1) / clip <= 0.
    """
    unlearned = _finite_2d(unlearned_margins, "unlearned_margins")
    retrained = _finite_2d(retrained_margins, "retrained_margins")
    _same_banks(unlearned, retrained)
    if bins < 1 or not 0.0 < eps < 1.0 or not clip > 0.0:
        raise ValueError(f"need bins >= 1, 0 < eps < 1, clip > 0; got {bins}, {eps}, {clip}")
    out = np.empty(unlearned.shape[1])
    for start in range(0, out.size, KLOM_CHUNK):
        cols = slice(start, start + KLOM_CHUNK)
        out[cols] = _klom_chunk(unlearned[:, cols].T, retrained[:, cols].T, bins, eps, clip)
    return out


def _klom_chunk(p: np.ndarray, q: np.ndarray, bins: int, eps: float, clip: float) -> np.ndarray:
    """KLOM for examples as rows: p [K, n_p] unlearned, q [K, n_q] retrained -> [K]."""
    p = np.clip(p, -clip, clip)
    q = np.clip(q, -clip, clip)
    low = np.minimum(p.min(axis=1), q.min(axis=1))
    high = np.maximum(p.max(axis=1), q.max(axis=1))
    high = np.where(low >= high, low + 1.0, high)
    edges = np.linspace(low, high, bins + 1, axis=1)  # [K, bins + 1], as np.linspace per row
    inner = edges[:, None, 1:bins]  # the bins - 1 edges between bins

    def probabilities(x: np.ndarray) -> np.ndarray:
        # Bin i holds edges[i] <= x < edges[i + 1]; the top edge counts in the last bin.
        index = np.sum(x[:, :, None] >= inner, axis=2)  # [K, n] in 0..bins-1
        rows = np.arange(x.shape[0])[:, None] * bins
        counts = np.bincount((rows + index).ravel(), minlength=x.shape[0] * bins)
        return counts.reshape(x.shape[0], bins) / x.shape[1]

    p_prob = probabilities(p)
    q_prob = probabilities(q)
    q_prob = np.where(p_prob > 0.0, np.maximum(q_prob, eps), q_prob)
    q_prob = q_prob / q_prob.sum(axis=1, keepdims=True)  # scipy.stats.entropy renormalises qk
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_prob > 0.0, p_prob * np.log(p_prob / q_prob), 0.0)
    return terms.sum(axis=1)


def klom(
    unlearned_forget: np.ndarray,
    retrained_forget: np.ndarray,
    unlearned_test: np.ndarray,
    retrained_test: np.ndarray,
) -> KlomScores:
    """KLOM on the forget set and on the test set, with their 95th percentiles and means.

    Args:
        unlearned_forget, retrained_forget: [N, E] margins on the forget set.
        unlearned_test, retrained_test: [N, T] margins on the test set (examples no model
            trained on: unlearning should leave them as retraining does).

    Returns:
        KlomScores.

    Raises:
        ValueError: as `klom_per_example`, for either set.
    """
    forget = klom_per_example(unlearned_forget, retrained_forget)
    test = klom_per_example(unlearned_test, retrained_test)
    for array in (forget, test):
        array.setflags(write=False)
    return KlomScores(
        forget=forget,
        test=test,
        forget_p95=float(np.percentile(forget, KLOM_PERCENTILE)),
        forget_mean=float(forget.mean()),
        test_p95=float(np.percentile(test, KLOM_PERCENTILE)),
        test_mean=float(test.mean()),
        num_models=int(np.asarray(unlearned_forget).shape[0]),
    )


# --- Internals -----------------------------------------------------------------------------------


def _finite_2d(values: np.ndarray, name: str) -> np.ndarray:
    """A float64 view or copy of a 2-D array of finite values; ValueError otherwise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num models, num examples], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds {np.sum(~np.isfinite(array))} non-finite values (NaN/inf)")
    return array


def _same_banks(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[int, int]:
    """(N, E) of two banks of equal shape with N >= MIN_MODELS and E >= 1."""
    if unlearned.shape != retrained.shape:
        raise ValueError(
            f"the unlearned bank has shape {unlearned.shape} but the retrained bank "
            f"{retrained.shape}; both must be [num models, num examples] with equal N"
        )
    num_models, num_examples = unlearned.shape
    if num_models < MIN_MODELS:
        raise ValueError(f"need at least {MIN_MODELS} models per bank, got {num_models}")
    if num_examples < 1:
        raise ValueError("no examples to score (num examples is 0)")
    return int(num_models), int(num_examples)
