"""Scoring maths for `unlearn score`: the NeurIPS 2023 unlearning metric, and what we add to it.

Pure numpy: arrays in, numbers out. No device code, no CLI imports.

Conventions (docs/metric-spec.md):
- a "bank" is the outputs of N models of one kind: the unlearned models U or the reference models R
  retrained from scratch on the retain set;
- confidences are arrays `[num_models, num_examples]`, one column per forget example;
- every function leaves its inputs untouched (it sorts and converts copies).

Where the numerics come from: the organizers' released scoring code
(google-deepmind/unlearning_evaluation, metric.py) as described in spec section 1, pinned down by
the golden cases in shared/metric/. The golden file shows that upstream holds every rate in float32
and evaluates the epsilon formula in float32: its epsilons are float32 values (e.g.
1.0969018936157227 = float32(log(float32(0.99999) - 509/512) - log(1/512)); the same formula in
float64 gives 1.0969042). We reproduce that arithmetic, so our epsilons equal the golden ones bit
for bit and a value close to a bucket edge (a multiple of 0.5) lands in upstream's bucket.

Three implementations of the per-example epsilon live here, with equal values (tested):
- `per_example_epsilons_reference`: the spec read literally, one example at a time, every one of
  its ~160,000 interval rules counted with `searchsorted` (vectorised over the right edges). Slow
  (~10 ms per example) and simple: the oracle of the tests and the baseline of
  benchmarks/bench_metrics.py;
- the per-example fast path (`_example_epsilon_fast`): exact counts on an integer lattice of
  thresholds (see the comment above `_left_edge_values`), ~0.2 ms per example, most of it the
  overhead of ~200 small numpy calls. Used for banks of unequal sizes;
- the batched path (`_epsilons_batched`, used by `per_example_epsilons` for banks of equal size,
  by the ceiling and by the bootstrap): the same counts for many columns per numpy call (see the
  comment above `_grid_positions`), ~4x less CPU than the per-example path.

Where a last-bit difference could change a reported number, and why it cannot: README, "Exactness".
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from statistics import NormalDist
from typing import NamedTuple, TypedDict

import numpy as np

from . import helpers

__all__ = [
    "DELTA",
    "EPSILON_CAP",
    "CalibratedCeiling",
    "bootstrap_forget_quality",
    "calibrated_ceiling",
    "example_scores",
    "forget_quality",
    "logit_scaled_confidence",
    "official_scores",
    "per_example_epsilons",
    "per_example_epsilons_reference",
]

# --- Constants of the official metric (spec section 1). -------------------------------------------
DELTA = 1e-5  # the delta of (epsilon, delta)-differential privacy used by the challenge
EPSILON_CAP = 50.0  # upstream's cap; also what perfect separation and degenerate spread score
CONFIDENCE_FLOOR = 1e-45  # added inside both logs of the logit-scaled confidence (spec 1.1)
THRESHOLDS_PER_UNIT = 100  # grid density of both attack families: thresholds per unit of confidence
INTERVAL_BUFFER = 2.0  # interval attacks: slack around the edges, in units of confidence
DEGENERATE_SPREAD_RATIO = 0.01  # min(range)/max(range) below this: epsilon = cap, no attack (1.3)
BUCKET_WIDTH = 0.5  # width of the epsilon buckets of the per-example score H (spec 1.6)

# Upstream computes its rates as float32 means; 1 - delta is rounded to float32 before the rate is
# subtracted from it (that is what float32 arithmetic on `1 - delta - rate` does).
_ONE_MINUS_DELTA_F32 = np.float32(1.0 - DELTA)


# --- Statistic per (model, example) ---------------------------------------------------------------
def logit_scaled_confidence(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence of the true class, one value per row (spec 1.1).

    Args:
        logits: `[num_examples, num_classes]` model outputs (float32 as the store keeps them).
        targets: `[num_examples]` integer true labels.

    Returns:
        float64 `[num_examples]`: log(p_y + 1e-45) - log(p_wrong + 1e-45), where p is the softmax of
        the row and p_wrong the sum of p over the other classes.

    For float32 logits the values are bit-identical to the organizers' code: the same numpy
    operations in the same order on a C-ordered copy: subtract the row maximum (float32), `np.exp`
    in float32, cast to float64, divide by the row sum (float64), zero p_y and sum the row for
    p_wrong (not 1 - p_y, which rounds to 0 for a confident row and saturates the statistic at
    ~103.6). Bit-for-bit matters: the attack thresholds start and end on the bank's own extreme
    confidences, so a last-bit change can move a rate and an example's epsilon (doing the softmax
    wholly in float32 missed by up to 9e-8 and changed 12 of 135 epsilons on the digits demo).
    "The same numpy operations" also means the same numpy kernels: numpy runs float32 `exp` on
    SIMD code chosen for the CPU (see the README, "Exactness"), so equality with the golden
    values holds where numpy picks the kernels the golden was computed with (x86-64 with AVX2).

    Other dtypes: float64 logits are exponentiated in float64 (what upstream's code does with
    them); narrower floats (float16) are widened to float32 first: upstream would take `exp` in
    float16, which underflows below e^-17 and saturates confident rows; integer logits are
    converted to float64.
    """
    y = np.asarray(targets)
    if np.ndim(logits) != 2 or y.shape != (np.shape(logits)[0],):
        raise ValueError(
            f"logits must be [num_examples, num_classes] and targets [num_examples]; "
            f"got {np.shape(logits)} and {np.shape(targets)}"
        )
    num_classes = np.shape(logits)[1]
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"targets must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    z = np.array(logits, order="C", dtype=_exp_dtype(np.asarray(logits).dtype))  # a C-ordered
    # copy: the caller's logits stay untouched, and the row sums below add in the same order
    # (numpy's pairwise sum along a contiguous row) whatever layout the caller passed.
    z -= z.max(axis=1, keepdims=True)  # softmax is shift-invariant; this avoids overflow in exp
    p = np.exp(z).astype(np.float64)  # exp in the logits' dtype, as upstream, then float64
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(p.shape[0])
    p_true = p[rows, y]  # fancy indexing copies
    p[rows, y] = 0.0
    p_wrong = p.sum(axis=1)
    return np.log(p_true + CONFIDENCE_FLOOR) - np.log(p_wrong + CONFIDENCE_FLOOR)


def _exp_dtype(dtype: np.dtype) -> type:
    """The float dtype `logit_scaled_confidence` exponentiates in (see its docstring)."""
    if dtype == np.float32 or dtype == np.float64:
        return dtype.type
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 4:
        return np.float32
    return np.float64


# --- Epsilon of one attack rule, from its counts --------------------------------------------------
def _rule_epsilons(
    true_pos: np.ndarray, false_pos: np.ndarray, num_pos: int, num_neg: int
) -> np.ndarray:
    """Epsilon of each attack rule from its hit counts, in upstream's float32 arithmetic (spec 1.5).

    Args:
        true_pos: integer array, any shape: positives the rule flags (0..num_pos).
        false_pos: integer array broadcastable with `true_pos`: negatives it flags (0..num_neg).
        num_pos, num_neg: bank sizes.

    Returns:
        float32 array of the broadcast shape: +inf for perfect separation (FPR = FNR = 0); 0 for a
        discarded rule (exactly one of FPR, FNR is 0, or both epsilon terms NaN) -- 0 rather than
        "absent" is harmless because the per-example epsilon is clipped below at 0 anyway;
        otherwise max(0, log(1 - delta - FPR) - log(FNR), log(1 - delta - FNR) - log(FPR)),
        a NaN term (log of a negative number, when a rate exceeds 1 - delta) being ignored.
    """
    # Rates as upstream holds them: float32 means of 0/1 indicators, i.e. count / N rounded once
    # to float32 (float64 division then rounding gives the same float32 for N < 2**24).
    fpr = (np.asarray(false_pos) / num_neg).astype(np.float32)
    fnr = ((num_pos - np.asarray(true_pos)) / num_pos).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        term_fnr = np.log(_ONE_MINUS_DELTA_F32 - fpr) - np.log(fnr)
        term_fpr = np.log(_ONE_MINUS_DELTA_F32 - fnr) - np.log(fpr)
    eps = np.fmax(np.fmax(term_fnr, term_fpr), np.float32(0.0))  # fmax ignores NaN
    fpr_zero = fpr == 0
    fnr_zero = fnr == 0
    eps = np.where(fpr_zero != fnr_zero, np.float32(0.0), eps)  # too few samples: discarded
    return np.where(fpr_zero & fnr_zero, np.float32(np.inf), eps).astype(np.float32)


@lru_cache(maxsize=16)
def _epsilon_table(num_pos: int, num_neg: int) -> np.ndarray:
    """All rule epsilons for these bank sizes, flat: entry tp * (num_neg + 1) + fp.

    Returns:
        read-only float32 `[(num_pos + 1) * (num_neg + 1)]`; 1 MiB at N = 512. A rule's epsilon
        depends on nothing but its two counts, so the fast path looks it up here instead of taking
        ~2 float32 logs per rule; the values are those of `_rule_epsilons`, the reference's formula.
    """
    tp = np.arange(num_pos + 1)[:, None]
    fp = np.arange(num_neg + 1)[None, :]
    table = _rule_epsilons(tp, fp, num_pos, num_neg).ravel()
    table.setflags(write=False)
    return table


# --- Shared per-example set-up (spec 1.2-1.4) -----------------------------------------------------
def _grid_size(span: float) -> int:
    """Number of thresholds upstream puts on a span: ceil(span * 100), in float64."""
    return int(math.ceil(span * THRESHOLDS_PER_UNIT))


