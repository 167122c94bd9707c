"""Datasets, forget sets and models beyond the defaults, as a user meets them: each dataset kind
written in its real on-disk layout and run through the real reader and the three commands; each
forget-set kind; a torchvision model and a plugin model; and every bad input through the CLI (one
`error:` line, exit 1, the store unchanged)."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import tree_digest
from typer.testing import CliRunner

from unlearn_cli import cifar, data, imagefolder, svhn
from unlearn_cli.cli import app
from unlearn_cli.config import load_config
from unlearn_cli.data import load_dataset, make_split
from unlearn_cli.store import REFERENCE, Store

runner = CliRunner()
# Tiny runs: 1 epoch, one batch per epoch (BatchNorm sees more than one example), in-process.
TINY = ["train.epochs=1", "train.batch_size=256", "model.hidden=[16]",
        "method.finetune.epochs=1", "method.finetune.batch_size=256"]
COMMON = ["--device", "cpu", "--workers", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def sets(*items):
    return [x for s in items for x in ("--set", s)]


def error_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def three_commands(store, *extra, n=3):
    """train-refs, apply finetune, score through the CLI; returns the JSON report."""
    code, out = invoke("train-refs", "--num-models", n, "--store", store, *COMMON,
                       *sets(*TINY, *extra))
    assert code == 0, out
    code, out = invoke("apply", "--method", "finetune", "--store", store, *COMMON)
    assert code == 0, out
    report = store.parent / f"{store.name}.json"
    code, out = invoke("score", "--store", store, "--bootstrap", "0", "--out", report)
    assert code == 0, out
    return json.loads(report.read_text())


# ---------------------------------------------------------------- archives in their real layouts


def write_cifar100(root, n_train=60, n_test=20, seed=0):
    """torchvision's cifar-100-python/ layout: `train` and `test` pickles with fine labels."""
    folder = root / cifar.CIFAR100.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, k in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 5, k)]
        batch = {b"filenames": [b"x.png"] * k, b"batch_label": b"b", b"fine_labels": fine,
                 b"coarse_labels": [f // 5 for f in fine], b"data": pixels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        out[name] = (pixels, np.array(fine))
    return out


def write_svhn(root, n_train=50, n_test=20, seed=0, labels=None):
    """torchvision's SVHN files: X uint8 [32, 32, 3, n], y [n, 1] in 1..10 (10 = digit 0)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    out = {}
    for name, k in ((svhn.TRAIN_FILE, n_train), (svhn.TEST_FILE, n_test)):
        x = rng.integers(0, 256, (32, 32, 3, k), dtype=np.uint8)
        y = rng.integers(1, 11, (k, 1)).astype(np.uint8) if labels is None else labels(k)
        scipy.io.savemat(root / name, {"X": x, "y": y})
        out[name] = (x, y)
    return out


def write_imagefolder(root, seed=0):
    """train/<class>/ and test/<class>/ images of mixed formats, sizes and modes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    formats = [(".png", "RGB"), (".jpg", "RGB"), (".bmp", "L"), (".png", "RGBA")]
    for part, per_class in (("train", 8), ("test", 3)):
        for cls in ("cat", "dog", "emu"):
            folder = root / part / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                ext, mode = formats[i % len(formats)]
                h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
                pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                    folder / f"{i:02d}{ext}")
    (root / "train" / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped


def write_arrays(path, *, kind="nhwc", n_train=48, n_test=16, seed=0, **override):
    rng = np.random.default_rng(seed)
    shapes = {"nhwc": (16, 16, 3), "nchw": (3, 16, 16), "gray": (16, 16), "features": (12,)}
    arrays = {}
    for part, k in (("train", n_train), ("test", n_test)):
        shape = (k, *shapes[kind])
        arrays[f"x_{part}"] = (rng.normal(size=shape).astype(np.float32) if kind == "features"
                               else rng.integers(0, 256, shape, dtype=np.uint8))
        arrays[f"y_{part}"] = np.arange(k) % 4
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------- readers


def test_cifar100_reader_keeps_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    ds = load_dataset(load_config(None, ["data.dataset=cifar100", f"data.root={tmp_path}"]).data)
    assert ds.x.shape == (80, 3, 32, 32) and ds.x.dtype == torch.uint8 and ds.test_count == 20
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.x[:60].reshape(60, -1).numpy(), written["train"][0])
    np.testing.assert_array_equal(ds.y.numpy(), np.concatenate([written["train"][1],
                                                                written["test"][1]]))
    # Normalisation from the training images' own statistics, per channel (pixel units).
    red = written["train"][0][:, :1024].astype(np.float64)
    assert ds.mean[0] == pytest.approx(red.mean()) and ds.std[0] == pytest.approx(red.std())


def test_svhn_reader_maps_10_to_0_and_transposes(tmp_path):
    written = write_svhn(tmp_path)
    x, y, n_test = svhn.load(tmp_path)
    tx, ty = written[svhn.TRAIN_FILE]
    assert x.shape == (70, 3, 32, 32) and n_test == 20
    assert x[4, 1, 7, 9] == tx[7, 9, 1, 4]  # [H, W, C, n] -> [n, C, H, W]
    np.testing.assert_array_equal(y[:50], ty[:, 0] % 10)
    assert (y[:50][ty[:, 0] == 10] == 0).all() and (ty == 10).any()


def test_imagefolder_reader_resizes_and_caches(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "imgs")
    x, y, n_test, classes, meta = imagefolder.load(tmp_path / "imgs", 16, tmp_path / "cache")
    assert classes == ["cat", "dog", "emu"] and x.shape == (33, 3, 16, 16) and n_test == 9
    assert y.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [0, 0, 0, 1, 1, 1, 2, 2, 2]
    from PIL import Image, ImageOps

    with Image.open(tmp_path / "imgs" / "train" / "dog" / "01.jpg") as img:
        want = np.asarray(ImageOps.fit(img.convert("RGB"), (16, 16),
                                     method=Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(x[9], want)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / imagefolder.CACHE_NAME).write_bytes(imagefolder.cache_bytes(x, meta))
    monkeypatch.setattr(imagefolder, "decode", lambda *a: pytest.fail("decoded again"))
    again = imagefolder.load(tmp_path / "imgs", 16, tmp_path / "cache")
    np.testing.assert_array_equal(again[0], x)
    assert again[4] is None  # nothing to write: the cache was used
    # A changed file makes the cache stale: it is decoded again.
    (tmp_path / "imgs" / "test" / "emu" / "00.png").unlink()
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        imagefolder.load(tmp_path / "imgs", 16, tmp_path / "cache")


@pytest.mark.parametrize("kind", ["nhwc", "nchw", "gray", "features"])
def test_arrays_reader_tells_layouts_apart(tmp_path, kind):
    written = write_arrays(tmp_path / "d.npz", kind=kind)
    ds = load_dataset(load_config(None, ["data.dataset=arrays",
                                         f"data.root={tmp_path / 'd.npz'}"]).data)
    first = written["x_train"][0]
    if kind == "features":
        assert ds.x.shape == (64, 12) and ds.x.dtype == torch.float32 and ds.mean is None
        np.testing.assert_array_equal(ds.x[0].numpy(), first)
        return
    want = {"nhwc": lambda: first.transpose(2, 0, 1), "nchw": lambda: first,
            "gray": lambda: first[None]}[kind]()
    assert ds.x.shape == (64, *want.shape) and ds.x.dtype == torch.uint8
    np.testing.assert_array_equal(ds.x[0].numpy(), want)
    assert ds.num_classes == 4 and ds.test_count == 16


# ---------------------------------------------------------------- forget sets


def _split(dataset, *extra, root="."):
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.root={root}", *extra])
    ds = load_dataset(cfg.data)
    return ds, make_split(ds.y.numpy(), cfg.data, test_count=ds.test_count,
                          num_classes=ds.num_classes)


def test_forget_kinds_pick_the_named_training_examples(tmp_path):
    npz = tmp_path / "d.npz"
    write_arrays(npz, kind="features")
    ds, split = _split("arrays", "data.forget={kind: class, classes: [1, 3]}", root=npz)
    np.testing.assert_array_equal(split["forget"], [i for i in range(48) if i % 4 in (1, 3)])
    (tmp_path / "idx.txt").write_text("# forget these\n5\n\n2\n47\n")
    _, split = _split("arrays", f"data.forget={{kind: indices, file: {tmp_path / 'idx.txt'}}}",
                      root=npz)
    np.testing.assert_array_equal(split["forget"], [2, 5, 47])
    assert len(split["retain"]) == 45 and len(split["test"]) == 16
    # Digits: indices count the training examples after the stratified split, in order.
    np.save(tmp_path / "idx.npy", np.array([0, 10]))
    _, base = _split("digits")
    _, split = _split("digits", f"data.forget={{kind: indices, file: {tmp_path / 'idx.npy'}}}")
    np.testing.assert_array_equal(split["forget"], base["train"][[0, 10]])


def test_the_short_form_and_the_long_random_form_are_one_experiment():
    short = load_config(None, ["data.forget_size=0.1"])
    long = load_config(None, ["data.forget={kind: random, size: 0.1}"])
    assert short.identity_hash() == long.identity_hash()
    labels = load_dataset(short.data).y.numpy()
    for key, value in make_split(labels, short.data).items():
        np.testing.assert_array_equal(value, make_split(labels, long.data)[key])


# ---------------------------------------------------------------- end to end, each kind


@pytest.mark.slow
def test_cifar100_with_a_class_forget_set_end_to_end(tmp_path):
    written = write_cifar100(tmp_path / "data")
    store = tmp_path / "s"
    report = three_commands(store, "data.dataset=cifar100", f"data.root={tmp_path / 'data'}",
                            "data.forget={kind: class, classes: [1, 2]}")
    labels = written["train"][1]
    split = Store(store).load_split()
    np.testing.assert_array_equal(split["forget"], np.flatnonzero(np.isin(labels, [1, 2])))
    gone = np.isin(written["test"][1], [1, 2])
    for key, mask in (("test_accuracy_forgotten_classes", gone),
                      ("test_accuracy_remaining_classes", ~gone)):
        acc = report["utility"][key]
        assert 0 <= acc["unlearned"] <= 1 and 0 <= acc["retrained"] <= 1
        # Worked out from the stored outputs: the mean accuracy on that side of the test set.
        logits = np.stack([Store(store).load_outputs(REFERENCE, s)[0]["test_logits"]
                           for s in range(3)])
        want = (logits[:, mask].argmax(-1) == written["test"][1][mask]).mean()
        assert acc["retrained"] == pytest.approx(want)
    exp = json.loads((store / "experiment.json").read_text())
    assert exp["data"]["dataset"] == "cifar100" and len(exp["data"]["fingerprint"]) == 16


@pytest.mark.slow
def test_svhn_with_an_index_file_end_to_end(tmp_path):
    write_svhn(tmp_path)
    np.save(tmp_path / "forget.npy", np.array([3, 1, 40, 7]))
    store = tmp_path / "s"
    report = three_commands(store, "data.dataset=svhn", f"data.root={tmp_path}",
                            f"data.forget={{kind: indices, file: {tmp_path / 'forget.npy'}}}")
    assert Store(store).load_split()["forget"].tolist() == [1, 3, 7, 40]
    assert report["num_forget_examples"] == 4 and "test_accuracy_forgotten_classes" not in \
        report["utility"]


PLUGIN = '''
import torch


def build(num_classes, input_shape):
    """A small conv net for any image size."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(input_shape[0], 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def wrong(num_classes, input_shape):
    return torch.nn.Flatten()
'''


@pytest.mark.slow
def test_imagefolder_with_a_plugin_model_end_to_end(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "imgs")
    (tmp_path / "my_models.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)  # the plugin path is relative to the current folder
    store = tmp_path / "s"
    three_commands(store, "data.dataset=imagefolder", "data.root=imgs", "data.image_size=16",
                   "model.arch=my_models.py:build", "data.forget_size=4")
    spec = Store(store).load_model(REFERENCE, 0)["model"]
    assert spec["plugin"]["path"] == str(tmp_path / "my_models.py")
    assert spec["input_shape"] == [3, 16, 16] and spec["num_classes"] == 3
    assert (store / "data" / imagefolder.CACHE_NAME).is_file()
    # The checkpoint loads with weights_only=True and the stored spec rebuilds the model.
    payload = torch.load(store / "reference" / "seed-000000" / "model.pt", weights_only=True)
    from unlearn_cli.models import build_model

    model = build_model(payload["model"])
    model.load_state_dict(payload["state_dict"])
    # A second run in another folder reads the decoded images from the store's cache.
    load_dataset.cache_clear()
    monkeypatch.setattr(imagefolder, "decode", lambda *a: pytest.fail("decoded again"))
    monkeypatch.chdir(tmp_path / "imgs")
    code, out = invoke("train-refs", "--num-models", 4, "--store", store, *COMMON,
                       *sets("data.root=."))
    assert code == 0, out
    assert Store(store).done_seeds(REFERENCE) == [0, 1, 2, 3]


@pytest.mark.slow
def test_arrays_with_a_torchvision_model_end_to_end(tmp_path):
    # ShuffleNet: torchvision's ResNet-18 costs ~0.5 s per step of 16 tiny images on this CPU.
    write_arrays(tmp_path / "d.npz", kind="nhwc", n_train=24, n_test=8)
    store = tmp_path / "s"
    report = three_commands(store, "data.dataset=arrays", f"data.root={tmp_path / 'd.npz'}",
                            "model.arch=torchvision:shufflenet_v2_x0_5", "data.forget_size=4")
    spec = Store(store).load_model(REFERENCE, 0)["model"]
    assert spec["arch"] == "torchvision:shufflenet_v2_x0_5" and spec["num_classes"] == 4
    from unlearn_cli.models import build_model

    assert build_model(spec)[-1].fc.out_features == 4
    assert report["num_forget_examples"] == 4


@pytest.fixture(scope="module")
def features_store(tmp_path_factory):
    """A finished store on arrays features with an index-file forget set and a plugin model."""
    root = tmp_path_factory.mktemp("feat")
    write_arrays(root / "d.npz", kind="features")
    (root / "idx.txt").write_text("0\n1\n2\n3\n")
    (root / "plug.py").write_text(
        "import torch\n\ndef build(k, shape):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(shape[0], 8), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(8, k))\n")
    store = root / "s"
    report = three_commands(store, "data.dataset=arrays", f"data.root={root / 'd.npz'}",
                            f"data.forget={{kind: indices, file: {root / 'idx.txt'}}}",
                            f"model.arch={root / 'plug.py'}:build")
    assert report["num_forget_examples"] == 4
    return root, store


@pytest.mark.slow
def test_changed_data_or_plugin_refuses_the_old_store(features_store, tmp_path):
    import shutil

    root, made = features_store
    store = tmp_path / "s"
    shutil.copytree(made, store)
    before = tree_digest(store)
    saved = (root / "d.npz").read_bytes()
    arrays = dict(np.load(root / "d.npz"))
    arrays["x_train"][5, 0] += 1.0  # one feature of one training example
    np.savez(root / "d.npz", **arrays)
    try:
        for args in (["train-refs", "--num-models", 4], ["apply", "--method", "finetune"]):
            code, out = invoke(*args, "--store", store, *COMMON)
            assert code == 1
            line = error_line(out)
            assert "made from other data: the arrays dataset at" in line, line
            assert "restore the data" in line
        assert tree_digest(store) == before
    finally:
        (root / "d.npz").write_bytes(saved)
    # The fix it names works: with the data restored, the store is used again.
    load_dataset.cache_clear()
    code, out = invoke("apply", "--method", "none", "--store", store, *COMMON)
    assert code == 0, out
    # A changed plugin file is refused the same way.
    plugin = root / "plug.py"
    text = plugin.read_text()
    plugin.write_text(text + "\n# edited\n")
    try:
        before = tree_digest(store)
        code, out = invoke("apply", "--method", "finetune", "--store", store, *COMMON,
                           "--num-models", 4)
        assert code == 1 and "changed since the model was made" in error_line(out)
        assert tree_digest(store) == before
    finally:
        plugin.write_text(text)


# ---------------------------------------------------------------- bad input: one line, exit 1


def _bad_pickle(root):
    write_cifar100(root)
    bad = {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}
    (root / cifar.CIFAR100.folder / "test").write_bytes(pickle.dumps(bad, protocol=2))


def _folder_with(root, name, content):
    write_imagefolder(root)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)


BAD = {
    "cifar100 missing": (lambda r: None, ["data.dataset=cifar100"],
                         "CIFAR-100 not found: "),
    "cifar100 wrong shape": (_bad_pickle, ["data.dataset=cifar100"],
                             "is not a CIFAR-100 batch: expected 'data' uint8 [k, 3072] and "
                             "'fine_labels'"),
    "svhn missing": (lambda r: None, ["data.dataset=svhn"], "SVHN not found: "),
    "svhn label 11": (lambda r: write_svhn(r, labels=lambda k: np.full((k, 1), 11, np.uint8)),
                      ["data.dataset=svhn"], "train_32x32.mat is not an SVHN file"),
    "svhn not a mat": (lambda r: [(r / n).write_text("hello") for n in (svhn.TRAIN_FILE,
                                                                        svhn.TEST_FILE)],
                       ["data.dataset=svhn"], "cannot be read as an SVHN .mat file"),
    "imagefolder missing": (lambda r: None, ["data.dataset=imagefolder"], "imagefolder: "),
    "imagefolder empty class": (lambda r: _folder_with(r, "train/fox", None),
                                ["data.dataset=imagefolder"], "the class folder"),
    "imagefolder not an image": (lambda r: _folder_with(r, "train/dog/notes.png", b"not png"),
                                 ["data.dataset=imagefolder"], "notes.png is not an image"),
    "imagefolder unknown test class": (lambda r: _folder_with(r, "test/fox/a.png", b"x"),
                                       ["data.dataset=imagefolder"], "is a class that"),
    "arrays missing": (lambda r: None, ["data.dataset=arrays", "data.root=nope.npz"],
                       "is not a file"),
    "arrays missing key": (lambda r: np.savez(r / "d.npz", x_train=np.zeros((2, 3))),
                           ["data.dataset=arrays", "data.root=d.npz"], "lacks y_train, x_test"),
    "arrays no channel axis": (
        lambda r: write_arrays(r / "d.npz", x_train=np.zeros((48, 5, 5, 5), np.uint8)),
        ["data.dataset=arrays", "data.root=d.npz"], "neither axis 1 nor axis 3"),
    "arrays test label out of range": (
        lambda r: write_arrays(r / "d.npz", y_test=np.full(16, 9)),
        ["data.dataset=arrays", "data.root=d.npz"], "y_test holds the label 9"),
    "arrays float labels": (
        lambda r: write_arrays(r / "d.npz", y_train=np.zeros(48)),
        ["data.dataset=arrays", "data.root=d.npz"], "expected integer labels"),
    "arrays pickled objects": (
        lambda r: np.savez(r / "d.npz", x_train=np.array([{}], dtype=object), y_train=[0],
                           x_test=[[0.0]], y_test=[0]),
        ["data.dataset=arrays", "data.root=d.npz"], "cannot be read as an .npz of plain arrays"),
    "forget duplicates": (lambda r: (r / "i.txt").write_text("1\n2\n1\n"),
                          ["data.forget={kind: indices, file: i.txt}"], "more than once"),
    "forget out of range": (lambda r: np.save(r / "i.npy", np.array([0, 5000])),
                            ["data.forget={kind: indices, file: i.npy}"],
                            "outside 0..1346 (e.g. 5000)"),
    "forget not integers": (lambda r: (r / "i.txt").write_text("1\nseven\n"),
                            ["data.forget={kind: indices, file: i.txt}"],
                            "line 2: 'seven' is not an integer"),
    "forget empty file": (lambda r: (r / "i.txt").write_text("# none\n"),
                          ["data.forget={kind: indices, file: i.txt}"], "holds no indices"),
    "forget missing file": (lambda r: None, ["data.forget={kind: indices, file: i.npy}"],
                            "does not exist"),
    "forget whole train": (lambda r: np.save(r / "i.npy", np.arange(1347)),
                           ["data.forget={kind: indices, file: i.npy}"],
                           "is the whole training set"),
    "forget every class": (lambda r: None,
                           ["data.forget={kind: class, classes: [0,1,2,3,4,5,6,7,8,9]}"],
                           "is the whole training set"),
    "forget unknown class": (lambda r: None, ["data.forget={kind: class, classes: [3, 12]}"],
                             "data.forget.classes [12] are not classes"),
    "forget duplicate class": (lambda r: None, ["data.forget={kind: class, classes: [3, 3]}"],
                               "expected distinct class labels"),
    "forget empty class list": (lambda r: None, ["data.forget={kind: class}"],
                                "data.forget.classes: expected distinct"),
    "forget bad kind": (lambda r: None, ["data.forget={kind: some}"], "data.forget.kind"),
    "forget random too big": (lambda r: None, ["data.forget={kind: random, size: 1347}"],
                              "data.forget.size=1347.0 gives 1347 forget examples"),
    "torchvision unknown": (lambda r: write_arrays(r / "d.npz"),
                            ["data.dataset=arrays", "data.root=d.npz",
                             "model.arch=torchvision:resnet7"],
                            "has no classification model 'resnet7'"),
    "torchvision on features": (lambda r: write_arrays(r / "d.npz", kind="features"),
                                ["data.dataset=arrays", "data.root=d.npz",
                                 "model.arch=torchvision:resnet18"], "needs images [C, H, W]"),
    "plugin missing": (lambda r: None, ["model.arch=nowhere.py:build"], "does not exist"),
    "plugin wrong output": (lambda r: (r / "m.py").write_text(PLUGIN),
                            ["model.arch=m.py:wrong"], "expected logits [2, 10]"),
    "plugin bad module": (lambda r: None, ["model.arch=no_such_pkg.mod:build"],
                          "cannot find module 'no_such_pkg.mod'"),
    "fastnet too small": (lambda r: write_arrays(r / "d.npz", kind="gray",
                                                 x_train=np.zeros((48, 8, 8), np.uint8),
                                                 x_test=np.zeros((16, 8, 8), np.uint8)),
                          ["data.dataset=arrays", "data.root=d.npz", "model.arch=fastnet",
                           "model.widths=[4, 4, 4]", "data.forget_size=4"],
                          "model.arch fastnet cannot take the arrays inputs [1, 8, 8]"),
    "flip on features": (lambda r: write_arrays(r / "d.npz", kind="features"),
                         ["data.dataset=arrays", "data.root=d.npz", "train.flip=true"],
                         "train.flip false for the arrays features"),
    "download imagefolder": (lambda r: None, ["data.dataset=imagefolder", "data.download=true"],
                             "data.download: expected false for imagefolder"),
    "image size for cifar": (lambda r: None, ["data.dataset=cifar100", "data.image_size=64"],
                             "data.image_size: expected no value for cifar100"),
}


@pytest.mark.parametrize("case", list(BAD), ids=lambda c: c.replace(" ", "-"))
def test_bad_input_is_one_line_and_leaves_no_store(tmp_path, monkeypatch, case):
    setup, extra, expected = BAD[case]
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    load_dataset.cache_clear()
    code, out = invoke("train-refs", "--num-models", 2, "--store", tmp_path / "s", *COMMON,
                       *sets(f"data.root={tmp_path}", *extra))
    assert code == 1, out
    assert expected in error_line(out), out
    assert not (tmp_path / "s").exists()


def test_fixing_what_the_error_names_makes_the_run_work(tmp_path, monkeypatch):
    """The duplicate-index error says: list each index once. Doing so works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "i.txt").write_text("4\n9\n4\n")
    args = ["train-refs", "--num-models", 1, "--store", tmp_path / "s", *COMMON,
            *sets("data.forget={kind: indices, file: i.txt}", "train.epochs=1")]
    code, out = invoke(*args)
    assert code == 1 and "list each training index once" in error_line(out)
    (tmp_path / "i.txt").write_text("4\n9\n")
    code, out = invoke(*args)
    assert code == 0, out
    assert len(Store(tmp_path / "s").load_split()["forget"]) == 2


def test_old_stores_keep_their_identity():
    """A config without the new keys hashes as before they existed (value pinned from the parent
    commit), so experiment.json's config_hash of every existing store still matches."""
    assert load_config(None).identity_hash() == "6ea97b5e1690c56b"
    assert data.DataConfig().forget.kind == ""


def test_a_module_plugin_is_recorded_and_checked(tmp_path, monkeypatch):
    from unlearn_cli.config import ModelConfig
    from unlearn_cli.errors import StoreError
    from unlearn_cli.models import build_model, check_sources, model_spec

    package = tmp_path / "zoo_pkg_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = model_spec(ModelConfig(arch="zoo_pkg_for_test.nets:build"), (3, 8, 8), 5,
                      mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0))
    assert spec["plugin"]["module"] == "zoo_pkg_for_test.nets"
    assert spec["plugin"]["path"] == str(package / "nets.py")
    model = build_model(spec)
    assert model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 5)
    (package / "nets.py").write_text(PLUGIN.replace("4, 3, padding", "5, 3, padding"))
    with pytest.raises(StoreError, match="changed since the model was made"):
        check_sources(spec)
    with pytest.raises(StoreError, match="changed since the model was made"):
        build_model(spec)


def test_a_store_made_before_fingerprints_stays_valid(tmp_path):
    """An experiment.json as the previous version wrote it (no data record, no model spec, no
    data.forget or data.image_size keys) is used as it is, and never rewritten."""
    store = tmp_path / "s"
    code, out = invoke("train-refs", "--num-models", 1, "--store", store, *COMMON,
                       *sets("train.epochs=1"))
    assert code == 0, out
    exp = json.loads((store / "experiment.json").read_text())
    for key in ("data", "model_spec"):
        del exp[key]
    for key in ("forget", "image_size"):
        del exp["config"]["data"][key]
    (store / "experiment.json").write_text(json.dumps(exp))
    before = (store / "experiment.json").read_bytes()
    code, out = invoke("train-refs", "--num-models", 2, "--store", store, *COMMON)
    assert code == 0, out
    code, out = invoke("apply", "--method", "none", "--store", store, *COMMON)
    assert code == 0, out
    assert (store / "experiment.json").read_bytes() == before
    assert Store(store).done_seeds(REFERENCE) == [0, 1]
