"""Tests for unlearn_cli.second_opinions: the held-out likelihood-ratio attack and KLOM.

Closed forms: banks drawn from one Gaussian (attack 0.5, KLOM about 0), banks d apart (attack
accuracy Φ(d/2), TPR at FPR α about Φ(d - z_(1-α)), KLOM the KL of the binned Gaussians, about
d²/2), constant banks, N = 3. The vectorised code is checked against straightforward
per-example loops written from the module docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from unlearn_cli import score
from unlearn_cli.config import load_config
from unlearn_cli.errors import StoreError
from unlearn_cli.metrics import logit_scaled_confidence
from unlearn_cli.second_opinions import (
    KLOM_EPS,
    LiraScores,
    held_out_lira,
    klom,
    klom_per_example,
    margins,
)
from unlearn_cli.store import (
    REFERENCE,
    UNLEARNED,
    Store,
    _npz_bytes,
    atomic_write_bytes,
    hash_split,
)

KLOM_MAX = math.log((1 + KLOM_EPS) / KLOM_EPS)  # disjoint banks: 11.51


# --- Straightforward per-example references -------------------------------------------------------


def _lira_loop(unlearned, retrained, folds=5, seed=0):
    """Balanced accuracy per example, one example and one fold at a time with scipy.stats."""
    num_models, num_examples = unlearned.shape
    k = min(folds, num_models)
    rng = np.random.default_rng(seed)
    parts_u = np.array_split(rng.permutation(num_models), k)
    parts_r = np.array_split(rng.permutation(num_models), k)
    out = []
    for e in range(num_examples):
        tp = fp = 0
        for held_u, held_r in zip(parts_u, parts_r, strict=True):
            fit_u = np.delete(unlearned[:, e], held_u)
            fit_r = np.delete(retrained[:, e], held_r)
            sd_u = math.sqrt(max(np.var(fit_u, ddof=1), 1e-12))
            sd_r = math.sqrt(max(np.var(fit_r, ddof=1), 1e-12))

            def llr(x, fit_u=fit_u, fit_r=fit_r, sd_u=sd_u, sd_r=sd_r):
                return stats.norm.logpdf(x, fit_u.mean(), sd_u) - stats.norm.logpdf(
                    x, fit_r.mean(), sd_r
                )

            tp += int(np.sum(llr(unlearned[held_u, e]) > 0))
            fp += int(np.sum(llr(retrained[held_r, e]) > 0))
        out.append(0.5 * (tp / num_models + 1 - fp / num_models))
    return np.array(out)


def _klom_loop(unlearned, retrained, bins=20, eps=KLOM_EPS, clip=100.0):
    """KL(unlearned || retrained) per example with np.histogram and scipy.stats.entropy."""
    out = []
    for e in range(unlearned.shape[1]):
        p = np.clip(unlearned[:, e], -clip, clip)
        q = np.clip(retrained[:, e], -clip, clip)
        low, high = min(p.min(), q.min()), max(p.max(), q.max())
        if low >= high:
            high = low + 1
        edges = np.linspace(low, high, bins + 1)
        p_prob = np.histogram(p, edges)[0] / p.size  # the top edge counts in the last bin
        q_prob = np.histogram(q, edges)[0] / q.size
        q_safe = np.where(p_prob > 0, np.maximum(q_prob, eps), q_prob)
        out.append(stats.entropy(pk=p_prob, qk=q_safe))
    return np.array(out)


def _binned_gaussian_kl(edges, shift):
    """KL between N(shift, 1) and N(0, 1) discretised on `edges` (mass outside dropped, as
    samples outside the range cannot occur), with the eps floor."""
    p = np.diff(stats.norm.cdf(edges - shift))
    q = np.diff(stats.norm.cdf(edges))
    p, q = p / p.sum(), q / q.sum()
    return stats.entropy(pk=p, qk=np.where(p > 0, np.maximum(q, KLOM_EPS), q))


# --- The attack: closed forms ---------------------------------------------------------------------


def test_same_gaussian_reads_chance():
    rng = np.random.default_rng(0)
    result = held_out_lira(rng.normal(size=(50, 2000)), rng.normal(size=(50, 2000)))
    assert isinstance(result, LiraScores) and result.balanced_accuracy.shape == (2000,)
    # Each example's accuracy has expectation exactly 0.5 (a held-out rule cannot tell two
    # draws of one distribution apart); its sd is about 0.05 at N = 50, so the mean of 2,000
    # lies within 0.01 of 0.5 (measured 0.4999).
    assert result.mean_balanced_accuracy == pytest.approx(0.5, abs=0.01)
    # The test's level is 5%: at most 5% + 3 sd (0.5%) of examples pass (measured 4.7%).
    assert 0.0 < result.share_beating_chance <= 0.065
    # Without a signal, a 5% FPR threshold passes about 5% of the unlearned models.
    assert result.mean_tpr_at_fpr[1] == pytest.approx(0.05, abs=0.02)


@pytest.mark.parametrize("distance", [1.0, 2.0])
def test_banks_a_known_distance_apart(distance):
    rng = np.random.default_rng(1)
    result = held_out_lira(rng.normal(distance, 1.0, (100, 2000)), rng.normal(size=(100, 2000)))
    # Bayes-optimal accuracy between N(d, 1) and N(0, 1) is Φ(d/2); the fitted Gaussians lose
    # little at N = 100 (measured 0.690 and 0.841 against 0.691 and 0.841).
    assert result.mean_balanced_accuracy == pytest.approx(stats.norm.cdf(distance / 2), abs=0.01)
    # TPR at FPR α of the optimal rule: Φ(d - z_(1-α)). The empirical ROC over N = 100 held-out
    # models, thresholds pooled over folds, reads it within 0.02 at 5% (measured +0.001/+0.008)
    # and within 0.06 at 1%, where a single false positive is allowed (measured +0.016/+0.047).
    tpr1, tpr5 = result.mean_tpr_at_fpr
    assert tpr5 == pytest.approx(stats.norm.cdf(distance - stats.norm.ppf(0.95)), abs=0.02)
    assert tpr1 == pytest.approx(stats.norm.cdf(distance - stats.norm.ppf(0.99)), abs=0.06)
    if distance == 2.0:
        assert result.share_beating_chance > 0.99


def test_constant_banks():
    equal = held_out_lira(np.full((10, 3), 2.5), np.full((10, 3), 2.5))
    # Equal spikes: every ratio is exactly 0, every model is called retrained: TPR 0, TNR 1.
    np.testing.assert_array_equal(equal.balanced_accuracy, 0.5)
    np.testing.assert_array_equal(equal.tpr_at_fpr, 0.0)
    assert not equal.beats_chance.any()
    apart = held_out_lira(np.full((10, 3), 2.6), np.full((10, 3), 2.5))
    np.testing.assert_array_equal(apart.balanced_accuracy, 1.0)
    np.testing.assert_array_equal(apart.tpr_at_fpr, 1.0)
    assert apart.beats_chance.all()
    # One bank constant (the `none` method: identical runs), the other spread: caught.
    rng = np.random.default_rng(2)
    spike = held_out_lira(np.full((20, 4), 0.3), rng.normal(size=(20, 4)))
    assert (spike.balanced_accuracy > 0.9).all()


def test_three_models_per_bank_is_leave_one_out():
    rng = np.random.default_rng(3)
    result = held_out_lira(rng.normal(5.0, 1.0, (3, 40)), rng.normal(size=(3, 40)))
    assert result.folds == 3 and result.num_models == 3
    sixths = 6 * result.balanced_accuracy  # 6 held-out calls per example
    np.testing.assert_allclose(sixths, np.round(sixths), atol=1e-12)
    assert result.mean_balanced_accuracy > 0.8  # 5 sd apart: mostly caught even at N = 3
    np.testing.assert_array_equal(result.balanced_accuracy, _lira_loop(*_banks_again(3)))


def _banks_again(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(5.0, 1.0, (3, 40)), rng.normal(size=(3, 40))


def test_attack_matches_a_per_example_loop():
    rng = np.random.default_rng(4)
    unlearned = rng.normal(0.3, 1.2, (23, 30))  # N not divisible by k: folds of 5 and 4
    retrained = rng.normal(size=(23, 30))
    unlearned[:, :3] = np.round(unlearned[:, :3])  # ties inside a bank
    ours = held_out_lira(unlearned, retrained, seed=7)
    np.testing.assert_allclose(ours.balanced_accuracy, _lira_loop(unlearned, retrained, seed=7),
                               rtol=0, atol=1e-12)


def test_attack_is_seeded():
    rng = np.random.default_rng(5)
    banks = rng.normal(size=(30, 20)), rng.normal(0.5, 1.0, (30, 20))
    first, again = held_out_lira(*banks, seed=1), held_out_lira(*banks, seed=1)
    np.testing.assert_array_equal(first.balanced_accuracy, again.balanced_accuracy)
    np.testing.assert_array_equal(first.p_value, again.p_value)
    other = held_out_lira(*banks, seed=2)
    assert not np.array_equal(first.balanced_accuracy, other.balanced_accuracy)


# --- KLOM: closed forms --------------------------------------------------------------------


def test_klom_of_one_gaussian_is_near_zero_with_many_models():
    rng = np.random.default_rng(6)
    kl = klom_per_example(rng.normal(size=(20_000, 4)), rng.normal(size=(20_000, 4)))
    # Histogram noise with 20 bins is about (bins - 1) / (2 n) = 5e-4 (measured 6e-4..1.2e-3).
    assert (kl >= 0).all() and (kl < 0.005).all()


def test_klom_of_one_gaussian_at_n_100_is_histogram_noise():
    # The bench's binning at 100 models per bank: even identical distributions read well above
    # 0 (sparse tail bins meet the eps floor): median 0.31 over 400 examples, as the README says.
    rng = np.random.default_rng(7)
    kl = klom_per_example(rng.normal(size=(100, 400)), rng.normal(size=(100, 400)))
    assert 0.1 < float(np.median(kl)) < 1.5


@pytest.mark.parametrize("distance", [0.5, 1.0])
def test_klom_of_gaussians_a_known_distance_apart(distance):
    rng = np.random.default_rng(8)
    unlearned = rng.normal(distance, 1.0, (20_000, 3))
    retrained = rng.normal(size=(20_000, 3))
    kl = klom_per_example(unlearned, retrained)
    for e in range(3):
        low = min(unlearned[:, e].min(), retrained[:, e].min())
        high = max(unlearned[:, e].max(), retrained[:, e].max())
        binned = _binned_gaussian_kl(np.linspace(low, high, 21), distance)
        # Sampling sd of the estimate at 20,000 models: 0.006 (d = 0.5) and 0.010 (d = 1),
        # measured over 40 examples, with no bias; the tolerance is 4 sd of the larger.
        assert kl[e] == pytest.approx(binned, abs=0.04)
        # Binning on 20 bins loses a little of the continuous KL d²/2.
        assert kl[e] == pytest.approx(distance**2 / 2, abs=0.05)


def test_klom_of_constant_banks():
    np.testing.assert_array_equal(klom_per_example(np.full((5, 2), 0.3), np.full((5, 2), 0.3)), 0)
    # Disjoint constants, either way round: the floor bounds it at log((1 + eps) / eps). The
    # bench's np.digitize would drop the higher bank from its counts (NaN or 0); see the module.
    for high, low in ((1.3, 0.3), (0.3, 1.3)):
        kl = klom_per_example(np.full((5, 2), high), np.full((5, 2), low))
        np.testing.assert_allclose(kl, KLOM_MAX, rtol=1e-12)


def test_klom_clips_margins_at_100():
    # Beyond ±100 every margin is the same after clipping: two far-apart spikes above 100 match.
    kl = klom_per_example(np.full((4, 1), 150.0), np.full((4, 1), 400.0))
    assert kl[0] == 0.0


def test_klom_matches_a_per_example_loop():
    rng = np.random.default_rng(9)
    unlearned = rng.normal(0.5, 2.0, (37, 60))
    retrained = rng.normal(size=(37, 60))
    unlearned[:, :5] = np.round(unlearned[:, :5])  # values on bin edges
    retrained[:, 5] = 3.0  # a constant bank
    unlearned[:, 6] = retrained[:, 6]  # identical banks
    unlearned[0, 7] = 500.0  # clipped
    np.testing.assert_allclose(klom_per_example(unlearned, retrained),
                               _klom_loop(unlearned, retrained), rtol=0, atol=1e-12)


def test_klom_summaries_and_n_3():
    rng = np.random.default_rng(10)
    result = klom(rng.normal(size=(3, 50)), rng.normal(size=(3, 50)),
                  rng.normal(size=(3, 80)), rng.normal(size=(3, 80)))
    assert result.forget.shape == (50,) and result.test.shape == (80,) and result.num_models == 3
    assert result.forget_p95 == np.percentile(result.forget, 95)
    assert result.test_mean == result.test.mean()
    assert ((result.forget >= 0) & (result.forget <= KLOM_MAX + 1e-12)).all()
    with pytest.raises(ValueError):
        result.forget[0] = 1.0


# --- Margins -------------------------------------------------------------------------------------


def test_margin_is_the_true_logit_minus_logsumexp_of_the_others():
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(4, 6, 10)) * 5).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    got = margins(logits, labels)
    z = logits.astype(np.float64)
    for m in range(4):
        for k in range(6):
            others = np.delete(z[m, k], labels[k])
            assert got[m, k] == pytest.approx(z[m, k, labels[k]] - np.log(np.exp(others).sum()),
                                              abs=1e-12)
    # The same quantity as the official logit-scaled confidence, without probabilities.
    official = logit_scaled_confidence(logits.reshape(-1, 10), np.tile(labels, 4)).reshape(4, 6)
    np.testing.assert_allclose(got, official, atol=1e-4)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    banks = rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    copies = [logits.copy(), *(b.copy() for b in banks)]
    for array in (logits, *banks):
        array.setflags(write=False)
    margins(logits, np.arange(4) % 5)
    held_out_lira(*banks)
    klom_per_example(*banks)
    for array, copy in zip((logits, *banks), copies, strict=True):
        np.testing.assert_array_equal(array, copy)


# --- Refused input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    good = np.zeros((5, 3))
    broken = good.copy()
    broken[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        held_out_lira(broken, good)
    with pytest.raises(ValueError, match="non-finite"):
        klom_per_example(good, broken)
    logits = np.zeros((2, 3, 4), np.float32)
    logits[1, 1, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        margins(logits, np.zeros(3, int))


@pytest.mark.parametrize(
    ("unlearned", "retrained", "message"),
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "shape"),
        (np.zeros((2, 3)), np.zeros((2, 3)), "at least 3 models"),
        (np.zeros(5), np.zeros(5), "2-D"),
        (np.zeros((5, 0)), np.zeros((5, 0)), "no examples"),
    ],
)
def test_bad_shapes_are_refused(unlearned, retrained, message):
    with pytest.raises(ValueError, match=message):
        held_out_lira(unlearned, retrained)
    with pytest.raises(ValueError, match=message):
        klom_per_example(unlearned, retrained)


def test_bad_settings_are_refused():
    banks = np.zeros((5, 2)), np.zeros((5, 2))
    with pytest.raises(ValueError, match="folds"):
        held_out_lira(*banks, folds=1)
    with pytest.raises(ValueError, match="FPR"):
        held_out_lira(*banks, fprs=(1.0,))
    with pytest.raises(ValueError, match="labels must lie"):
        margins(np.zeros((2, 3, 4)), np.array([0, 4, 1]))


# --- Through `unlearn score` ---------------------------------------------------------------


def _tiny_store(root, test_value=5.0):
    """4 reference models and 4 runs of `finetune`, 3 forget and 2 test examples, by hand."""
    s = Store(root)
    split = {
        "train": np.arange(5), "test": np.array([5, 6]), "forget": np.array([0, 1, 2]),
        "retain": np.array([3, 4]), "forget_labels": np.array([1, 2, 3]),
        "test_labels": np.array([0, 1]), "retain_labels": np.array([0, 0]),
    }
    cfg = load_config(None)
    s.init_experiment(cfg, split)
    # The provenance every stored model carries (the store checks it when reading).
    prov = {"config_hash": cfg.identity_hash(), "split_hash": hash_split(split)}
    s.save_method("finetune", {"name": "finetune", "spec": "finetune", "params": {}})
    rng = np.random.default_rng(13)
    for i in range(4):
        for kind, seed, shift in ((REFERENCE, i, 0.0), (UNLEARNED, 1_000_000 + i, 20.0)):
            forget = rng.normal(size=(3, 10)).astype(np.float32)
            forget[np.arange(3), split["forget_labels"]] += 4.0 + shift
            test = rng.normal(size=(2, 10)).astype(np.float32)
            test[0, 0] = test_value
            arrays = {
                "forget_logits": forget, "test_logits": test,
                "retain_loss": np.zeros(2, np.float32), "retain_correct": np.ones(2, bool),
            }
            meta = {**prov, "wall_seconds": 1.0, "timing": "sequential"}
            method = "finetune" if kind == UNLEARNED else None
            if np.isfinite(test_value):
                s.save_outputs(kind, seed, arrays, meta, method=method)
            else:  # the store refuses to write such outputs: put them on disk as damage would
                path = s.model_dir(kind, seed, method) / "outputs.npz"
                atomic_write_bytes(path, _npz_bytes(arrays, meta))
    return s.root


def test_score_reports_lira_and_klom(tmp_path):
    root = _tiny_store(tmp_path / "s")
    (rep,) = score.run(root, metric="lira", bootstrap=0)
    assert rep["schema"] == "unlearn.report/2"
    (rep,) = score.run(root, metric="klom", bootstrap=0)
    assert rep["schema"] == "unlearn.report/2"
    kl = rep["klom"]
    assert "lira" not in rep and "forget_quality" not in rep
    assert set(kl) >= {"forget", "test", "bins", "eps", "clip", "per_example"}
    # The unlearned forget logits are shifted 20 logits up: the 4 + 4 margins share no bin, so
    # each example reads log(1 / eps) minus the entropy of the unlearned histogram (at most
    # log 4 with 4 models) plus a renormalisation term >= 0.
    floor = math.log(1 / KLOM_EPS) - math.log(4)
    assert all(floor - 1e-9 <= v <= KLOM_MAX for v in kl["per_example"]["forget"])
    assert len(kl["per_example"]["forget"]) == 3 and kl["test"]["mean"] < KLOM_MAX
    (rep,) = score.run(root, metric="lira", bootstrap=0)
    lira = rep["lira"]
    assert "klom" not in rep and lira["folds"] == 4
    assert lira["balanced_accuracy"] == 1.0  # disjoint banks: every held-out call right
    assert len(lira["per_example"]["balanced_accuracy"]) == 3


def test_score_all_needs_enough_for_the_seed_attacks(tmp_path):
    # 3 forget and 2 test examples are too few for the simple MIA: one error line, no trace.
    root = _tiny_store(tmp_path / "s")
    with pytest.raises(StoreError, match="--metric seed cannot score.*--metric official"):
        score.run(root, metric="all", bootstrap=0)


def test_score_refuses_non_finite_test_outputs(tmp_path):
    root = _tiny_store(tmp_path / "s", test_value=np.nan)
    with pytest.raises(StoreError, match="test_logits holds NaN or infinity"):
        score.run(root, metric="klom", bootstrap=0)