def _check_paired_banks(unlearned: np.ndarray, retrained: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`_check_banks`, and what forget quality needs besides: as many models in both banks and
    at least one forget example."""
    u, r = _check_banks(unlearned, retrained)
    if u.shape[0] != r.shape[0]:
        raise ValueError(
            f"forget quality needs the same number of models in both banks; got {u.shape[0]} "
            f"unlearned and {r.shape[0]} retrained"
        )
    if u.shape[1] == 0:
        raise ValueError("forget quality needs at least one forget example, got 0")
    return u, r


def _check_banks(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both banks as float64 `[num_models, num_examples]`, finite, same number of examples."""
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2:
        raise ValueError(
            f"confidences must be [num_models, num_examples]; got unlearned {u.shape}, "
            f"retrained {r.shape}"
        )
    if u.shape[1] != r.shape[1]:
        raise ValueError(
            f"both banks must cover the same forget examples: unlearned has {u.shape[1]}, "
            f"retrained has {r.shape[1]}"
        )
    if u.shape[0] < 2 or r.shape[0] < 2:
        raise ValueError(
            f"each bank needs at least 2 models; got {u.shape[0]} unlearned, {r.shape[0]} retrained"
        )
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("confidences must be finite (no NaN or inf)")
    return u, r


def _degenerate_epsilon(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float | None:
    """The epsilon decided without any attack (spec 1.3), or None when the attacks must run.

    pos_sorted, neg_sorted: sorted `[num_models]` columns of the two banks.
    Upstream: min(range)/max(range) < 0.01 gives the cap 50. Both ranges zero is 0/0, unhandled
    upstream; we decide it from the two constants: equal -> 0 (the banks are indistinguishable),
    different -> 50 (every threshold between them separates the banks perfectly).
    """
    range_pos = pos_sorted[-1] - pos_sorted[0]
    range_neg = neg_sorted[-1] - neg_sorted[0]
    widest = max(range_pos, range_neg)
    if widest == 0.0:
        return 0.0 if pos_sorted[0] == neg_sorted[0] else EPSILON_CAP
    if min(range_pos, range_neg) / widest < DEGENERATE_SPREAD_RATIO:
        return EPSILON_CAP
    return None


def _ordered_banks(
    unlearned_sorted: np.ndarray, retrained_sorted: np.ndarray, median_u: float, median_r: float
) -> tuple[np.ndarray, np.ndarray]:
    """(pos, neg) of spec 1.2: the retrained bank is positive iff its median is strictly higher."""
    if median_r > median_u:
        return retrained_sorted, unlearned_sorted
    return unlearned_sorted, retrained_sorted


def _interval_banks(
    pos_sorted: np.ndarray, neg_sorted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """(peaky, other, width) of spec 1.4: the interval family targets the bank with the smaller
    range (ties go to the original negative bank, as upstream swaps when range(pos) >= range(neg));
    width = the smaller range."""
    range_pos = pos_sorted[-1] - pos_sorted[0]
    range_neg = neg_sorted[-1] - neg_sorted[0]
    width = min(range_pos, range_neg)
    if range_pos >= range_neg:
        return neg_sorted, pos_sorted, width
    return pos_sorted, neg_sorted, width


def _single_threshold_counts(
    pos_sorted: np.ndarray, neg_sorted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) of every rule "positive if c >= t" (spec 1.4).

    Thresholds: linspace(lo, hi, ceil((hi - lo) * 100)) over both banks, exactly as upstream.
    """
    lo = min(pos_sorted[0], neg_sorted[0])
    hi = max(pos_sorted[-1], neg_sorted[-1])
    thresholds = np.linspace(lo, hi, _grid_size(hi - lo))
    # count(c >= t) = N - count(c < t); searchsorted(side="left") counts c < t.
    true_pos = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="left")
    false_pos = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    return true_pos, false_pos


def _right_edges(peaky_sorted: np.ndarray, width: float) -> np.ndarray:
    """Right edges of the interval rules: linspace(r_min, r_max, ceil((r_max - r_min) * 100)),
    r_min = min(peaky) + width - 2, r_max = max(peaky) + 2 (spec 1.4). Mathematically
    r_max - r_min = 4, so there are 400 or 401 right edges, depending on float rounding."""
    r_min = peaky_sorted[0] + width - INTERVAL_BUFFER
    r_max = peaky_sorted[-1] + INTERVAL_BUFFER
    return np.linspace(r_min, r_max, _grid_size(r_max - r_min))


_NUM_LEFT_EDGES = _grid_size(2 * INTERVAL_BUFFER)  # ceil(2 * 2.0 * 100) = 400 per right edge


def _left_edges(right: np.ndarray | float, width: float) -> np.ndarray:
    """Left edges for right edge(s) r: linspace(r - width - 2, r - width + 2, 400) (spec 1.4).

    right: scalar or `[num_right]`; returns `[400]` or `[num_right, 400]`. numpy's linspace with
    array endpoints computes each row with the same float operations as a scalar call (start +
    i * step, last element = stop), so both forms give identical thresholds (tested).
    """
    start = right - width - INTERVAL_BUFFER
    stop = right - width + INTERVAL_BUFFER
    return np.linspace(start, stop, _NUM_LEFT_EDGES, axis=-1)


# --- The reference implementation -----------------------------------------------------------------
def _example_epsilon_reference(unlearned_col: np.ndarray, retrained_col: np.ndarray) -> float:
    """Official epsilon of one forget example, spec 1.2-1.5 read literally.

    unlearned_col `[num_unlearned]`, retrained_col `[num_retrained]`: the example's confidences.
    """
    u_sorted = np.sort(unlearned_col)
    r_sorted = np.sort(retrained_col)
    pos, neg = _ordered_banks(
        u_sorted, r_sorted, np.median(unlearned_col), np.median(retrained_col)
    )
    decided = _degenerate_epsilon(pos, neg)
    if decided is not None:
        return decided

    true_pos, false_pos = _single_threshold_counts(pos, neg)
    best = _rule_epsilons(true_pos, false_pos, pos.size, neg.size).max()
    best = max(best, _interval_family_best_reference(*_interval_banks(pos, neg)))
    return float(min(best, np.float32(EPSILON_CAP)))


def _interval_family_best_reference(
    peaky: np.ndarray, other: np.ndarray, width: float
) -> np.float32:
    """Largest epsilon (float32, may be inf) of the interval rules, every rule counted directly.

    peaky `[n_peaky]`: the sorted bank with the smaller range; other `[n_other]`: the other bank,
    sorted; width: range of peaky. All ~160,000 rules at once: the `[M, 400]` left edges (the very
    floats of a per-right-edge linspace, see `_left_edges`) and one searchsorted per bank.
    """
    right = _right_edges(peaky, width)  # [M]
    left = _left_edges(right, width)  # [M, 400]
    # count(l <= c <= r) = count(c <= r) - count(c < l); an empty interval (l > r) flags none
    tp = np.searchsorted(peaky, right, side="right")[:, None]
    tp = tp - np.searchsorted(peaky, left, side="left")
    fp = np.searchsorted(other, right, side="right")[:, None]
    fp = fp - np.searchsorted(other, left, side="left")
    np.maximum(tp, 0, out=tp)
    np.maximum(fp, 0, out=fp)
    return _rule_epsilons(tp, fp, peaky.size, other.size).max()


def per_example_epsilons_reference(unlearned: np.ndarray, retrained: np.ndarray) -> np.ndarray:
    """Official per-example epsilon, straightforward version (the tests' oracle, bench baseline).

    Args:
        unlearned: `[num_unlearned_models, num_examples]` confidences of the unlearned bank.
        retrained: `[num_retrained_models, num_examples]` confidences of the reference bank.

    Returns:
        float64 `[num_examples]`, identical to `per_example_epsilons`. About 10 ms per example:
        every one of the ~160,000 rules is counted (vectorised over all right edges at once; the
        strongest simple version we know, and the baseline of benchmarks/bench_metrics.py).
    """
    u, r = _check_banks(unlearned, retrained)
    return np.array([_example_epsilon_reference(u[:, s], r[:, s]) for s in range(u.shape[1])])


# --- The fast implementation ----------------------------------------------------------------------
# Why it is fast (same answer as the reference, bit for bit; tests check it on adversarial data).
# 1. A rule's epsilon depends only on its two counts (tp, fp): it is a lookup in a float32 table
#    built once per bank size with the reference's own formula (`_epsilon_table`).
# 2. The ~160,000 interval rules of an example are [L(j, i), R_j] with
#      R_j    = r_min + j * D / (M - 1),           j < M (M = 400 or 401 right edges, D = 4),
#      L(j,i) = R_j - width - 2 + i * 4 / 399,     i < 400 left edges per right edge,
#    so in exact arithmetic every left edge sits on one integer lattice:
#      L(j, i) = base + m * unit,   m = row_step * j + col_step * i,   base = r_min - width - 2,
#    row_step = 399 / g, col_step = (M - 1) / g, unit = 4 g / (399 (M - 1)), g = gcd(399, M - 1):
#    for M = 400, m = i + j (799 lattice points); for M = 401, m = 399 j + 400 i (319,201 points).
# 3. Counts change only where a threshold crosses a data point: the count below a left edge is a
#    step function of m with at most 2N + 1 runs, and the count up to R_j a step function of j.
#    A (run of rows, run of lattice points) pair is one (tp, fp) for all its rules, so we evaluate
#    each pair that some rule reaches once: typically a few hundred to a few thousand pairs instead
#    of 160,000 rules. (With data denser than the grid around every threshold the pairs approach
#    160,000 for M = 400 and can pass it for M = 401; there we read every rule off the lattice.)
# 4. The float thresholds differ from the ideal lattice by rounding (~1e-15 relative). A data point
#    within 1e-12 (relative) of a lattice point could lie on either side of the float threshold, so
#    the rules on that lattice point are recomputed from their float thresholds with searchsorted,
#    as the reference does. This always happens at least once: min(peaky) = base + 4, which is the
#    lattice point of the rules with i + j = 399 (M = 400) or of (0, 399) and (400, 0) (M = 401);
#    data on a 0.1 grid add a few more.
# A float threshold is ~15 roundings of numbers <= scale away from its lattice point, so within
# ~3.3e-15 * scale of it; this tolerance is 300 times that, and far below a lattice step (2.5e-5).
_LATTICE_RELATIVE_TOLERANCE = 1e-12
_LATTICE_MAX_SCALE = 1e4  # beyond this magnitude of confidences, use the exact searchsorted path
# Above this many candidate (row run, lattice run) pairs, evaluate all rules on the lattice instead
# (M = 401 only: its pairs need a reachability test and can number 400 x 2N; measured crossover).
_DENSE_FALLBACK_PAIRS = 50_000
_MASKED = np.int64(1) << 40  # a count no rule reaches: masked pairs get index <= 0, i.e. epsilon 0


def _left_edge_values(right: np.ndarray, width: float, cols: np.ndarray) -> np.ndarray:
    """Element cols[k] of `_left_edges(right[k], width)`, without building the 400-point rows.

    right, cols `[K]`. numpy's linspace(start, stop, n) is start + i * ((stop - start) / (n - 1)),
    with the last element set to stop; this repeats those float operations elementwise, so the
    values are bit-identical to the reference's (tested against np.linspace).
    """
    start = right - width - INTERVAL_BUFFER
    stop = right - width + INTERVAL_BUFFER
    step = (stop - start) / (_NUM_LEFT_EDGES - 1)
    inner = cols.astype(np.float64) * step + start
    return np.where(cols == _NUM_LEFT_EDGES - 1, stop, inner)


def _exact_rule_index(
    peaky: np.ndarray,
    other: np.ndarray,
    width: float,
    right: np.ndarray,
    right_counts: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
) -> np.ndarray:
    """Flat count index of chosen interval rules, from their float thresholds (as the reference).

    peaky `[n_peaky]`, other `[n_other]`: sorted banks; right `[M]`: the right edges;
    right_counts `[M]`: count(peaky <= R_j) * (n_other + 1) + count(other <= R_j);
    rows, cols `[K]`: the rules (j, i). Returns int64 `[K]`, tp * (n_other + 1) + fp, or 0 for an
    empty interval (l > r), whose epsilon is 0 like that of the rule tp = fp = 0.
    """
    left = _left_edge_values(right[rows], width, cols)  # the very floats the reference uses
    below = np.searchsorted(peaky, left, side="left") * (other.size + 1)
    below += np.searchsorted(other, left, side="left")
    return np.maximum(right_counts[rows] - below, 0)


def _ceil_div(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """Integer ceil(numerator / denominator) for any sign of the numerator."""
    return -(-numerator // denominator)


class _LeftCountRuns(NamedTuple):
    """The count of data below every left edge of one example, as runs on the lattice (step 3).

    Rule (j, i) sits at lattice index m = row_step * j + col_step * i, 0 <= m <= last. Run r covers
    lattice indices run_start[r]..run_end[r]; on it the flat count (count(peaky < L) * stride +
    count(other < L)) is run_below[r], except that the lattice points in `masked` (where a data
    point sits, step 4) are runs of their own with run_below = _MASKED.
    """

    row_step: int
    col_step: int
    last: int
    run_start: np.ndarray  # int64 [num_runs], increasing, run_start[0] = 0
    run_end: np.ndarray  # int64 [num_runs]
    run_below: np.ndarray  # int64 [num_runs]
    masked: np.ndarray  # int64 [num_masked]


def _left_count_runs(
    peaky: np.ndarray, other: np.ndarray, width: float, right: np.ndarray
) -> _LeftCountRuns | None:
    """Runs of the count below the left edges of one example, or None where the lattice does not
    apply (then every rule is evaluated from its float thresholds).

    peaky `[n_peaky]`, other `[n_other]`: sorted banks; width: range of peaky; right `[M]`: the
    right edges.
    """
    num_right = right.size
    scale = max(abs(peaky[0]), abs(peaky[-1]), abs(other[0]), abs(other[-1])) + 2 * INTERVAL_BUFFER
    if num_right not in (400, 401) or scale > _LATTICE_MAX_SCALE:
        return None  # cannot happen for confidences, which lie in [-104, 104]
    g = math.gcd(_NUM_LEFT_EDGES - 1, num_right - 1)
    row_step = (_NUM_LEFT_EDGES - 1) // g
    col_step = (num_right - 1) // g
    unit = 2 * INTERVAL_BUFFER * g / ((_NUM_LEFT_EDGES - 1) * (num_right - 1))
    last = row_step * (num_right - 1) + col_step * (_NUM_LEFT_EDGES - 1)  # largest lattice index
    base = right[0] - width - INTERVAL_BUFFER  # the float L(0, 0): lattice index 0

    # Lattice position of every data point: x < L(m) exactly when m >= first_above(x), except on
    # the lattice points where a data point sits ("masked"), which are recomputed exactly.
    data = np.concatenate([peaky, other])
    position = (data - base) / unit
    nearest = np.rint(position)
    on_lattice = np.abs(position - nearest) < _LATTICE_RELATIVE_TOLERANCE * scale / unit
    first_above = np.where(on_lattice, nearest, np.floor(position)) + 1
    np.clip(first_above, 0, last + 1, out=first_above)
    weight = np.ones(data.size, dtype=np.int64)  # in the flat index a peaky point counts stride
    weight[: peaky.size] = other.size + 1
    order = np.argsort(first_above, kind="stable")
    steps = first_above[order].astype(np.int64)
    cumulative = np.zeros(data.size + 1, dtype=np.int64)
    np.cumsum(weight[order], out=cumulative[1:])
    masked = np.unique(nearest[on_lattice & (nearest >= 0) & (nearest <= last)]).astype(np.int64)

    run_start = np.unique(np.concatenate(([0], steps, masked, masked + 1)))
    run_start = run_start[run_start <= last]
    run_end = np.append(run_start[1:] - 1, last)
    run_below = cumulative[np.searchsorted(steps, run_start, side="right")]
    run_below[np.searchsorted(run_start, masked)] = _MASKED  # each masked point starts a run
    return _LeftCountRuns(row_step, col_step, last, run_start, run_end, run_below, masked)


def _interval_family_best(peaky: np.ndarray, other: np.ndarray, width: float) -> np.float32:
    """Largest epsilon (float32, may be inf) of the interval rules of one example (spec 1.4-1.5).

    peaky `[n_peaky]`: the sorted bank with the smaller range (flagged positive inside [l, r]);
    other `[n_other]`: the other bank, sorted; width: range of peaky. See the comment above.
    """
    stride = other.size + 1  # rule (tp, fp) <-> flat index tp * stride + fp in the epsilon table
    table = _epsilon_table(peaky.size, other.size)
    right = _right_edges(peaky, width)
    num_right = right.size
    # Flat count index of [-inf, R_j]; a rule's index is this minus that of [-inf, L(j, i)).
    right_counts = np.searchsorted(peaky, right, side="right") * stride
    right_counts += np.searchsorted(other, right, side="right")

    runs = _left_count_runs(peaky, other, width, right)
    if runs is None:
        rows, cols = np.divmod(np.arange(num_right * _NUM_LEFT_EDGES), _NUM_LEFT_EDGES)
        index = _exact_rule_index(peaky, other, width, right, right_counts, rows, cols)
        return table.take(index).max()
    row_step, col_step = runs.row_step, runs.col_step

    # Runs of right edges on which the count up to R_j is constant.
    changes = np.flatnonzero(np.diff(right_counts)) + 1
    row_start = np.concatenate(([0], changes))
    row_end = np.append(changes - 1, num_right - 1)

    # Rows j0..j1 reach lattice points from row_step * j0 to row_step * j1 + col_step * 399: pair
    # them with every lattice run overlapping that range.
    first_run = np.searchsorted(runs.run_start, row_step * row_start, side="right") - 1
    last_reach = row_step * row_end + col_step * (_NUM_LEFT_EDGES - 1)
    last_run = np.searchsorted(runs.run_start, last_reach, side="right") - 1
    num_pairs = last_run - first_run + 1
    total_pairs = int(num_pairs.sum())
    if col_step != 1 and total_pairs > _DENSE_FALLBACK_PAIRS:
        # Data denser than the lattice around every threshold (M = 401 only): the candidate
        # pairs outnumber the rules, so evaluate every rule on the lattice instead.
        below = np.repeat(runs.run_below, runs.run_end - runs.run_start + 1)  # [last + 1]
        rule_below = np.lib.stride_tricks.as_strided(
            below,
            shape=(num_right, _NUM_LEFT_EDGES),
            strides=(row_step * below.itemsize, col_step * below.itemsize),
        )  # rule (j, i) -> below[row_step * j + col_step * i], a view within bounds by `last`
        index = right_counts[:, None] - rule_below
    else:
        pair_row = np.repeat(np.arange(row_start.size), num_pairs)
        first_of_row = np.repeat(first_run - np.cumsum(num_pairs) + num_pairs, num_pairs)
        pair_run = np.arange(total_pairs) + first_of_row
        index = right_counts[row_start[pair_row]] - runs.run_below[pair_run]
        if col_step != 1:
            # M = 401: m = 399 j + 400 i = 400 k - j with k = i + j, so rows j0..j1 reach, for
            # each k in [j0, j1 + 399], the block [400 k - min(j1, k), 400 k - max(j0, k - 399)];
            # both block ends increase with k. The run [lo, hi] is reached iff the first block
            # ending at or after lo starts at or before hi. (M = 400: m = i + j, every
            # overlapping run is reached.)
            j0, j1 = row_start[pair_row], row_end[pair_row]
            lo, hi = runs.run_start[pair_run], runs.run_end[pair_run]
            k_early = np.maximum(j0, _ceil_div(lo + j0, col_step))  # blocks ending at 400k - j0
            k_late = np.maximum(j0 + col_step, _ceil_div(lo - row_step, row_step))  # 399k + 399
            k = np.where(k_early <= j0 + _NUM_LEFT_EDGES - 1, k_early, k_late)
            reached = (k <= j1 + _NUM_LEFT_EDGES - 1) & (col_step * k - np.minimum(j1, k) <= hi)
            index[~reached] = 0
    np.maximum(index, 0, out=index)  # empty intervals and masked runs -> entry 0, epsilon 0
    best = table.take(index).max()

    if runs.masked.size:
        # The rules on a lattice point where a data point sits: recompute them exactly.
        offset = runs.masked[:, None] - row_step * np.arange(num_right)[None, :]
        hit = (offset >= 0) & (offset % col_step == 0) & (offset // col_step < _NUM_LEFT_EDGES)
        which, rows = np.nonzero(hit)
        cols = offset[which, rows] // col_step
        exact = _exact_rule_index(peaky, other, width, right, right_counts, rows, cols)
        best = max(best, table.take(exact).max())
    return best


def _example_epsilon_fast(
    u_sorted: np.ndarray, r_sorted: np.ndarray, median_u: float, median_r: float
) -> float:
    """Official epsilon of one example from its sorted banks `[num_unlearned]`, `[num_retrained]`
    and their medians; equal to `_example_epsilon_reference`."""
    pos, neg = _ordered_banks(u_sorted, r_sorted, median_u, median_r)
    decided = _degenerate_epsilon(pos, neg)
    if decided is not None:
        return decided
    true_pos, false_pos = _single_threshold_counts(pos, neg)
    best = _epsilon_table(pos.size, neg.size)[true_pos * (neg.size + 1) + false_pos].max()
    best = max(best, _interval_family_best(*_interval_banks(pos, neg)))
    return float(min(best, np.float32(EPSILON_CAP)))


# --- The batched implementation -------------------------------------------------------------------
# The same epsilons as `_example_epsilon_fast`, for many columns at once: the examples of F, every
# split of the ceiling, every resample of the bootstrap interval. The per-example path spends most
# of its ~0.2 ms on ~200 small numpy calls; here every step is one numpy operation over a chunk of
# columns (both banks of n models each). Each column's ragged sets (threshold breakpoints, runs of
# constant counts, (row run, lattice run) pairs) become flat arrays ordered by column, and integer
# positions are offset by column * _KEY_STRIDE so that one searchsorted serves every column.
# Float thresholds are never approximated: a data point's position in a grid is estimated, then
# corrected against the grid's own floats (`_grid_positions`), and the interval family uses the
# lattice argument of the comment above `_left_edge_values`, with its masked points settled from
# the float left edges, exactly as there.
# Fewer pairs than the per-example path (about 3x fewer on bootstrap resamples): a pair's rule
# has tp = tpR - tpB and fp = fpR - fpB (counts up to the right edges minus counts below the left
# ones), and within the region where no rule is discarded (fp >= 1, tp <= n - 1) the epsilon
# table never falls as tp grows or rises as fp grows (`_table_monotone`, checked on the float32
# table; if it failed, nothing below would be skipped). So a pair is left out when an evaluated
# pair dominates it:
# - lattice runs past the last one with fp >= 1 ("fp_last"): the next one has fp <= 0, an empty
#   interval or a discarded rule, except perfect separation (tp = n, fp = 0), which can only be
#   the run right after fp_last (tp falls along the runs); it is evaluated, later runs are not;
# - M = 400 only (every run of a row run's window is reached): a lattice run whose next run adds
#   no peaky point (same tp, fewer fp, still >= 1 up to fp_last) unless the next run is masked;
# - M = 400 only: when the next row run adds peaky points only (same fp, more tp), it reaches
#   every lattice run from its own first one on and dominates this row run there, except where
#   its tp would reach n (discarded): `row_limit`.
# Chains of such steps end at an evaluated pair with an epsilon at least as large, so the
# maximum is unchanged (tested against the reference on resampled and rounded banks).
_BATCH_VALUES = 1 << 14  # columns per chunk x models per bank: the per-column arrays are
# [chunk, ~6n] int64, a few MiB each
_BATCH_PAIRS = 1 << 21  # (row run, lattice run) pairs evaluated at once: bounds memory (~100 MiB)
_KEY_STRIDE = np.int64(1) << 20  # > any lattice index + 2 (319,202) and any grid size used here


def _grid_positions(
    x: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    size: np.ndarray,
    *,
    side_right: bool,
) -> np.ndarray:
    """`np.searchsorted(np.linspace(start[k], stop[k], size[k]), x[k], side)` for every row k.

    x `[K, d]` float64; start, stop `[K]` float64; size `[K]` int64 >= 1. numpy's linspace puts
    element i at i * step + start with step = (stop - start) / (size - 1), and the last one at stop
    (a 1-point grid is [start]); those floats are what the values are compared with. Returns int64
    `[K, d]`: how many grid elements are < x (side left) or <= x (side right). A float estimate,
    corrected one step at a time against the grid's floats (the estimate is off by at most ~1).
    """
    start, stop, size = start[:, None], stop[:, None], size[:, None]
    step = (stop - start) / np.maximum(size - 1, 1)

    def element(i: np.ndarray) -> np.ndarray:
        value = i.astype(np.float64) * step + start
        return np.where((i == size - 1) & (size > 1), stop, value)

    def counted(value: np.ndarray) -> np.ndarray:
        return value <= x if side_right else value < x

    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.where(size > 1, np.floor((x - start) / step) + 1, 1.0)
    position = np.clip(estimate, 0, size).astype(np.int64)
    for _ in range(64):  # a grid is non-decreasing: the correct count is a fixed point
        grow = (position < size) & counted(element(np.minimum(position, size - 1)))
        shrink = (position > 0) & ~counted(element(np.maximum(position - 1, 0)))
        if not (grow.any() or shrink.any()):
            return position
        position += grow
        position -= shrink
    raise RuntimeError("grid positions did not settle")  # cannot happen for a monotone grid


def _row_segment_max(values: np.ndarray, column: np.ndarray, best: np.ndarray) -> None:
    """best[c] = max(best[c], max of the values of column c); column `[P]` sorted, values `[P]`."""
    if column.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    cols = column[starts]
    best[cols] = np.maximum(best[cols], np.maximum.reduceat(values, starts))


def _single_family_best_batched(pos: np.ndarray, neg: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Largest single-threshold epsilon (float32) per row of pos, neg `[K, n]` (sorted rows).

    Rule i flags c >= t_i, so its counts are (#{pos: h(pos) > i}, #{neg: h(neg) > i}) with
    h(c) = #{thresholds <= c}; they change only where i passes some h(c), so every distinct rule
    is the one at i = h(c) for some data point c (i = 0, everything flagged, has epsilon 0).
    """
    num_cols, n = pos.shape
    lo = np.minimum(pos[:, 0], neg[:, 0])
    hi = np.maximum(pos[:, -1], neg[:, -1])
    size = np.ceil((hi - lo) * THRESHOLDS_PER_UNIT).astype(np.int64)  # as `_grid_size`
    data = np.concatenate([pos, neg], axis=1)
    h = _grid_positions(data, lo, hi, size, side_right=True)
    key = h * 2
    key[:, :n] += 1  # low bit: the data point is positive
    key.sort(axis=1)
    h_sorted = key >> 1
    below_pos = np.cumsum(key & 1, axis=1)  # positives with h <= h_sorted[t]: the last of a tie
    below_neg = np.arange(1, 2 * n + 1) - below_pos  # group is the count at i = h_sorted[t]
    index = (n - below_pos) * (n + 1) + (n - below_neg)
    valid = h_sorted < size[:, None]  # i = h must be a threshold
    valid[:, :-1] &= h_sorted[:, :-1] != h_sorted[:, 1:]
    index[~valid] = 0  # tp = fp = 0: epsilon 0
    return table.take(index).max(axis=1)


def _interval_family_best_batched(
    peaky: np.ndarray, other: np.ndarray, width: np.ndarray, table: np.ndarray, floor: np.ndarray
) -> np.ndarray:
    """max(floor, largest interval-rule epsilon) per row, float32: `_interval_family_best` on
    each row of peaky, other `[K, n]` (sorted rows) and width `[K]`, batched (see the comment
    above). floor `[K]` float32 (the single-threshold family's best) lets rules that cannot beat
    it go unevaluated."""
    num_cols, n = peaky.shape
    stride = n + 1
    best = floor.astype(np.float32)  # a copy
    r_min = peaky[:, 0] + width - INTERVAL_BUFFER
    r_max = peaky[:, -1] + INTERVAL_BUFFER
    num_right = np.ceil((r_max - r_min) * THRESHOLDS_PER_UNIT).astype(np.int64)
    scale = np.maximum(
        np.maximum(np.abs(peaky[:, 0]), np.abs(peaky[:, -1])),
        np.maximum(np.abs(other[:, 0]), np.abs(other[:, -1])),
    ) + 2 * INTERVAL_BUFFER
    lattice = ((num_right == 400) | (num_right == 401)) & (scale <= _LATTICE_MAX_SCALE)
    # Lattice constants (see `_left_count_runs`): M = 400 -> m = j + i; M = 401 -> 399 j + 400 i.
    is401 = num_right == 401
    row_step = np.where(is401, 399, 1)
    col_step = np.where(is401, 400, 1)
    unit = np.where(
        is401,
        2 * INTERVAL_BUFFER * 1 / ((_NUM_LEFT_EDGES - 1) * (401 - 1)),
        2 * INTERVAL_BUFFER * 399 / ((_NUM_LEFT_EDGES - 1) * (400 - 1)),
    )
    last = row_step * (num_right - 1) + col_step * (_NUM_LEFT_EDGES - 1)
    base = r_min - width - INTERVAL_BUFFER  # right edge 0 is r_min itself
    col_key = np.arange(num_cols, dtype=np.int64) * _KEY_STRIDE

    # Counts up to every right edge: data x is <= R_j iff j >= a(x) = #{right edges < x}.
    right_size = np.where(lattice, num_right, 2)  # (off-lattice rows are dropped below)
    data = np.concatenate([peaky, other], axis=1)  # [K, 2n]
    weight = np.ones((1, 2 * n), dtype=np.int64)
    weight[0, :n] = stride  # a peaky point counts `stride` in the flat (tp, fp) index
    a = _grid_positions(data, r_min, r_max, right_size, side_right=False)
    slot = np.arange(num_cols)[:, None] * 402 + np.minimum(a, 401)
    hist = np.bincount(
        slot.ravel(), weights=np.broadcast_to(weight, a.shape).ravel(), minlength=num_cols * 402
    )
    right_counts = np.cumsum(hist.reshape(num_cols, 402).astype(np.int64), axis=1)[:, :401]

    # Runs of right edges with one count (rows j0..j1), flat, ordered by column.
    new_run = np.ones((num_cols, 401), dtype=bool)
    new_run[:, 1:] = right_counts[:, 1:] != right_counts[:, :-1]
    new_run &= np.arange(401)[None, :] < num_right[:, None]
    new_run &= lattice[:, None]
    row_col, row_j0 = np.nonzero(new_run)
    row_j1 = np.empty_like(row_j0)
    same = row_col[1:] == row_col[:-1]
    row_j1[:-1] = np.where(same, row_j0[1:] - 1, num_right[row_col[:-1]] - 1)
    if row_j1.size:
        row_j1[-1] = num_right[row_col[-1]] - 1
    row_count = right_counts[row_col, row_j0]

    # Lattice position of every data point (as `_left_count_runs`, row by row).
    position = (data - base[:, None]) / unit[:, None]
    nearest = np.rint(position)
    on_lattice = np.abs(position - nearest) < (_LATTICE_RELATIVE_TOLERANCE * scale / unit)[:, None]
    first_above = np.where(on_lattice, nearest, np.floor(position)) + 1
    np.clip(first_above, 0, (last + 1)[:, None], out=first_above)
    first_above = first_above.astype(np.int64)
    is_masked = on_lattice & (nearest >= 0) & (nearest <= last[:, None]) & lattice[:, None]
    masked_at = np.where(is_masked, nearest, 0).astype(np.int64)

    # Count below each lattice index m: data with first_above <= m, summed with their weights.
    fa_key = first_above * 2
    fa_key[:, :n] += 1
    fa_key.sort(axis=1)
    fa_sorted = fa_key >> 1
    fa_cum = np.zeros((num_cols, 2 * n + 1), dtype=np.int64)
    np.cumsum(np.where(fa_key & 1, stride, 1), axis=1, out=fa_cum[:, 1:])
    fa_flat = (fa_sorted + col_key[:, None]).ravel()

    def count_below(col: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Flat count of the data with first_above <= m in column col (`[P]` each)."""
        found = np.searchsorted(fa_flat, col_key[col] + m, side="right") - col * (2 * n)
        return fa_cum[col, found]

    # Lattice runs: start at 0, at every first_above, and around every masked point (few per
    # column: their own narrow block of columns, padded with `never`).
    never = np.int64(1) << 40
    num_masked = is_masked.sum(axis=1)
    masked_block = np.full((num_cols, int(num_masked.max(initial=0))), never)
    masked_block[np.nonzero(np.arange(masked_block.shape[1])[None, :] < num_masked[:, None])] = (
        masked_at[is_masked]
    )  # row-major order on both sides: each column's masked points, left-aligned
    starts = np.concatenate(
        [
            np.zeros((num_cols, 1), dtype=np.int64),
            first_above,
            masked_block,
            np.where(masked_block == never, never, masked_block + 1),
        ],
        axis=1,
    )
    starts.sort(axis=1)
    keep = starts <= last[:, None]
    keep[:, 1:] &= starts[:, 1:] != starts[:, :-1]
    keep &= lattice[:, None]
    run_col, slot = np.nonzero(keep)
    run_start = starts[run_col, slot]
    run_key = col_key[run_col] + run_start
    run_end = np.empty_like(run_start)
    same = run_col[1:] == run_col[:-1]
    run_end[:-1] = np.where(same, run_start[1:] - 1, last[run_col[:-1]])
    if run_end.size:
        run_end[-1] = last[run_col[-1]]
    run_below = count_below(run_col, run_start)  # data below each run (sitting data excluded)
    masked_run = np.zeros(run_key.size, dtype=bool)
    masked_key = np.empty(0, dtype=np.int64)
    if is_masked.any():
        masked_key = np.unique((col_key[:, None] + masked_at)[is_masked])
        masked_run = np.isin(run_key, masked_key)  # settled from the floats below

    # (row run, lattice run) pairs: rows j0..j1 reach lattice indices row_step * j0 up to
    # row_step * j1 + col_step * 399, i.e. the lattice runs first_run..last_run.
    rstep_row = row_step[row_col]
    cstep_row = col_step[row_col]
    first_run = np.searchsorted(run_key, col_key[row_col] + rstep_row * row_j0, side="right") - 1
    reach = rstep_row * row_j1 + cstep_row * (_NUM_LEFT_EDGES - 1)
    last_run = np.searchsorted(run_key, col_key[row_col] + reach, side="right") - 1
    # Which of those pairs can matter (see the comment above `_BATCH_VALUES`):
    # the lattice runs are in increasing order of data below, so the others inside a rule,
    # fp = fpR - fpB, fall as the run advances. `fp_last` is the last run with fp >= 1; the run
    # after it has fp <= 0: 0 (an empty interval, or a discarded rule) except for perfect
    # separation, and every later run is 0. Runs past fp_last + 1 are never evaluated.
    run_fp = run_below % stride  # others below the run (non-decreasing within a column)
    fp_key = run_col * (stride + 1) + run_fp
    row_fp = row_count % stride
    fp_last = np.searchsorted(fp_key, row_col * (stride + 1) + row_fp - 1, side="right") - 1
    last_run = np.minimum(last_run, fp_last + 1)
    num_pairs = np.maximum(last_run - first_run + 1, 0)
    # M = 400: when the next row run adds peaky points only (same fp, more tp), it reaches every
    # lattice run from its own first_run on, and dominates this row there as long as its tp
    # stays <= n - 1; this row then only needs the runs before that point (`row_limit`).
    row_limit = np.full(row_col.size, np.iinfo(np.int64).max)
    if _table_monotone(n) and row_col.size > 1:
        next_peaky_only = (row_col[1:] == row_col[:-1]) & (row_fp[1:] == row_fp[:-1])
        tp_key = run_col * (stride + 1) + run_below // stride
        next_tp = row_count[1:] // stride
        # runs whose tp below leaves the next row n tp or more: that row would be discarded there
        prefix_end = np.searchsorted(tp_key, row_col[:-1] * (stride + 1) + next_tp - n,
                                     side="right") - 1
        row_limit[:-1] = np.where(
            next_peaky_only, np.maximum(first_run[1:] - 1, prefix_end), row_limit[:-1]
        )
    # Columns whose pairs would outnumber their rules (dense data, M = 401): per-example path.
    per_col_pairs = np.bincount(row_col, weights=num_pairs, minlength=num_cols)
    dense = is401 & (per_col_pairs > _DENSE_FALLBACK_PAIRS)
    keep_rows = (num_pairs > 0) & ~dense[row_col]
    row_col, row_j0, row_j1 = row_col[keep_rows], row_j0[keep_rows], row_j1[keep_rows]
    row_count, first_run, last_run, fp_last, row_limit = (
        row_count[keep_rows], first_run[keep_rows], last_run[keep_rows], fp_last[keep_rows],
        row_limit[keep_rows],
    )
    # M = 400 (every run of first_run..last_run reached): of the runs up to fp_last, only those
    # whose next run adds a peaky point (or is masked, or is the column's last) can hold a
    # row's best; the others are dominated by the next run (same tp, fewer fp, still >= 1).
    # Then fp_last itself and fp_last + 1 (the perfect-separation candidate) are added.
    not_last = np.r_[run_col[1:] == run_col[:-1], False]
    adds_peaky = np.ones(run_key.size, dtype=bool)
    if _table_monotone(n):
        adds_peaky[:-1] = (run_below[1:] // stride != run_below[:-1] // stride) | masked_run[1:]
    candidate = np.flatnonzero(~masked_run & (adds_peaky | ~not_last))
    # int32 from here where the flat counts allow it; masked runs far below 0
    small = np.int32 if stride * stride < 1 << 29 else np.int64
    below_small = np.where(masked_run, 1 << 30, run_below).astype(small)
    for wide in (False, True):  # M = 400 columns, then M = 401 ones (reachability test)
        keep_rows = np.flatnonzero(is401[row_col] == wide)
        if keep_rows.size == 0:
            continue
        cols_w, j0_w, j1_w = row_col[keep_rows], row_j0[keep_rows], row_j1[keep_rows]
        count_w = row_count[keep_rows].astype(small)
        first_w, last_w = first_run[keep_rows], last_run[keep_rows]
        if wide:
            below_w = below_small  # every run of first_run..last_run, then the reachability test
            pairs_w = last_w - first_w + 1
        else:
            below_w = below_small[candidate]  # positions below index the candidate runs
            limit_w = row_limit[keep_rows]
            top = np.minimum(last_w, fp_last[keep_rows])
            extra = np.stack([top, fp_last[keep_rows] + 1], axis=1)  # [rows, 2]
            extra_ok = (extra >= first_w[:, None]) & (extra <= last_w[:, None])
            extra_ok &= extra <= limit_w[:, None]
            top = np.minimum(top, limit_w)
            index = count_w[:, None] - below_small[np.where(extra_ok, extra, 0)]
            index[~extra_ok] = 0
            np.maximum(index, 0, out=index)
            _row_segment_max(table.take(index).max(axis=1), cols_w, best)
            first_in_pool = np.searchsorted(candidate, first_w, side="left")
            pairs_w = np.searchsorted(candidate, top, side="right") - first_in_pool
            first_w = first_in_pool
            keep_rows = pairs_w > 0
            cols_w, count_w, first_w, pairs_w = (
                cols_w[keep_rows], count_w[keep_rows], first_w[keep_rows], pairs_w[keep_rows]
            )
            if pairs_w.size == 0:
                continue
        position_type = np.int32 if below_w.size < 1 << 31 else np.int64
        first_w = first_w.astype(position_type)
        cumulative = np.cumsum(pairs_w)
        splits = np.searchsorted(cumulative, np.arange(_BATCH_PAIRS, cumulative[-1], _BATCH_PAIRS))
        edges = np.unique(np.r_[0, splits, pairs_w.size])
        for lo_row, hi_row in zip(edges[:-1], edges[1:]):
            rows = slice(lo_row, hi_row)
            counts = pairs_w[rows]
            ends = np.cumsum(counts)
            offsets = np.repeat(first_w[rows] - (ends - counts).astype(position_type), counts)
            pair_run = np.arange(ends[-1], dtype=position_type)
            pair_run += offsets
            index = np.repeat(count_w[rows], counts)
            index -= below_w[pair_run]
            if wide:  # is the lattice run reached by some rule of the row run?
                j0 = np.repeat(j0_w[rows], counts)
                j1 = np.repeat(j1_w[rows], counts)
                lo_m, hi_m = run_start[pair_run], run_end[pair_run]
                k_early = np.maximum(j0, _ceil_div(lo_m + j0, 400))
                k_late = np.maximum(j0 + 400, _ceil_div(lo_m - 399, 399))
                k = np.where(k_early <= j0 + _NUM_LEFT_EDGES - 1, k_early, k_late)
                reached = (k <= j1 + _NUM_LEFT_EDGES - 1) & (400 * k - np.minimum(j1, k) <= hi_m)
                index[~reached] = 0
            np.maximum(index, 0, out=index)  # empty intervals and masked runs -> epsilon 0
            values = table.take(index)
            # a column's pairs are contiguous: one reduceat over each column's segment
            col_rows = cols_w[rows]
            first_row = np.flatnonzero(np.r_[True, col_rows[1:] != col_rows[:-1]])
            cols = col_rows[first_row]
            segment_max = np.maximum.reduceat(values, (ends - counts)[first_row])
            best[cols] = np.maximum(best[cols], segment_max)

    if masked_key.size:
        # Rules on a lattice point where data sit: count from the float left edges. Data not on
        # that point lie clearly on one side of them (count_below); the ones on it are compared
        # with each rule's float left edge, as the per-example path does with searchsorted.
        m_col = masked_key // _KEY_STRIDE
        m_at = masked_key - col_key[m_col]
        m_below = count_below(m_col, m_at)
        # The data sitting on each masked point, `[P, G]` (G = the most on one point; padding
        # has weight 0), ordered by point like masked_key.
        on_key = (col_key[:, None] + masked_at)[is_masked]
        on_x = data[is_masked]
        on_w = np.broadcast_to(weight, data.shape)[is_masked]
        # Ties (a resampled model is repeated) sit together: merge equal values, summing weights.
        order = np.lexsort((on_x, on_key))
        on_key, on_x, on_w = on_key[order], on_x[order], on_w[order]
        distinct = np.r_[True, (on_key[1:] != on_key[:-1]) | (on_x[1:] != on_x[:-1])]
        group_id = np.cumsum(distinct) - 1
        on_w = np.bincount(group_id, weights=on_w).astype(np.int64)
        on_key, on_x = on_key[distinct], on_x[distinct]
        group_start = np.searchsorted(on_key, masked_key, side="left")
        group_size = np.diff(np.r_[group_start, on_key.size])
        member = np.arange(on_key.size) - np.repeat(group_start, group_size)
        point = np.repeat(np.arange(masked_key.size), group_size)
        sitting_x = np.zeros((masked_key.size, int(member.max()) + 1))
        sitting_w = np.zeros(sitting_x.shape, dtype=np.int64)  # padding weighs nothing
        sitting_x[point, member] = on_x
        sitting_w[point, member] = on_w
        # The rules (j, i) with row_step * j + col_step * i = m, as [P, W] with a validity mask.
        # M = 400: j + i = m, j = max(0, m - 399) .. min(399, m). M = 401: 399 j = m (mod 400),
        # so j = -m mod 400 or that + 400, and i = (m - 399 j) / 400 must lie in [0, 400).
        for wide in (False, True):
            sel = np.flatnonzero(is401[m_col] == wide)
            if sel.size == 0:
                continue
            col, m = m_col[sel], m_at[sel, None]
            if wide:
                rule_j = (-m) % 400 + 400 * np.arange(2)[None, :]
                rest = m - 399 * rule_j
                rule_i = rest // 400
                valid = (rule_j <= 400) & (rest >= 0) & (rest % 400 == 0) & (rule_i < 400)
            else:
                rule_j = np.maximum(0, m - (_NUM_LEFT_EDGES - 1)) + np.arange(400)[None, :]
                rule_i = m - rule_j
                valid = (rule_j <= np.minimum(399, m)) & (rule_i >= 0)
            rule_j = np.where(valid, rule_j, 0)
            rule_i = np.where(valid, rule_i, 0)
            right = _grid_element(
                rule_j, r_min[col, None], r_max[col, None], num_right[col, None]
            )
            left = _left_edge_values(right, width[col, None], rule_i)
            index = right_counts[col[:, None], rule_j] - m_below[sel, None]
            for g in range(sitting_x.shape[1]):
                index -= sitting_w[sel, g, None] * (sitting_x[sel, g, None] < left)
            np.maximum(index, 0, out=index)
            index[~valid] = 0
            _row_segment_max(table.take(index).max(axis=1), col, best)  # col is sorted

    for c in np.flatnonzero(~lattice | dense):  # per-example path (never for confidences)
        best[c] = max(best[c], _interval_family_best(peaky[c], other[c], float(width[c])))
    return best


@lru_cache(maxsize=16)
def _table_monotone(n: int) -> bool:
    """Whether the epsilon table for two banks of n models is monotone inside the region where
    no rule is discarded (1 <= fp, tp <= n - 1): it never falls as tp grows, never rises as fp
    grows.

    True in exact arithmetic (both epsilon terms rise with TPR and fall with FPR); checked on
    the float32 values themselves, since the batched interval family skips a rule whenever a
    rule that dominates it (no fewer tp, no more fp, still in that region) is evaluated. Where
    this fails, nothing is skipped.
    """
    table = _epsilon_table(n, n).reshape(n + 1, n + 1)[:n, 1:]  # tp 0..n-1, fp 1..n
    return bool(np.all(table[:, :-1] >= table[:, 1:]) and np.all(table[:-1] <= table[1:]))


def _grid_element(
    i: np.ndarray, start: np.ndarray, stop: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Element i of np.linspace(start, stop, size), elementwise (`[P]` each), the same floats."""
    step = (stop - start) / (size - 1)
    return np.where(i == size - 1, stop, i.astype(np.float64) * step + start)


def _epsilons_batched(unlearned_rows: np.ndarray, retrained_rows: np.ndarray) -> np.ndarray:
    """Official epsilon of each row pair: `[K, n]` unlearned and `[K, n]` retrained confidences
    (one row per column of the metric, same n in both banks). float64 `[K]`, equal to
    `_example_epsilon_fast` row by row (tested).

    Chunks of rows are independent; with several CPUs they run on a few threads (numpy releases
    the GIL inside its array operations), which changes no value.
    """
    num_cols, n = unlearned_rows.shape
    out = np.empty(num_cols)
    _epsilon_table(n, n)  # build the table once, before any thread asks for it
    chunk = max(16, _BATCH_VALUES // n)
    starts = range(0, num_cols, chunk)
    shared_with = _SHARED_HELPERS.get()
    if shared_with and len(starts) > 1:  # inside `sharing_work`: helper processes
        # Chunks of equal size (to one column): how long one takes here says how long to wait
        # for a helper's (`helpers.share`).
        edges = np.linspace(0, num_cols, len(starts) + 1).round().astype(int)
        u, r = unlearned_rows, retrained_rows
        parts = helpers.share(
            len(starts),
            lambda k: _epsilons_chunk(u[edges[k] : edges[k + 1]], r[edges[k] : edges[k + 1]]),
            lambda k: (_epsilons_chunk, (u[edges[k] : edges[k + 1]], r[edges[k] : edges[k + 1]])),
            helpers=shared_with,
            in_flight=_IN_FLIGHT,
            grace=_GRACE,
        )
        return np.concatenate(parts)

    def work(lo: int) -> None:
        out[lo : lo + chunk] = _epsilons_chunk(
            unlearned_rows[lo : lo + chunk], retrained_rows[lo : lo + chunk]
        )

    threads = min(_worker_threads(), len(starts))
    if threads <= 1:
        for lo in starts:
            work(lo)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, starts))  # list(): re-raise a worker's exception here
    return out


def _worker_threads() -> int:
    """Threads for `_epsilons_batched`: the CPUs this process may use, at most 4 (the chunks
    are memory-bound beyond that)."""
    return min(helpers.cores(), _MAX_THREADS)


_MAX_THREADS = 4
# Helper processes (`sharing_work`): threads share the GIL between the engine's many small array
# operations (2 threads ran a bootstrap 1.45x faster than 1 here), processes do not (1.9x).
# Helper processes `_epsilons_batched` shares its chunks with, 0: none (per thread and task).
_SHARED_HELPERS: contextvars.ContextVar[int] = contextvars.ContextVar("shared_helpers", default=0)
_IN_FLIGHT = 3  # chunks handed to each helper at once: one to work on, two waiting
_GRACE = 3.0  # wait for a helper's last chunks up to this many times the longest chunk here


@contextlib.contextmanager
def sharing_work(workers: int | None = None) -> Iterator[None]:
    """Within the block, batches of several chunks are shared with `workers - 1` helper
    processes (`helpers.share`; default: one process per core), forked from this one as the
    block starts where that is safe (`helpers.forked`), else loky's, started without waiting so
    that they import numpy while the caller reads its data. The values are the same (each chunk
    is computed alike wherever it runs); only the time changes."""
    count = (workers if workers is not None else helpers.cores()) - 1
    with helpers.forked(count):  # processes forked now where safe (ready at once), else loky's
        if count >= 1:
            try:
                helpers.pool(count).submit(_epsilon_table, 2, 2)  # imports this module there
            except Exception:  # noqa: BLE001 - no helper can start here: threads, as outside
                count = 0
        token = _SHARED_HELPERS.set(max(0, count))
        try:
            yield
        finally:
            _SHARED_HELPERS.reset(token)


def _epsilons_chunk(u: np.ndarray, r: np.ndarray) -> np.ndarray:
    """`_epsilons_batched` on one chunk of rows `[k, n]` each; float64 `[k]`."""
    n = u.shape[1]
    table = _epsilon_table(n, n)
    u, r = np.sort(u, axis=1), np.sort(r, axis=1)
    median_u, median_r = _sorted_median(u), _sorted_median(r)
    swap = (median_r > median_u)[:, None]  # spec 1.2: retrained positive iff strictly higher
    pos, neg = np.where(swap, r, u), np.where(swap, u, r)
    range_pos = pos[:, -1] - pos[:, 0]
    range_neg = neg[:, -1] - neg[:, 0]
    widest = np.maximum(range_pos, range_neg)
    narrowest = np.minimum(range_pos, range_neg)
    with np.errstate(divide="ignore", invalid="ignore"):
        degenerate = (widest == 0.0) | (narrowest / widest < DEGENERATE_SPREAD_RATIO)
    # spec 1.3: degenerate spread -> the cap; both banks constant -> 0 if equal, else the cap
    eps = np.where(widest == 0.0, np.where(pos[:, 0] == neg[:, 0], 0.0, EPSILON_CAP), EPSILON_CAP)
    run = ~degenerate
    if run.any():
        p, q = pos[run], neg[run]
        best = _single_family_best_batched(p, q, table)
        # spec 1.4: the interval family targets the bank with the smaller range (ties: neg)
        flip = (range_pos >= range_neg)[run][:, None]
        peaky, other = np.where(flip, q, p), np.where(flip, p, q)
        best = _interval_family_best_batched(peaky, other, narrowest[run], table, best)
        eps[run] = np.minimum(best, np.float32(EPSILON_CAP)).astype(np.float64)
    return eps


def _sorted_median(rows: np.ndarray) -> np.ndarray:
    """`np.median(rows, axis=1)` of rows already sorted `[k, n]`, the same floats: numpy takes
    the mean of the two middle values for even n (their sum, halved), the middle one for odd."""
    n = rows.shape[1]
    if n % 2:
        return rows[:, n // 2].copy()
    return (rows[:, n // 2 - 1] + rows[:, n // 2]) / 2.0


def per_example_epsilons(unlearned: np.ndarray, retrained: np.ndarray) -> np.ndarray:
    """Official per-example epsilon of the NeurIPS 2023 unlearning challenge (spec 1.2-1.5).

    For each forget example s: the bank with the strictly higher median is "positive"; if the
    smaller range is under 1% of the larger, epsilon = 50 with no attack; otherwise epsilon is the
    largest epsilon of ~1,000 single-threshold rules and ~160,000 interval rules (grids of 100
    thresholds per unit, exactly upstream's), delta = 1e-5, clipped to [0, 50] (perfect separation
    gives 50). Rates and the epsilon formula use float32, as upstream does, so the values match the
    organizers' code bit for bit. Same values as `per_example_epsilons_reference`; banks of equal
    size go through the batched path, others one example at a time.

    Both banks constant (unhandled upstream): equal constants -> 0, different constants -> 50.
    The two banks may hold different numbers of models (rates are per bank).

    Args:
        unlearned: `[num_unlearned_models, num_examples]` confidences of the unlearned models.
        retrained: `[num_retrained_models, num_examples]` confidences of the reference models.

    Returns:
        float64 `[num_examples]`, each value in [0, 50].
    """
    u, r = _check_banks(unlearned, retrained)
    if u.shape[0] == r.shape[0]:
        return _epsilons_batched(np.ascontiguousarray(u.T), np.ascontiguousarray(r.T))
    return _per_example_epsilons_fast(u, r)


def _per_example_epsilons_fast(u: np.ndarray, r: np.ndarray) -> np.ndarray:
    """`per_example_epsilons` one example at a time (banks of any sizes, checked)."""
    # One sort per bank for all examples; rows of the transposes are the examples' sorted columns.
    u_sorted = np.ascontiguousarray(np.sort(u, axis=0).T)
    r_sorted = np.ascontiguousarray(np.sort(r, axis=0).T)
    median_u = np.median(u, axis=0)
    median_r = np.median(r, axis=0)
    return np.array(
        [
            _example_epsilon_fast(u_sorted[s], r_sorted[s], median_u[s], median_r[s])
            for s in range(u.shape[1])
        ]
    )


# --- Per-example score H and forgetting quality F (spec 1.6) --------------------------------------
def example_scores(epsilons: np.ndarray, num_models: int) -> np.ndarray:
    """Per-example score H of spec 1.6.

    Args:
        epsilons: `[num_examples]` per-example epsilons (>= 0).
        num_models: N, the number of models per bank; it sets the last bucket.

    Returns:
        float64 `[num_examples]`: bucket k = [0.5k, 0.5k + 0.5) is worth 2**-k for every k with
        0.5k + 0.5 <= ceil(ln(N - 1)); an epsilon beyond the last bucket (the cap 50 included)
        is worth 0. For N = 100 the last bucket is [4.5, 5), for N = 512 it is [6.5, 7).
    """
    eps = np.asarray(epsilons, dtype=np.float64)
    if num_models < 3:
        raise ValueError(f"num_models must be at least 3 (ln(N - 1) > 0), got {num_models}")
    if np.isnan(eps).any() or (eps < 0).any():
        raise ValueError("epsilons must be >= 0 and not NaN")
    num_buckets = int(round(math.ceil(math.log(num_models - 1)) / BUCKET_WIDTH))
    bucket = np.floor(eps / BUCKET_WIDTH)  # exact for multiples of 0.5: a power-of-two divisor
    return np.where(bucket < num_buckets, 2.0 ** -np.minimum(bucket, num_buckets), 0.0)


def _forget_quality_unchecked(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """F for banks already checked by `_check_banks`, same N: `[num_models, num_examples]` each."""
    return float(
        np.mean(example_scores(per_example_epsilons(unlearned, retrained), unlearned.shape[0]))
    )


_COLUMNS_PER_CALL = 8192  # columns handed to `_epsilons_batched` at once (bounds the copies)


def _forget_qualities(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    unlearned_rows: np.ndarray,
    retrained_rows: np.ndarray,
) -> np.ndarray:
    """F of many pairs of sub-banks in one batched pass: pair g scores the models
    unlearned[unlearned_rows[g]] against retrained[retrained_rows[g]].

    Args:
        unlearned, retrained: checked `[num_models_u, num_examples]`, `[num_models_r, E]` banks.
        unlearned_rows, retrained_rows: int `[G, m]` model indices (repeats allowed: bootstrap).

    Returns:
        float64 `[G]`, each equal to `_forget_quality_unchecked` on that pair's banks (the same
        epsilons column by column, and F is a sum of powers of two divided once by E, exact in
        any order of summation).
    """
    m = unlearned_rows.shape[1]
    return example_scores(
        _pair_epsilons(unlearned, retrained, unlearned_rows, retrained_rows).ravel(), m
    ).reshape(unlearned_rows.shape[0], -1).mean(axis=1)


def _pair_epsilons(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    unlearned_rows: np.ndarray,
    retrained_rows: np.ndarray,
) -> np.ndarray:
    """Per-example epsilons of many pairs of sub-banks (see `_forget_qualities`): float64
    `[G, num_examples]`, row g equal to `per_example_epsilons` of pair g's banks."""
    num_pairs, m = unlearned_rows.shape
    num_examples = unlearned.shape[1]
    u_t = np.ascontiguousarray(unlearned.T)  # [E, num_models]: a model's values are a column
    r_t = np.ascontiguousarray(retrained.T)
    out = np.empty((num_pairs, num_examples))
    per_call = max(1, _COLUMNS_PER_CALL // max(num_examples, 1))
    for lo in range(0, num_pairs, per_call):
        rows_u = unlearned_rows[lo : lo + per_call]
        rows_r = retrained_rows[lo : lo + per_call]
        # [g, E, m] -> one row per (pair, example)
        u_cols = u_t[:, rows_u].transpose(1, 0, 2).reshape(-1, m)
        r_cols = r_t[:, rows_r].transpose(1, 0, 2).reshape(-1, m)
        out[lo : lo + per_call] = _epsilons_batched(u_cols, r_cols).reshape(-1, num_examples)
    return out


def forget_quality(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """Forgetting quality F of spec 1.6: the mean over forget examples of H(epsilon).

    Args:
        unlearned: `[num_models, num_examples]` confidences of the unlearned bank.
        retrained: `[num_models, num_examples]` confidences of the reference bank (same N: the
            buckets of H are defined by one N, so unequal banks are refused).

    Returns:
        F in [0, 1]. A perfect unlearner scores about 0.18-0.19, not 1 (see `calibrated_ceiling`);
        F is only comparable at equal N.
    """
    u, r = _check_paired_banks(unlearned, retrained)
    return _forget_quality_unchecked(u, r)


# --- Beyond the peers (spec section 4) ------------------------------------------------------------
class _MethodShare(TypedDict, total=False):
    # Only when `unlearned` was given: the method's F at the same N // 2, against the same
    # reference halves, and its share of the ceiling (the like-for-like comparison).
    method_forget_quality: float
    share: float


class CalibratedCeiling(_MethodShare):
    """What `calibrated_ceiling` returns: a plain dict, ready for a JSON report."""

    forget_quality: float  # mean F over the random half splits (NaN with fewer than 6 models)
    num_models: int  # models per bank each split was scored at: N // 2. Report it beside the value
    per_split: list[float]  # F of each split
    seed: int  # seed of the splits


def calibrated_ceiling(
    retrained: np.ndarray,
    *,
    unlearned: np.ndarray | None = None,
    seed: int = 0,
    repeats: int = 5,
    cache: dict | None = None,
) -> CalibratedCeiling:
    """The F a perfect unlearner gets at this N: one half of the reference models scored as if
    they were unlearned models, against the other half (spec section 4).

    A perfect unlearner's outputs are draws from the reference distribution, so this is the F of
    sampling noise alone, the F to compare a method with; the official metric puts it at about
    0.18-0.19, not 1 (spec 1.7). Report F next to it.

    Models are split at random into two disjoint halves of N // 2 (one model is left out when N is
    odd), `repeats` times, and the F of each split is averaged. The halves have N // 2 models, not
    N, and nothing is rescaled: the result's `num_models` says which N the value belongs to, and
    a report should show it. How far the value at N // 2 is from the ceiling at N depends on the
    data. Spec 1.7's "0.18-0.19 at any N" holds for confidences spread over about a unit or more;
    narrower ones score lower as N grows, because the threshold grid (0.01) and the interval
    slack (+-2) are fixed in confidence units. Measured here, identical normal banks, 400
    examples: sd 1.0 gives F = 0.176, 0.179, 0.187 at N = 10, 20, 40; sd 0.2 gives 0.169, 0.126,
    0.107. Real confidences of the digits MLP (per-example sd ~0.2) did the same: 0.167 at N = 10
    against 0.127 at N = 20, both from random halves of 20 reference + 20 retrained models.
    So a method's F at N must not be divided by the ceiling at N // 2. Pass `unlearned` to get
    the like-for-like comparison: in each split, N // 2 unlearned models drawn at random are
    scored against the same reference half the ceiling used; `share` is the ratio of the means.
    With fewer than 6 reference models a half has fewer than 3, for which H is undefined: the
    value is then NaN and `per_split` is empty.

    Args:
        retrained: `[num_models, num_examples]` confidences of the reference models.
        unlearned: optional `[num_models_u, num_examples]` confidences of the unlearned models
            (num_models_u >= N // 2).
        seed: seed of the random splits.
        repeats: number of random splits to average (each costs one F at N // 2, two with
            `unlearned`).
        cache: optional dict kept by a caller that scores several methods against one
            reference bank: the ceiling's own F per split depends only on `retrained`, the seed,
            `repeats` and the size of `unlearned` (which the splits' random stream depends on),
            so it is computed once and kept there under those (the bank by a digest of its
            bytes). The values are the same with or without it.

    Returns:
        {"forget_quality": mean F, "num_models": N // 2, "per_split": [F of each split],
        "seed": seed}, plus "method_forget_quality" and "share" when `unlearned` is given.
    """
    r, _ = _check_banks(retrained, retrained)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    u = None
    if unlearned is not None:
        u, _ = _check_banks(unlearned, retrained)
    half = r.shape[0] // 2
    if u is not None:
        half = min(half, u.shape[0])
    scores: list[float] = []
    method: list[float] = []
    if half >= 3 and r.shape[1] > 0:
        rng = np.random.default_rng(seed)
        first, second, picks = [], [], []
        for _ in range(repeats):
            order = rng.permutation(r.shape[0])
            first.append(order[:half])
            second.append(order[half : 2 * half])  # the reference half of this split
            if u is not None:
                picks.append(rng.permutation(u.shape[0])[:half])
        # All splits in one batched pass: F(first half vs second half) for the ceiling, and
        # F(picked unlearned models vs the same second half) for the method.
        key = None
        if cache is not None:
            digest = hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16)
            key = ("ceiling", r.shape, digest.hexdigest(), seed, repeats,
                   None if u is None else u.shape[0])
        if key is not None and key in cache:
            scores = list(cache[key])
        else:
            scores = _forget_qualities(r, r, np.array(first), np.array(second)).tolist()
            if key is not None:
                cache[key] = tuple(scores)
        if u is not None:
            method = _forget_qualities(u, r, np.array(picks), np.array(second)).tolist()
    value = float(np.mean(scores)) if scores else math.nan
    out: CalibratedCeiling = {
        "forget_quality": value, "num_models": half, "per_split": scores, "seed": seed,
    }
    if u is not None:
        method_value = float(np.mean(method)) if method else math.nan
        out["method_forget_quality"] = method_value
        out["share"] = method_value / value if value > 0 else math.nan
    return out


# Resamples of the bootstrap interval by default. The interval is F +- z * (sd of the resampled
# F), a standard-error interval, and a standard error needs few resamples: the estimated sd has a
# relative sd of about 1 / sqrt(2 (B - 1)), 10% at B = 50 against 7% at B = 100 (Efron and
# Tibshirani's "An Introduction to the Bootstrap", 1993, sec. 6.4, find 50 often enough and
# rarely more than 200 needed). Coverage was the same with 40 resamples (see below) and is
# printed side by side for 50 and 100 by benchmarks/bench_metrics.py; half the resamples halve
# the cost of `score`, nearly all of which is this interval.
DEFAULT_RESAMPLES = 50


def bootstrap_forget_quality(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval for F (spec section 4): F +- z * (sd of F over the resamples).

    Each resample draws N models with replacement within each bank (independently for the two
    banks) and recomputes F over all forget examples; all resamples go through the epsilon engine
    in one batched pass (`_forget_qualities`), with the same values as one F per resample. The
    interval reflects the sampling of models (seeds), not of forget examples.

    Why the sd and not the percentiles of the resampled F: resampling with replacement puts
    repeated models in each bank, i.e. exact ties, and the ~160,000 interval rules exploit them,
    so the resampled F are biased low (by ~0.05 for identical distributions at N = 30): a plain
    percentile interval lies below F (it covered the ceiling in 0-1% of retrain-vs-retrain
    draws). Their spread is right, though (sd 0.0149 against 0.0158 for fresh draws at N = 100,
    40 examples). Measured over independent retrain-vs-retrain draws (the interval should cover
    the expected F of a perfect unlearner 95% of the time): this interval covered 94.0% at
    N = 12 (20 examples, 40 resamples, 200 draws), 93.5% at N = 30 (40 examples, 200 draws) and
    94% at N = 100 (100 draws); the percentile interval moved onto F covered 89.5%, 92% and 94%,
    short at small N, where 2.5% tails of a few dozen resamples are noisy. With a per-model
    offset shared by all examples (sd half the examples' sd; real models differ like this), it
    covered 91.5% at N = 12 (fresh sd of F 0.0201, resampled 0.0185). Tested in
    tests/test_metrics_bootstrap.py, with benchmarks/bench_metrics.py printing the coverage on
    synthetic and on the golden digits banks.

    Cost: num_resamples F's, batched: about 4x less CPU than one F at a time (see the README,
    Benchmarks). Between two seeds each end of the interval moves with an sd of about
    1.96 / sqrt(2 (B - 1)) sd of F: 0.20 at the default B = 50, 0.14 at 100.
    `official_scores` gives the same interval with the point estimate in the same pass.

    The resamples: `_bootstrap_rows(N, num_resamples, seed)`, one `numpy.random.default_rng(seed)`
    stream, resample by resample, N draws of the unlearned bank's models then N of the reference
    bank's (`rng.integers(0, N, N)` each). The same seed gives the same resamples, whichever
    method is scored.

    Args:
        unlearned: `[num_models, num_examples]` confidences of the unlearned bank.
        retrained: `[num_models, num_examples]` confidences of the reference bank (same N).
        num_resamples: number of bootstrap resamples (>= 2).
        seed: seed of the resampling.
        level: coverage of the interval, in (0, 1).

    Returns:
        (low, high).
    """
    u, r = _check_paired_banks(unlearned, retrained)
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be at least 2, got {num_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rows_u, rows_r = _bootstrap_rows(u.shape[0], num_resamples, seed)
    scores = _forget_qualities(u, r, rows_u, rows_r)  # one batched pass over all resamples
    return _interval_from_resamples(_forget_quality_unchecked(u, r), scores, level)


class OfficialScores(TypedDict):
    """What `official_scores` returns: the official metric of one method, with what we add."""

    epsilon: np.ndarray  # float64 [num_examples]: per-example epsilon, `per_example_epsilons`
    score: np.ndarray  # float64 [num_examples]: per-example score H, `example_scores`
    forget_quality: float  # F, `forget_quality`
    ceiling: CalibratedCeiling  # `calibrated_ceiling(retrained, unlearned=unlearned, seed=seed)`
    interval: tuple[float, float] | None  # `bootstrap_forget_quality`; None without resamples


def official_scores(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    repeats: int = 5,
    cache: dict | None = None,
) -> OfficialScores:
    """Everything `unlearn score` reports of the official metric, for banks of equal N.

    The same values as the straightforward calls (tested for equality): `per_example_epsilons`,
    `example_scores`, their mean F, `calibrated_ceiling(retrained, unlearned=unlearned,
    seed=seed, repeats=repeats)` and `bootstrap_forget_quality(unlearned, retrained,
    num_resamples=num_resamples, seed=seed, level=level)`, computed with less work: the point
    estimate's epsilons and every resample's go through one batched pass, F is not computed
    twice, and with `cache` (a dict the caller keeps for one reference bank, see
    `calibrated_ceiling`) the ceiling's own splits are scored once for all methods.

    Args:
        unlearned, retrained: `[num_models, num_examples]` confidences of the two banks (same N,
            at least one example).
        num_resamples: bootstrap resamples; 0 for no interval, else >= 2.

    Returns:
        an `OfficialScores` dict.
    """
    u, r = _check_paired_banks(unlearned, retrained)
    if num_resamples == 1 or num_resamples < 0:
        raise ValueError(f"num_resamples must be 0 or at least 2, got {num_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = u.shape[0]
    # Row 0: the banks themselves (the point estimate); rows 1..: the bootstrap resamples.
    rows_u = np.arange(n)[None, :]
    rows_r = rows_u
    if num_resamples:
        boot_u, boot_r = _bootstrap_rows(n, num_resamples, seed)
        rows_u, rows_r = np.vstack([rows_u, boot_u]), np.vstack([rows_r, boot_r])
    eps = _pair_epsilons(u, r, rows_u, rows_r)  # [1 + num_resamples, E]
    scores = example_scores(eps.ravel(), n).reshape(eps.shape)
    point = float(np.mean(scores[0]))  # as `forget_quality`: one mean over the examples
    interval = None
    if num_resamples:
        interval = _interval_from_resamples(point, scores[1:].mean(axis=1), level)
    return OfficialScores(
        epsilon=eps[0],
        score=scores[0],
        forget_quality=point,
        ceiling=calibrated_ceiling(r, unlearned=u, seed=seed, repeats=repeats, cache=cache),
        interval=interval,
    )


def _interval_from_resamples(
    centre: float, scores: np.ndarray, level: float
) -> tuple[float, float]:
    """F +- z * sd(resampled F), clipped to [0, 1]; scores `[num_resamples]`."""
    half_width = NormalDist().inv_cdf((1.0 + level) / 2.0) * float(np.std(scores, ddof=1))
    low, high = np.clip([centre - half_width, centre + half_width], 0.0, 1.0)
    return float(low), float(high)


def _bootstrap_rows(
    num_models: int, num_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The models each resample draws: int `[num_resamples, num_models]` for the unlearned bank and
    for the reference bank, drawn with replacement (resample by resample, unlearned first)."""
    rng = np.random.default_rng(seed)
    rows_u = np.empty((num_resamples, num_models), dtype=np.int64)
    rows_r = np.empty_like(rows_u)
    for b in range(num_resamples):
        rows_u[b] = rng.integers(0, num_models, num_models)
        rows_r[b] = rng.integers(0, num_models, num_models)
    return rows_u, rows_r


# ==================================================================================================
# The best attack rule per example, for the report's figures (issue 13).
#
# Kept apart from the fast epsilon path above and never called by it: `per_example_epsilons` only
# needs each example's largest epsilon, while a figure needs the rule that reaches it (its family,
# thresholds and rates). This section enumerates the rules of spec 1.4 with the same grids as the
# reference implementation, for the few examples a report shows (about 1-10 ms each at N = 100);
# tests check that its epsilon equals `per_example_epsilons` on those examples.
# ==================================================================================================
class BestRule(TypedDict):
    """The attack rule that gives one forget example its epsilon: a plain dict, ready for JSON."""

    # "threshold": flag a model as `flags` when c >= thresholds[0];
    # "interval": flag it as `flags` when thresholds[0] <= c <= thresholds[1];
    # "degenerate": epsilon decided by the spread of the banks, no attack ran (spec 1.3);
    # "none": no rule scores above 0 (the banks are indistinguishable on the grid).
    kind: str
    epsilon: float  # the example's epsilon, in [0, 50], as `per_example_epsilons` gives it
    thresholds: list[float]  # in logit-scaled confidence; [] for "degenerate" and "none"
    flags: str  # "unlearned" or "retrained": the bank the rule predicts; "" without a rule
    true_positive_rate: float  # share of the flagged bank's models the rule flags (NaN: no rule)
    false_positive_rate: float  # share of the other bank's models it flags (NaN: no rule)


def best_rules(unlearned: np.ndarray, retrained: np.ndarray, examples,
               epsilons: np.ndarray | None = None) -> list[BestRule]:
    """The best attack rule of each chosen forget example (spec 1.2-1.5), with its epsilon.

    Args:
        unlearned: `[num_unlearned_models, num_examples]` confidences of the unlearned bank.
        retrained: `[num_retrained_models, num_examples]` confidences of the reference bank.
        examples: positions (columns) of the examples to explain, e.g. the top k by epsilon.
        epsilons: optional `[num_examples]` epsilons from `per_example_epsilons` for these banks.
            Where a single threshold already reaches an example's epsilon, the ~160,000 interval
            rules are then skipped (by the tie rule below they could not win); the result is the
            same, found faster.

    Returns:
        one `BestRule` per position, in the order given. Among rules of equal epsilon the single
        threshold wins over the interval (the simpler picture), then the first on the grid.
    """
    u, r = _check_banks(unlearned, retrained)
    known = None if epsilons is None else np.asarray(epsilons, dtype=np.float64)
    return [_best_rule(u[:, s], r[:, s], None if known is None else float(known[s]))
            for s in np.asarray(examples, dtype=np.int64)]


def _best_rule(unlearned_col: np.ndarray, retrained_col: np.ndarray,
               known: float | None = None) -> BestRule:
    u_sorted, r_sorted = np.sort(unlearned_col), np.sort(retrained_col)
    retrained_positive = bool(np.median(retrained_col) > np.median(unlearned_col))  # spec 1.2
    pos, neg = (r_sorted, u_sorted) if retrained_positive else (u_sorted, r_sorted)
    names = ("retrained", "unlearned") if retrained_positive else ("unlearned", "retrained")
    decided = _degenerate_epsilon(pos, neg)
    if decided is not None:
        return BestRule(kind="degenerate", epsilon=float(decided), thresholds=[], flags="",
                        true_positive_rate=math.nan, false_positive_rate=math.nan)

    # Single threshold family: the reference's grid, "positive if c >= t".
    lo, hi = min(pos[0], neg[0]), max(pos[-1], neg[-1])
    grid = np.linspace(lo, hi, _grid_size(hi - lo))
    tp = pos.size - np.searchsorted(pos, grid, side="left")
    fp = neg.size - np.searchsorted(neg, grid, side="left")
    eps = _rule_epsilons(tp, fp, pos.size, neg.size)
    at = int(np.argmax(eps))
    best = BestRule(kind="threshold", epsilon=float(eps[at]), thresholds=[float(grid[at])],
                    flags=names[0], true_positive_rate=float(tp[at] / pos.size),
                    false_positive_rate=float(fp[at] / neg.size))

    reached = min(best["epsilon"], EPSILON_CAP) == known  # the fast path's epsilon, if given
    if best["epsilon"] != math.inf and not reached:  # else no interval rule can beat this one
        # Interval family: all ~160,000 rules [left, right] at once, flagging the peakier bank.
        peaky, other, width = _interval_banks(pos, neg)
        right = _right_edges(peaky, width)  # [num_right]
        left = _left_edges(right, width)  # [num_right, 400]
        tp = np.searchsorted(peaky, right, side="right")[:, None] - _count_below(peaky, left)
        fp = np.searchsorted(other, right, side="right")[:, None] - _count_below(other, left)
        np.maximum(tp, 0, out=tp)  # an empty interval (left > right) flags nothing
        np.maximum(fp, 0, out=fp)
        eps = _epsilon_table(peaky.size, other.size)[tp * (other.size + 1) + fp]
        j, i = np.unravel_index(int(np.argmax(eps)), eps.shape)
        if eps[j, i] > best["epsilon"]:
            best = BestRule(
                kind="interval", epsilon=float(eps[j, i]),
                thresholds=[float(left[j, i]), float(right[j])],
                flags=names[0] if peaky is pos else names[1],
                true_positive_rate=float(tp[j, i] / peaky.size),
                false_positive_rate=float(fp[j, i] / other.size),
            )
    if best["epsilon"] <= 0.0:
        return BestRule(kind="none", epsilon=0.0, thresholds=[], flags="",
                        true_positive_rate=math.nan, false_positive_rate=math.nan)
    best["epsilon"] = float(min(np.float32(best["epsilon"]), np.float32(EPSILON_CAP)))
    return best


def _count_below(bank_sorted: np.ndarray, left: np.ndarray) -> np.ndarray:
    """count(c < left[j, i]) for every left edge: `[num_right, 400]` ints, from a sorted bank.

    Equal to `np.searchsorted(bank_sorted, left, side="left")`, about 5x faster at N = 100: each
    row of `left` is a linspace, so the number of its edges at or below a data point c is found by
    arithmetic, then corrected by comparing c with the actual edges (float rounding can put the
    estimate one edge off); a histogram of those numbers, summed along the row, gives the counts.
    """
    num_right, num_left = left.shape
    start = left[:, :1]
    step = (left[:, -1:] - start) / (num_left - 1)  # > 0: the edges increase along a row
    c = bank_sorted[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        guess = np.floor((c - start) / step) + 1.0
    at_or_below = np.clip(np.nan_to_num(guess), 0, num_left).astype(np.int64)  # [num_right, n]
    for _ in range(8):  # the guess is off by at most an edge or two; each pass fixes one
        next_edge = np.take_along_axis(left, np.minimum(at_or_below, num_left - 1), axis=1)
        up = (at_or_below < num_left) & (next_edge <= c)
        last_edge = np.take_along_axis(left, np.maximum(at_or_below - 1, 0), axis=1)
        down = (at_or_below > 0) & (last_edge > c)
        if not (up.any() or down.any()):
            break
        at_or_below += up.astype(np.int64) - down.astype(np.int64)
    else:  # pragma: no cover - a guess this far off means a degenerate grid: count directly
        return np.searchsorted(bank_sorted, left, side="left")
    # count(c < left[j, i]) = number of points whose count of edges at or below them is <= i.
    rows = np.arange(num_right)[:, None] * (num_left + 1)
    hist = np.bincount((rows + at_or_below).ravel(), minlength=num_right * (num_left + 1))
    return np.cumsum(hist.reshape(num_right, num_left + 1), axis=1)[:, :num_left]
