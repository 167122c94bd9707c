"""The NeurIPS 2023 challenge entries: each one's own mechanism, their adaptations to the digits
MLP (or refusal), the validation split they may distil on, and a run end to end from the CLI.

Running on the digits default and changing the model, seeding, and parameter validation are
checked for every method in test_methods.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import FAST
from test_methods import CHALLENGE, SEED, Setup, make_setup
from torch import nn
from typer.testing import CliRunner

from unlearn_cli.cli import app
from unlearn_cli.config import identity, load_config
from unlearn_cli.data import load_dataset, make_split
from unlearn_cli.errors import ConfigError, DataError, MethodError
from unlearn_cli.methods import REGISTRY, UnlearnData, method_params
from unlearn_cli.methods.api import weight_layers
from unlearn_cli.methods.conv_transpose import transpose_kernels
from unlearn_cli.methods.forget_contrastive import contrastive_loss
from unlearn_cli.methods.noisy_finetune import balanced_class_weights
from unlearn_cli.methods.prune_reinit import prune_and_redraw
from unlearn_cli.models import build_model, init_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> Setup:
    return make_setup()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def call(digits: Setup, name: str, data: UnlearnData | None = None, **overrides) -> nn.Module:
    """One run on a private copy of the original; overrides bypass the config's range checks
    (epochs=0 isolates a method's first step)."""
    method = REGISTRY[name]
    params = dataclasses.replace(method.params(), **overrides)
    model = copy.deepcopy(digits.original).eval()
    return method.fn(model, data or digits.data, params, device=CPU, seed=SEED)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def tiny_resnet() -> nn.Module:
    spec = {"arch": "resnet18", "hidden": [], "input_shape": [3, 32, 32], "num_classes": 10,
            "widths": [4, 4, 4, 4]}
    return init_model(spec, 0)


def tiny_fastnet() -> nn.Module:
    spec = {"arch": "fastnet", "hidden": [], "input_shape": [3, 32, 32], "num_classes": 10,
            "widths": [4, 4, 4]}
    return init_model(spec, 0)


# ------------------------------------------------------------------ layers and adaptations


def test_weight_layers_are_convs_when_there_are_any_else_linears(digits):
    layers, kind = weight_layers(digits.original)
    assert kind == "linear" and [m.in_features for m in layers] == [64, 128]
    layers, kind = weight_layers(tiny_resnet())
    assert kind == "conv" and len(layers) == 20  # stem, 16 in blocks, 3 shortcuts
    fast = tiny_fastnet()
    layers, kind = weight_layers(fast)
    # fastnet's whitening layer is frozen (set from the data): left out.
    assert kind == "conv" and fast.whiten not in layers and len(layers) == 6


def test_conv_transpose_transposes_every_trainable_kernel():
    model = tiny_fastnet()
    before = {id(m): m.weight.detach().clone() for m in model.modules()
              if isinstance(m, nn.Conv2d)}
    assert transpose_kernels(model) == 6
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            expected = before[id(m)] if m is model.whiten else before[id(m)].transpose(2, 3)
            assert torch.equal(m.weight, expected)


def test_conv_transpose_on_the_digits_mlp_transposes_the_input_layer_as_8x8_images(digits):
    model = copy.deepcopy(digits.original)
    first, second = [m for m in model.modules() if isinstance(m, nn.Linear)]
    w1, w2 = first.weight.detach().clone(), second.weight.detach().clone()
    assert transpose_kernels(model) == 1
    assert torch.equal(first.weight.view(-1, 8, 8), w1.view(-1, 8, 8).transpose(1, 2))
    assert torch.equal(second.weight, w2)  # hidden units have no spatial axes
    # As an 8x8 image the transposed filter sees the transposed digit exactly as before.
    x = digits.data.forget_x[:5]
    x_t = x.view(-1, 8, 8).transpose(1, 2).reshape(-1, 64)
    assert torch.allclose(first(x_t), nn.functional.linear(x, w1, first.bias), atol=1e-6)


def test_conv_transpose_refuses_a_model_without_kernels_in_one_line():
    model = build_model({"arch": "mlp", "hidden": [8], "input_shape": [10], "num_classes": 3})
    with pytest.raises(MethodError) as err:
        transpose_kernels(model)
    message = str(err.value)
    assert "\n" not in message and "no Conv2d layer" in message and "reads 10 features" in message
    assert "resnet18" in message


# ------------------------------------------------------------------ each entry's mechanism


def test_forget_contrastive_loss_is_smallest_when_similarities_are_equal():
    retain = torch.randn(6, 10)
    equal = torch.zeros(4, 10)  # zero outputs: every similarity 0
    assert contrastive_loss(equal, retain, 1.15).item() == pytest.approx(math.log(6))
    assert contrastive_loss(torch.randn(4, 10) * 3, retain, 1.15).item() > math.log(6)


def test_masked_small_gradients_redraws_exactly_its_share_of_each_layer(digits):
    share = REGISTRY["masked-small-gradients"].params().reinit_share
    out = call(digits, "masked-small-gradients", epochs=0)  # the redraw alone
    before, after = tensors(digits.original), tensors(out)
    for name in ("1.weight", "3.weight"):  # the MLP's two linear layers
        changed = int((before[name] != after[name]).sum())
        assert changed == round(share * before[name].numel()), name
    for name in ("1.bias", "3.bias"):
        assert torch.equal(before[name], after[name])


def test_masked_small_gradients_damps_the_kept_weights(digits):
    """With damping 0 the kept weights move only by weight decay; undamped they move freely."""
    kept = call(digits, "masked-small-gradients", epochs=0)
    mask = tensors(kept)["1.weight"] == tensors(digits.original)["1.weight"]
    frozen = tensors(call(digits, "masked-small-gradients", epochs=1, damping=0.0,
                          weight_decay=0.0))
    free = tensors(call(digits, "masked-small-gradients", epochs=1, damping=1.0,
                        weight_decay=0.0))
    original = tensors(digits.original)["1.weight"]
    assert torch.equal(frozen["1.weight"][mask], original[mask])
    assert not torch.equal(free["1.weight"][mask], original[mask])


def test_noisy_finetune_noises_only_the_first_layer_by_default(digits):
    before = tensors(digits.original)
    first = tensors(call(digits, "noisy-finetune", epochs=0))
    assert not torch.equal(first["1.weight"], before["1.weight"])
    assert all(torch.equal(first[k], before[k]) for k in ("1.bias", "3.weight", "3.bias"))
    every = tensors(call(digits, "noisy-finetune", epochs=0, layers="all"))
    assert not torch.equal(every["3.weight"], before["3.weight"])


def test_balanced_class_weights_are_n_over_k_times_class_count():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    w = balanced_class_weights(y, 4)
    assert torch.allclose(w, torch.tensor([6 / 9, 6 / 3, 6 / 6, 0.0]))
    assert (w[y].sum() / len(y)).item() == pytest.approx(1.0)  # classes weigh the same in all


def test_prune_and_redraw_keeps_only_the_largest_magnitudes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    before = tensors(model)
    prune_and_redraw(model, 0.9, torch.Generator().manual_seed(1))
    after = tensors(model)
    magnitudes = torch.cat([v.abs().flatten() for v in before.values()])
    kept = magnitudes > torch.kthvalue(magnitudes, round(0.9 * magnitudes.numel())).values
    assert int(kept.sum()) == magnitudes.numel() - round(0.9 * magnitudes.numel())
    for name in before:
        same = before[name] == after[name]
        big = before[name].abs() > torch.kthvalue(magnitudes, round(0.9 * magnitudes.numel())
                                                  ).values
        assert torch.equal(same | ~big, torch.ones_like(same))  # every large value survives
        if name.endswith("bias"):
            assert torch.equal(after[name][~big], torch.zeros_like(after[name][~big]))
        else:
            bound = 1 / math.sqrt(before[name].shape[1])
            assert (after[name][~big].abs() <= bound).all() and (after[name][~big] != 0).all()


def test_prune_reinit_ends_with_fp16_values(digits):
    out = call(digits, "prune-reinit")
    for value in tensors(out).values():
        assert torch.equal(value, value.half().float())


def test_reset_distill_without_a_validation_split_says_how_to_get_one(digits):
    with pytest.raises(MethodError) as err:
        call(digits, "reset-distill", warmup_set="validation")
    message = str(err.value)
    assert "\n" not in message
    assert "--set data.validation_size=0.1" in message and "warmup_set=retain" in message


def test_reset_distill_distils_on_the_validation_split_when_there_is_one(digits):
    """`auto` takes the validation split: a different warm-up set, a different model."""
    valid = UnlearnData(*digits.data.tensors("forget"), *digits.data.tensors("retain"),
                        digits.data.num_classes, valid_x=digits.test_x[:100],
                        valid_y=digits.test_y[:100])
    on_valid = call(digits, "reset-distill", data=valid)
    on_retain = call(digits, "reset-distill", data=valid, warmup_set="retain")
    assert not all(torch.equal(a, b) for a, b in zip(on_valid.parameters(),
                                                     on_retain.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(on_retain.parameters(),
                                                 call(digits, "reset-distill").parameters()))


def test_noisy_subsets_trains_only_the_picked_tensors_and_restores_gradients(digits):
    before = tensors(digits.original)
    out = call(digits, "noisy-subsets", epochs=1, full_epochs=0, subset_size=1,
               noise_free_epochs=1)
    after = tensors(out)
    # The head (3.*) is redrawn; of the input layer's two tensors at most the one picked moves.
    assert sum(not torch.equal(before[k], after[k]) for k in ("1.weight", "1.bias")) <= 1
    assert all(p.requires_grad for p in out.parameters())


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("noisy-finetune.layers", "some", "expected one of: first, all"),
    ("masked-small-gradients.reinit_share", "1.5", "expected a share in (0, 1]"),
    ("prune-reinit.prune_share", "1.0", "expected a share in [0, 1)"),
    ("noisy-subsets.full_epochs", "10", "expected between 0 and epochs (9)"),
    ("reset-distill.warmup_set", "test", "expected one of: auto, validation, retain"),
    ("forget-contrastive.min_lr", "0.1", "expected between 0 and forget_lr"),
])
def test_bad_method_values_are_one_clear_problem(key, value, expected):
    name = key.split(".")[0]
    cfg = load_config(None, [f"method.{key}={value}"])
    with pytest.raises(ConfigError, match=r"1 problem\(s\)") as err:
        method_params(REGISTRY[name], cfg)
    assert f"method.{key}: {expected}" in str(err.value)


