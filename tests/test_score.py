"""`score` on a tiny store written by hand, whose every number can be worked out on paper."""

import math

import numpy as np
import pytest

from unlearn_cli import score
from unlearn_cli.config import load_config
from unlearn_cli.store import REFERENCE, UNLEARNED, Store, hash_split

N = 4  # models per bank; H has ceil(ln(N - 1)) / 0.5 = 4 buckets: 1, 1/2, 1/4, 1/8


def _logits(true_class_margin: float, label: int) -> np.ndarray:
    row = np.zeros(10, np.float32)
    row[label] = true_class_margin
    return row


@pytest.fixture
def hand_store(tmp_path):
    s = Store(tmp_path / "hand")
    split = {
        "train": np.arange(4), "test": np.array([4, 5]), "forget": np.array([0, 1]),
        "retain": np.array([2, 3]),
        "forget_labels": np.array([3, 7]), "test_labels": np.array([1, 2]),
        "retain_labels": np.array([0, 0]),
    }
    cfg = load_config(None)
    s.init_experiment(cfg, split)
    # The provenance every stored model carries: the store checks it when reading.
    meta = {"config_hash": cfg.identity_hash(), "split_hash": hash_split(split)}
    s.save_method("finetune", {"name": "finetune", "spec": "finetune", "params": {}})
    for i in range(N):
        # Forget example 0: every model of both banks gives the same output -> both banks are
        # the same constant -> epsilon 0 -> H = 1.
        # Forget example 1: the unlearned bank is constant, the references spread -> the spread
        # ratio is 0 < 0.01 -> epsilon = 50 (the cap) -> H = 0.        So F = (1 + 0) / 2.
        ref_forget = np.stack([_logits(2.0, 3), _logits(1.0 + i, 7)])
        unl_forget = np.stack([_logits(2.0, 3), _logits(3.0, 7)])
        # Test set: references right on both (acc 1), unlearned right on one (acc 1/2).
        ref_test = np.stack([_logits(5.0, 1), _logits(5.0, 2)])
        unl_test = np.stack([_logits(5.0, 1), _logits(5.0, 0)])
        # Retain: references right on one of two (1/2), unlearned on both (1).
        s.save_outputs(REFERENCE, i, {
            "forget_logits": ref_forget, "test_logits": ref_test,
            "retain_loss": np.zeros(2, np.float32), "retain_correct": np.array([True, False]),
        }, {**meta, "wall_seconds": 4.0, "timing": "sequential"})
        s.save_outputs(UNLEARNED, 1_000_000 + i, {
            "forget_logits": unl_forget, "test_logits": unl_test,
            "retain_loss": np.zeros(2, np.float32), "retain_correct": np.array([True, True]),
        }, {**meta, "wall_seconds": 1.0, "timing": "sequential"}, method="finetune")
    return s.root


def test_every_number_of_the_hand_case(hand_store):
    (rep,) = score.run(hand_store, bootstrap=0)
    assert rep["per_example"]["index"] == [0, 1]
    assert rep["per_example"]["epsilon"] == [0.0, 50.0]
    assert rep["per_example"]["score"] == [1.0, 0.0]
    assert rep["forget_quality"] == 0.5
    u = rep["utility"]
    assert (u["retain_accuracy"]["unlearned"], u["retain_accuracy"]["retrained"]) == (1.0, 0.5)
    assert (u["test_accuracy"]["unlearned"], u["test_accuracy"]["retrained"]) == (0.5, 1.0)
    assert u["retain_accuracy"]["ratio"] == 2.0 and u["test_accuracy"]["ratio"] == 0.5
    assert u["forget_accuracy"]["unlearned"] == 1.0  # margins > 0 on the true class
    # final = F x RA ratio x TA ratio, unclipped as upstream; clipped: ratios capped at 1.
    assert rep["final_score"] == pytest.approx(0.5 * 2.0 * 0.5)
    assert rep["final_score_clipped"] == pytest.approx(0.5 * 1.0 * 0.5)
    rt = rep["runtime"]
    assert rt["seconds_per_model"] == {"unlearned": 1.0, "retrained": 4.0}
    assert rt["ratio"] == 0.25 and rt["over_gate"] is True
    assert rep["num_models"] == {"retrained": N, "unlearned": N, "scored": N}
    # Halves of 2 models cannot be scored: no ceiling, and the reading says so.
    assert math.isnan(rep["ceiling"]["forget_quality"])
    assert "no ceiling" in rep["reading"]


def test_unequal_banks_score_the_first_n_of_each(hand_store):
    s = Store(hand_store)
    arrays, meta = s.load_outputs(REFERENCE, 0)
    s.save_outputs(REFERENCE, 4, arrays, meta)
    (rep,) = score.run(hand_store, bootstrap=0)
    assert rep["num_models"] == {"retrained": 5, "unlearned": 4, "scored": 4}
    assert rep["forget_quality"] == 0.5
