"""Lockstep ensembles of conv nets with BatchNorm (unlearn_cli/lockstep.py), on the CPU at reduced
widths: every member equals the same seed trained alone by `fit`.

Tolerance: after a few steps every float tensor of a member (weights, BatchNorm running statistics)
is within 1e-4 x max(1, its largest absolute value) of the lone model's (measured: up to 1e-5 on
fastnet, whose BatchNorm biases move at 64x the learning rate, 2e-6 on ResNet-18); grouped
convolutions sum in another order, and no more than float rounding may differ. Integer buffers
(BatchNorm's step counts) are equal.
"""

import pytest
import torch

from unlearn_cli import cifar, training
from unlearn_cli.config import CONFIG_DIR, load_config
from unlearn_cli.lockstep import Stacked, fit_lockstep, groups
from unlearn_cli.models import init_from_data, init_model, model_spec
from unlearn_cli.training import fit, recipe

REL_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def setup(config, widths, **overrides):
    cfg = load_config(CONFIG_DIR / config, [f"model.widths={widths}"])
    spec = model_spec(cfg.model, (3, 32, 32), 10, mean=cifar.MEAN, std=cifar.STD)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    return spec, x, y, {**recipe(cfg.train), "batch_size": 16, **overrides}


def assert_same(member, alone):
    for (name, a), b in zip(member.state_dict().items(), alone.state_dict().values()):
        if a.is_floating_point():
            scale = max(1.0, b.abs().max().item())
            assert (a - b).abs().max().item() <= REL_TOL * scale, name
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("config,widths,overrides", [
    # The seed recipe: zero padding 4, random flips, cosine, classical momentum; 3 steps (the last
    # a partial batch).
    ("cifar10-resnet18.yaml", "[2,2,4,4]", {"epochs": 1}),
    # The fast recipe: reflect padding, alternating flips, triangle, the last partial batch
    # dropped, lookahead (made to start at epoch 1: created at step 5, updated at step 10); 12
    # steps.
    ("cifar10-fast.yaml", "[2,4,4]", {"epochs": 6}),
])
def test_each_member_equals_its_seed_trained_alone(config, widths, overrides, monkeypatch):
    monkeypatch.setattr(training, "LOOKAHEAD_START_EPOCH", 1)
    spec, x, y, options = setup(config, widths, **overrides)
    seeds = [7, 8]
    members = [init_model(spec, s) for s in seeds]
    for model in members:
        init_from_data(model, x)
    fit_lockstep(members, x, y, seeds=seeds, **options)
    for seed, member in zip(seeds, members):
        alone = init_model(spec, seed)
        init_from_data(alone, x)
        fit(alone, x, y, seed=seed, **options)
        assert_same(member, alone)
    # Members differ from each other (own init, order, augmentation, BatchNorm statistics).
    a, b = (dict(m.named_buffers()) for m in members)
    name = next(k for k in a if k.endswith("running_mean"))
    assert not torch.allclose(a[name], b[name])


def test_stacked_holds_each_members_batchnorm_statistics_and_frozen_weights():
    spec, x, _, _ = setup("cifar10-fast.yaml", "[2,4,4]")
    members = [init_model(spec, s) for s in (1, 2, 3)]
    stacked = Stacked(members)
    buffers = dict(stacked.named_buffers())
    assert all(v.shape[0] == 3 for v in buffers.values())
    frozen = [n for n, p in stacked.named_parameters() if not p.requires_grad]
    assert frozen == ["1__whiten__weight"]  # fastnet's whitening stays frozen
    # Nothing of the skeleton is trained or saved: only stacked tensors.
    assert all(p.shape[0] == 3 for p in stacked.parameters())
    stacked.train()
    out = stacked(torch.stack([x[:4], x[4:8], x[8:12]]))
    assert out.shape == (3, 4, 10)
    running = [k for k in buffers if k.endswith("running_mean")][0]
    assert not torch.equal(dict(stacked.named_buffers())[running][0],
                           dict(stacked.named_buffers())[running][1])


def test_groups_of_k():
    assert list(groups([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    assert list(groups([1, 2, 3], 0)) == [[1, 2, 3]]


@pytest.mark.slow  # original + 4 reference models end to end with TTA outputs: ~5-25 s here
def test_train_refs_with_engine_ensemble_stores_lockstep_members_of_a_conv_net(tmp_path):
    from test_cifar import CONFIGS, write_archive

    from unlearn_cli import train_refs
    from unlearn_cli.store import REFERENCE, Store

    root = tmp_path / "data"
    write_archive(root)
    cfg = load_config(CONFIGS["fast"], [
        f"data.root={root}", "data.forget_size=50", "train.epochs=1", "train.batch_size=25",
        "model.widths=[2,4,4]", "train.engine=ensemble", "train.ensemble_size=2",
        "launch.workers=1", "launch.device=cpu", "launch.timed_alone=8"])
    train_refs.run(cfg, tmp_path / "store", num_models=4, inline=True)
    store = Store(tmp_path / "store")
    metas = [store.load_outputs(REFERENCE, s)[1] for s in range(4)]
    # Seeds 0 and 1 alone (launch.timed_alone=8 dealt over four jobs of 25: positions 0 and 1),
    # the other two as one lockstep group.
    assert all(m["engine"] == "loop" and m["timing"] == "sequential" for m in metas[:2])
    assert [m["engine"] for m in metas[2:]] == ["ensemble", "ensemble"]
    assert {m["ensemble_size"] for m in metas[2:]} == {2}
    # Member seed 2 equals seed 2 trained alone on the retain set, as train-refs would loop it.
    split = store.load_split()
    x, y, _ = cifar.load(root)
    xr, yr = torch.from_numpy(x[split["retain"]]), torch.from_numpy(y[split["retain"]])
    spec = store.load_model(REFERENCE, 2)["model"]
    alone = init_model(spec, 2)
    init_from_data(alone, xr)
    fit(alone, xr, yr, seed=2, **recipe(cfg.train))
    member = init_model(spec, 2)
    member.load_state_dict(store.load_model(REFERENCE, 2)["state_dict"])
    assert_same(member, alone)