# ------------------------------------------------------------------ the validation split


def test_validation_size_zero_keeps_the_split_and_the_store_identity():
    cfg = load_config(None)
    split = make_split(load_dataset(cfg.data).y.numpy(), cfg.data)
    assert sorted(split) == ["forget", "retain", "test", "train"]
    assert "validation_size" not in identity(cfg.to_dict())["data"]
    # Identity and hash as a config without the key (a store made before it existed) has them.
    old = cfg.to_dict()
    del old["data"]["validation_size"]
    assert identity(old) == identity(cfg.to_dict())
    with_valid = load_config(None, ["data.validation_size=0.1"])
    assert identity(with_valid.to_dict())["data"]["validation_size"] == 0.1
    assert with_valid.identity_hash() != cfg.identity_hash()


def test_validation_split_comes_out_of_train_before_the_forget_set():
    cfg = load_config(None, ["data.validation_size=0.1"])
    labels = load_dataset(cfg.data).y.numpy()
    split = make_split(labels, cfg.data)
    plain = make_split(labels, load_config(None).data)
    assert np.array_equal(split["test"], plain["test"])
    assert len(split["valid"]) == round(0.1 * len(plain["train"]))
    assert np.array_equal(np.union1d(split["train"], split["valid"]), plain["train"])
    assert not np.intersect1d(split["valid"], split["train"]).size
    assert np.array_equal(np.union1d(split["forget"], split["retain"]), split["train"])
    assert len(split["forget"]) == round(0.1 * len(split["train"]))
    counted = make_split(labels, load_config(None, ["data.validation_size=50"]).data)
    assert len(counted["valid"]) == 50


