"""CIFAR-10 on CPU: the reader on a tiny archive in torchvision's layout, the configs end to end,
the models, augmentation and the training options, as a user (or a method) sees them."""

import json
import pickle

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unlearn_cli import cifar
from unlearn_cli.augment import crop_flip, draw
from unlearn_cli.cli import app
from unlearn_cli.config import CONFIG_DIR, load_config
from unlearn_cli.data import load_dataset
from unlearn_cli.errors import ConfigError, DataError
from unlearn_cli.models import (
    Normalize,
    ResNet18,
    build_model,
    forward_flops,
    fresh_model,
    init_from_data,
    init_model,
    model_spec,
)
from unlearn_cli.store import REFERENCE, UNLEARNED, Store
from unlearn_cli.training import SGD, fit, recipe, scheduled_lr

CONFIGS = {"resnet18": CONFIG_DIR / "cifar10-resnet18.yaml",
           "fast": CONFIG_DIR / "cifar10-fast.yaml"}
PER_BATCH, N_TEST = 20, 20  # 5 x 20 training images + 20 test images
TINY = ["data.forget_size=50", "train.epochs=1", "train.batch_size=50", "launch.workers=1"]


def write_archive(root, *, per_batch=PER_BATCH, n_test=N_TEST, seed=0, str_keys=False):
    """A CIFAR-10 archive in torchvision's layout, pickled as the real files are (protocol 2,
    bytes keys). Returns the images [n, 3072] and labels [n] written, train batches then test."""
    folder = root / cifar.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name, k in [*((f, per_batch) for f in cifar.TRAIN_FILES), (cifar.TEST_FILE, n_test)]:
        data = rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, k)]
        key = (lambda s: s) if str_keys else (lambda s: s.encode())
        batch = {key("batch_label"): b"batch", key("labels"): lab, key("data"): data,
                 key("filenames"): [b"img.png"] * k}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        images.append(data)
        labels += lab
    return np.concatenate(images), np.array(labels)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    images, labels = write_archive(root)
    return root, images, labels


def cfg_for(name, root, *extra):
    return load_config(CONFIGS[name], [f"data.root={root}", *TINY, *extra])


# ---------------------------------------------------------------- the reader


def test_reader_returns_the_written_images_in_nchw(archive):
    root, images, labels = archive
    x, y, n_test = cifar.load(root)
    assert x.shape == (120, 3, 32, 32) and x.dtype == np.uint8 and n_test == N_TEST
    np.testing.assert_array_equal(x.reshape(120, -1), images)
    np.testing.assert_array_equal(y, labels)
    # Channel planes: the first 1,024 values of a row are red, row by row.
    assert x[7, 0, 1, 0] == images[7, 32] and x[7, 2, 0, 0] == images[7, 2048]
    # The folder itself works as data.root too.
    assert cifar.load(root / cifar.FOLDER)[0].shape == x.shape


