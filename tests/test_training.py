import numpy as np
import torch

from unlearn_cli.config import load_config
from unlearn_cli.data import load_dataset, make_split
from unlearn_cli.models import init_model, model_spec
from unlearn_cli.training import SGD, fit, fit_ensemble


def _setup(overrides=()):
    cfg = load_config(None, list(overrides))
    ds = load_dataset(cfg.data)
    split = make_split(ds.y.numpy(), cfg.data)
    spec = model_spec(cfg.model, ds.input_shape, ds.num_classes)
    return cfg, ds, split, spec


def test_split_is_seeded_stratified_and_partitions_train():
    cfg, ds, split, _ = _setup()
    again = make_split(ds.y.numpy(), cfg.data)
    for key in split:
        np.testing.assert_array_equal(split[key], again[key])
    assert len(split["test"]) == 450 and len(split["train"]) == 1347
    assert len(split["forget"]) == round(0.1 * 1347)
    assert set(split["forget"]) | set(split["retain"]) == set(split["train"])
    assert not set(split["forget"]) & set(split["retain"])
    # Stratified: every class is within one example of its share of the test set.
    labels = ds.y.numpy()
    for c in range(10):
        share = (labels == c).sum() * 0.25
        assert abs((labels[split["test"]] == c).sum() - share) <= 1
    other = make_split(labels, load_config(None, ["data.split_seed=1"]).data)
    assert not np.array_equal(other["forget"], split["forget"])


def _train(cfg, ds, split, spec, seed):
    model = init_model(spec, seed)
    idx = torch.as_tensor(split["train"])
    t = cfg.train
    fit(model, ds.x[idx], ds.y[idx], epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
        momentum=t.momentum, weight_decay=t.weight_decay, seed=seed)
    return model


def test_original_recipe_reaches_95_percent_and_is_deterministic():
    cfg, ds, split, spec = _setup()
    model = _train(cfg, ds, split, spec, seed=0)
    test = torch.as_tensor(split["test"])
    with torch.no_grad():
        acc = (model(ds.x[test]).argmax(1) == ds.y[test]).float().mean().item()
    assert acc >= 0.95, acc
    again = _train(cfg, ds, split, spec, seed=0)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    other = _train(cfg, ds, split, spec, seed=1)
    assert not torch.equal(model[1].weight, other[1].weight)


def test_ensemble_member_matches_the_same_seed_trained_alone():
    cfg, ds, split, spec = _setup(["train.epochs=3"])
    idx = torch.as_tensor(split["retain"])
    x, y = ds.x[idx], ds.y[idx]
    t = cfg.train
    recipe = dict(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                  weight_decay=t.weight_decay)
    seeds = [4, 5, 6]
    members = fit_ensemble([init_model(spec, s) for s in seeds], x, y, seeds=seeds, **recipe)
    alone = fit(init_model(spec, 5), x, y, seed=5, **recipe)
    for a, b in zip(members[1].state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(members[0][1].weight, members[1][1].weight)


def test_sgd_matches_torch_optim():
    torch.manual_seed(0)
    a = torch.randn(5, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours = SGD([a], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for step in range(5):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            ((p ** 2).sum() * (step + 1)).backward()
            opt.step()
    torch.testing.assert_close(a, b)
