"""Wiring between the steps that no single module's tests see: what `apply` hands the methods."""

from __future__ import annotations

import pytest
import torch

from unlearn_cli import apply, train_refs
from unlearn_cli.config import TrainConfig, load_config
from unlearn_cli.data import load_dataset
from unlearn_cli.models import init_from_data, init_model
from unlearn_cli.store import UNLEARNED, Store
from unlearn_cli.training import fit, recipe

# A recipe far from the default (30 epochs, batch 64, lr 0.1): a retrain that silently fell back
# to the defaults could not match it.
RECIPE = ["train.epochs=2", "train.batch_size=32", "train.lr=0.05", "train.weight_decay=0.0",
          "launch.workers=1"]


def _retrain_by_hand(cfg, store: Store, seed: int, train) -> dict[str, torch.Tensor]:
    """What `retrain` must produce: reference model `seed` trained with `train` on retain."""
    split = store.load_split()
    dataset = load_dataset(cfg.data)
    idx = torch.as_tensor(split["retain"])
    x, y = dataset.x[idx], dataset.y[idx]
    spec = store.load_model("original")["model"]
    model = init_model(dict(spec), seed)
    init_from_data(model, x)
    return fit(model, x, y, seed=seed, **recipe(train)).state_dict()


@pytest.mark.slow
def test_apply_hands_retrain_the_reference_recipe(tmp_path):
    cfg = load_config(None, RECIPE)
    root = tmp_path / "s"
    train_refs.run(cfg, root, num_models=1)
    apply.run(cfg, root, method_spec="retrain")
    store = Store(root)
    seed = store.done_seeds(UNLEARNED, "retrain")[0]
    stored = store.load_model(UNLEARNED, seed, "retrain")["state_dict"]

    expected = _retrain_by_hand(cfg, store, seed, cfg.train)
    assert stored.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(stored[key], expected[key], atol=1e-6, rtol=0)
    # And the check can fail: the default recipe gives other weights.
    default = _retrain_by_hand(cfg, store, seed, TrainConfig())
    assert any((stored[k] - default[k]).abs().max() > 1e-3 for k in default)