def test_reader_accepts_str_keys(tmp_path):
    write_archive(tmp_path, str_keys=True)
    assert cifar.load(tmp_path)[0].shape == (120, 3, 32, 32)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): creates the file
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    write_archive(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": _Evil(marker)},
                           protocol=2)
    pickle.loads(payload)  # the plain unpickler runs it: the test can fail
    assert marker.exists()
    marker.unlink()
    (tmp_path / cifar.FOLDER / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_3 is not a plain CIFAR-10 batch.*refused"):
        cifar.load(tmp_path)
    assert not marker.exists()


def test_a_batch_of_the_wrong_shape_is_a_data_error(tmp_path):
    write_archive(tmp_path)
    bad = {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}
    (tmp_path / cifar.FOLDER / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch: expected 'data'"):
        cifar.load(tmp_path)


def test_missing_data_is_one_line_naming_the_folder_and_the_fix(tmp_path):
    store = tmp_path / "store"
    result = CliRunner().invoke(app, [
        "train-refs", "--config", str(CONFIGS["fast"]), "--store", str(store),
        "--set", f"data.root={tmp_path / 'nowhere'}", "--device", "cpu"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR-10 not found"), result.output
    folder = (tmp_path / "nowhere" / "cifar-10-batches-py").resolve()
    assert str(folder) in lines[0] and "data_batch_1" in lines[0]
    assert "--set data.download=true" in lines[0] and cifar.URL in lines[0]
    assert not store.exists()


def test_one_missing_batch_is_named(tmp_path):
    write_archive(tmp_path)
    (tmp_path / cifar.FOLDER / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"is missing data_batch_4;"):
        cifar.load(tmp_path)


def test_download_only_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "download",
                        lambda root, *variant: calls.append(root) or write_archive(root))
    with pytest.raises(DataError, match="not found"):
        cifar.load(tmp_path)
    assert calls == []
    assert cifar.load(tmp_path, allow_download=True)[0].shape == (120, 3, 32, 32)
    assert calls == [tmp_path]


def test_a_failed_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"downloading CIFAR-10 into .* failed \(OSError: network "
                                        r"is unreachable\); download https://"):
        cifar.load(tmp_path, allow_download=True)


# ---------------------------------------------------------------- split and config


def test_split_uses_the_fixed_test_batch(archive):
    from unlearn_cli.train_refs import prepare_split

    root, _, labels = archive
    cfg = cfg_for("fast", root)
    assert load_dataset(cfg.data).test_count == N_TEST
    split = prepare_split(cfg)
    np.testing.assert_array_equal(split["test"], np.arange(100, 120))
    np.testing.assert_array_equal(split["train"], np.arange(100))
    assert len(split["forget"]) == 50 and set(split["forget"]) | set(split["retain"]) == set(
        range(100))
    np.testing.assert_array_equal(split["test_labels"], labels[100:])


def test_test_fraction_and_image_options_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS["fast"], ["data.test_fraction=0.2", "model.widths=[8, 8]"])
    msg = str(info.value)
    assert "data.test_fraction: expected no value for cifar10" in msg
    assert "model.widths: expected 3 widths >= 1 for fastnet" in msg
    with pytest.raises(ConfigError, match="model.arch: .*resnet18 needs images"):
        load_config(None, ["model.arch=resnet18"])
    with pytest.raises(ConfigError, match="train.crop_padding: expected 0 and train.flip false"):
        load_config(None, ["train.flip=true"])
    with pytest.raises(ConfigError, match="train.precision: expected fp32, bf16 or fp16"):
        load_config(CONFIGS["fast"], ["train.precision=half"])


# ---------------------------------------------------------------- models


def spec_of(name, *extra):
    cfg = load_config(CONFIGS[name], list(extra))
    return model_spec(cfg.model, (3, 32, 32), 10, mean=cifar.MEAN, std=cifar.STD)


def test_resnet18_is_the_cifar_form_with_its_known_cost():
    spec = spec_of("resnet18")
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    net = model[-1]
    assert isinstance(net, ResNet18)
    stem = net.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert forward_flops(spec) == pytest.approx(1.11e9, rel=0.005)  # 3.33 GFLOP fwd + bwd / 3
    # One step of the seed recipe on raw uint8 images (crop, flip, BatchNorm) changes the weights.
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    before = net.fc.weight.clone()
    options = {**recipe(load_config(CONFIGS["resnet18"]).train), "epochs": 1, "batch_size": 16}
    fit(model, x, torch.arange(16) % 10, seed=0, **options)
    assert not torch.equal(before, net.fc.weight) and torch.isfinite(net.fc.weight).all()


def test_fastnet_cost_from_its_layer_shapes():
    # whiten 2x2 3->24 on 31x31; block convs 24->64 @32, 64->64 @16, 64->256 @16, 256->256 @8,
    # 256->256 @8, 256->256 @4 (pool after each block's first conv); head 256->10.
    macs = (31 * 31 * 24 * 12 + 31 * 31 * 64 * 24 * 9 + 15 * 15 * 64 * 64 * 9
            + 15 * 15 * 256 * 64 * 9 + 7 * 7 * 256 * 256 * 9 + 7 * 7 * 256 * 256 * 9
            + 3 * 3 * 256 * 256 * 9 + 256 * 10)
    assert forward_flops(spec_of("fast")) == 2 * macs


def test_the_model_takes_raw_uint8_in_either_layout(archive):
    root, _, _ = archive
    x = torch.from_numpy(cifar.load(root)[0][:4])
    norm = Normalize(list(cifar.MEAN), list(cifar.STD))
    expected = (x.float() - torch.tensor(cifar.MEAN).view(1, 3, 1, 1)) / torch.tensor(
        cifar.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x.permute(0, 2, 3, 1).contiguous()), expected)
    model = init_model(spec_of("fast", "model.widths=[8, 16, 16]"), 0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.permute(0, 2, 3, 1).contiguous()))
    assert "0.mean" not in model.state_dict()  # constants come from the spec, not the checkpoint


def test_fresh_model_reuses_one_module_with_each_seeds_weights():
    spec = spec_of("fast", "model.widths=[8, 16, 16]")
    a = fresh_model(spec, 3, "cpu")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    b = fresh_model(spec, 4, "cpu")
    assert b is a
    for key, value in init_model(spec, 4).state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


def test_whitening_layer_whitens_the_training_patches(archive):
    root, _, _ = archive
    x = torch.from_numpy(cifar.load(root)[0])
    model = init_model(spec_of("fast", "model.widths=[8, 16, 16]"), 0)
    before = model[-1].whiten.weight.clone()
    init_from_data(model, x)
    w = model[-1].whiten.weight[:12].reshape(12, 12).double()  # v / sqrt(l + eps), rows
    patches = model[0](x).unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    cov = (patches.T @ patches / len(patches)).double()
    torch.testing.assert_close(w @ cov @ w.T, torch.eye(12, dtype=torch.float64), atol=2e-3,
                               rtol=0)
    assert not torch.equal(before, model[-1].whiten.weight)
    torch.testing.assert_close(model[-1].whiten.weight[12:], -model[-1].whiten.weight[:12])


# ---------------------------------------------------------------- augmentation and training