@pytest.mark.parametrize("value", ["-1", "1.5", "lots"])
def test_bad_validation_size_is_refused_by_the_config(value):
    with pytest.raises(ConfigError, match="data.validation_size: expected"):
        load_config(None, [f"data.validation_size={value}"])


def test_validation_size_larger_than_train_is_one_clear_line():
    cfg = load_config(None, ["data.validation_size=1400"])
    with pytest.raises(DataError, match="data.validation_size=1400.0 gives 1400 validation "
                                        "examples out of 1347"):
        make_split(load_dataset(cfg.data).y.numpy(), cfg.data)


# ------------------------------------------------------------------ the command line

runner = CliRunner()


def test_methods_command_groups_baselines_and_challenge_entries():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    title = lines.index("NeurIPS 2023 challenge entries")
    assert lines[0] == "baselines and classic methods"
    listed = [line.split()[0] for line in lines[title + 1:]]
    assert listed == CHALLENGE
    assert all(len(line) <= 80 for line in lines)


@pytest.mark.slow
def test_every_entry_runs_end_to_end_from_the_cli(tmp_path):
    """train-refs on a store with a validation split (the fix reset-distill's error suggests),
    then apply and score every challenge entry from the command line."""
    store = tmp_path / "digits"
    sets = [x for s in [*FAST, "data.validation_size=0.1"] for x in ("--set", s)]
    result = runner.invoke(app, ["train-refs", "--num-models", "3", "--store", str(store),
                                 *sets])
    assert result.exit_code == 0, result.output
    for name in CHALLENGE:
        extra = ["--set", "method.reset-distill.warmup_set=validation"]
        result = runner.invoke(app, ["apply", "--method", name, "--num-models", "3",
                                     "--store", str(store), *sets, *extra])
        assert result.exit_code == 0, (name, result.output)
    result = runner.invoke(app, ["score", "--store", str(store), "--bootstrap", "0",
                                 "--out", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "report.json").read_text())
    reports = {r["method"]: r for r in doc["methods"]}
    assert set(CHALLENGE) <= set(reports)
    for name in CHALLENGE:
        assert reports[name]["num_models"]["scored"] == 3, name