def test_crop_flip_matches_a_per_image_crop_and_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=gen)
    shifts, flips = draw(6, padding=2, flip=True, generator=gen)
    out = crop_flip(images, shifts, flips, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        r, c = shifts[i].tolist()
        want = padded[i, :, r:r + 8, c:c + 8]
        want = want.flip(-1) if flips[i] else want
        assert torch.equal(out[i], want), i
    assert torch.equal(crop_flip(images, None, None, 0), images)
    assert flips.any() and not flips.all() and (shifts != 2).any()


def _tiny_fit(x, y, seed=0, **overrides):
    spec = spec_of("fast", "model.widths=[8, 16, 16]")
    options = {**recipe(load_config(CONFIGS["fast"]).train), "epochs": 1, "batch_size": 40,
               **overrides}
    model = init_model(spec, 0)
    init_from_data(model, x)
    return fit(model, x, y, seed=seed, **options)


def test_speed_options_are_ignored_on_cpu_and_augmentation_is_seeded(archive, monkeypatch):
    root, _, _ = archive
    x, y, _ = cifar.load(root)
    x, y = torch.from_numpy(x[:100]), torch.from_numpy(y[:100])
    plain = _tiny_fit(x, y, precision="fp32", channels_last=False, compile="none")

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called on CPU")

    monkeypatch.setattr(torch, "compile", no_compile)
    fast = _tiny_fit(x, y, precision="bf16", channels_last=True, compile="max-autotune")
    for a, b in zip(plain.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(a, b)
    assert fast[-1].blocks[0].conv1.weight.is_contiguous()  # no channels_last on CPU
    again = _tiny_fit(x, y)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), again.parameters()))
    other = _tiny_fit(x, y, seed=1)
    assert not torch.equal(plain[-1].head.weight, other[-1].head.weight)


def test_sgd_matches_torch_optim_on_several_tensors():
    for nesterov in (True, False):
        torch.manual_seed(0)
        ours_p = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True),
                  torch.randn(2, requires_grad=True)]
        ref_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
        ours = SGD(ours_p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        ref = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        for step in range(4):
            for params, opt in ((ours_p, ours), (ref_p, ref)):
                opt.zero_grad()
                # The last tensor gets no gradient in the first two steps (frozen, then trained).
                used = params if step >= 2 else params[:2]
                sum(((p ** 2).sum() * (step + 1 + i) for i, p in enumerate(used))).backward()
                opt.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b)


def test_triangle_schedule_rises_then_falls():
    lrs = [scheduled_lr("triangle", 1.5, s, 100) for s in (0, 23, 100)]
    assert lrs == pytest.approx([0.3, 1.5, 0.105])
    assert scheduled_lr("cosine", 1.0, 50, 100) == pytest.approx(0.5)


# ---------------------------------------------------------------- end to end


# N = 6: the report's calibrated ceiling needs at least 6 reference models (metrics.py). The
# full-width ResNet-18 costs seconds per step on this 2-core CPU, so its run here is 1/4 as wide
# (1/16 the FLOPs); test_resnet18_is_the_cifar_form_with_its_known_cost checks the real one.
@pytest.mark.parametrize("name,extra", [("fast", []),
                                        ("resnet18", ["model.widths=[16,32,64,128]"])])
def test_config_end_to_end_on_the_tiny_archive(archive, tmp_path, name, extra):
    root, _, _ = archive
    store = tmp_path / name
    runner = CliRunner()
    sets = [x for s in [f"data.root={root}", *TINY[:-1], *extra] for x in ("--set", s)]
    common = ["--store", str(store), "--device", "cpu", "--workers", "1"]
    result = runner.invoke(app, ["train-refs", "--config", str(CONFIGS[name]), "--num-models", "6",
                                 *common, *sets])
    assert result.exit_code == 0, result.output
    assert "6 reference model(s) trained" in " ".join(result.output.split())
    method = "finetune"
    result = runner.invoke(app, ["apply", "--method", method, *common,
                                 "--set", "method.finetune.epochs=1",
                                 "--set", "method.finetune.batch_size=50"])
    assert result.exit_code == 0, result.output
    s = Store(store)
    assert s.done_seeds(REFERENCE) == list(range(6))
    assert s.done_seeds(UNLEARNED, method) == [1_000_000 + i for i in range(6)]
    arrays, meta = s.load_outputs(REFERENCE, 1)
    assert arrays["forget_logits"].shape == (50, 10) and arrays["test_logits"].shape == (20, 10)
    assert arrays["retain_loss"].shape == (50,) and np.isfinite(arrays["retain_loss"]).all()
    assert meta["wall_seconds"] > 0 and meta["device"] == "cpu"
    spec = s.load_model(REFERENCE, 0)["model"]
    assert spec["arch"] == ("fastnet" if name == "fast" else "resnet18")
    assert spec["normalize"]["mean"][0] == pytest.approx(0.4914 * 255)
    # score reads only the stored outputs (unlearn_cli/metrics.py).
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["score", "--store", str(store), "--bootstrap", "0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())  # one method scored: the report itself
    assert report["method"] == method and 0 <= report["forget_quality"] <= 1