# ------------------------------------------------------------------ conv models


def image_data(seed: int = 0) -> UnlearnData:
    """24 retain and 8 forget random 3x16x16 images of 10 classes (uint8, as CIFAR-10 is stored;
    16 pixels keep the tiny conv models fast), for a tiny conv model."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (32, 3, 16, 16), generator=gen, dtype=torch.uint8)
    y = torch.arange(32) % 10
    return UnlearnData(x[:8], y[:8], x[8:], y[8:], 10, valid_x=x[:8], valid_y=y[:8])


def conv_model(arch: str) -> nn.Module:
    spec = {"arch": arch, "hidden": [], "input_shape": [3, 16, 16], "num_classes": 10,
            "widths": [4, 4, 4, 4] if arch == "resnet18" else [4, 4, 4],
            "normalize": {"mean": [125.0] * 3, "std": [60.0] * 3}}
    return init_model(spec, 0).eval()


# Short runs: the mechanism on real conv layers, not its quality.
SHORT = {"epochs": 1, "batch_size": 8}
SHORT_PARAMS = {
    "forget-contrastive": SHORT,
    "masked-small-gradients": SHORT,
    "noisy-finetune": {**SHORT, "epochs": 2, "layers": "all"},
    "prune-reinit": {"epochs": 0.5, "batch_size": 8},
    "conv-transpose": SHORT,
    "reset-distill": {**SHORT, "warmup_epochs": 1},
    "noisy-subsets": {**SHORT, "epochs": 2, "full_epochs": 1, "noise_free_epochs": 0},
}


@pytest.mark.slow  # 14 cases of about a second each
@pytest.mark.parametrize("arch", ["resnet18", "fastnet"])
@pytest.mark.parametrize("name", CHALLENGE)
def test_entry_acts_on_a_conv_model_and_leaves_frozen_layers_alone(name, arch):
    model = conv_model(arch)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    method = REGISTRY[name]
    params = dataclasses.replace(method.params(), **SHORT_PARAMS[name])
    out = method.fn(model, image_data(), params, device=CPU, seed=SEED)
    after = out.state_dict()
    assert not out.training
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if arch == "fastnet":  # the frozen whitening layer: untouched (up to prune-reinit's fp16
        # rounding of every stored value), still frozen
        key = next(k for k in before if k.endswith("whiten.weight"))
        expected = before[key].half().float() if name == "prune-reinit" else before[key]
        assert torch.equal(after[key], expected)
        whiten = dict(out.named_parameters())[key]
        assert not whiten.requires_grad
