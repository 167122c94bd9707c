"""Datasets and the seeded train/test/forget/retain split.

A dataset is held whole in memory as tensors in its stored form: `x` [num_examples, *input_shape]
and `y` int64 [num_examples]. For digits, `x` is float32 in [0, 1] [n, 64]; for every image dataset
(cifar10, cifar100, svhn, imagefolder, arrays of images) it is the raw uint8 pixels [n, C, H, W]
(NCHW): CIFAR-10's 60,000 images take 184 MB, which fits on any GPU and is 4x smaller than float32;
`arrays` of features are float32 [n, d] as given.

The data -> model contract: a model takes batches of `x` exactly as stored. Image models begin with
a normalisation layer (`models.Normalize`, built from `Dataset.mean`/`std` and kept in the model
spec) that turns uint8 pixels into normalised float32, so `train_refs`, `apply`, every unlearning
method and `per_sample_outputs` all pass raw batches, and a checkpoint is usable on its own.
Augmentation (random crop, flip) is not part of the model: it is a `training.fit` option that the
train section's recipe turns on, applied to raw uint8 batches on the data's device.

The split is a dict of index arrays into the dataset; it is made once per experiment and kept in
the store, so every model of an experiment sees exactly the same forget and retain sets. Digits has
one pool that is split into train/test (stratified, `data.test_fraction`); every other dataset has a
fixed test set, stored last, so `data.test_fraction` does not apply to it.

The forget set (`data.forget`, or its short form `data.forget_size`) is drawn inside train: `random`
(a seeded draw of a count or a fraction), `class` (every training example of some labels) or
`indices` (a file of positions in the training set, in the order the reader yields it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config import DATASETS, DataConfig
from .errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x: torch.Tensor  # noqa: F821  [num_examples, *input_shape], the stored form (see above)
    y: torch.Tensor  # noqa: F821  int64 [num_examples]
    num_classes: int
    # Examples at the end of x that form a fixed test set; 0 = none (drawn by data.test_fraction).
    test_count: int = 0
    # Per-channel mean and std of raw pixel values, for the model's normalisation layer; None for
    # data that is stored ready to use (digits, features).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # imagefolder: writes the decoded-image cache into the store (call it once the store is
    # being written); None when there is nothing to write.
    write_cache: Callable[[], None] | None = dataclasses.field(default=None, compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_images(self) -> bool:
        return self.x.dim() == 4

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the content (every input and label, the test count): 16 hex digits.

        Stored in experiment.json, so a changed dataset is refused by an old store. Computed once
        per command, over the arrays in place (no copy).
        """
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.name}:{self.test_count}:{self.num_classes}:{self.x.dtype}:"
                 f"{list(self.x.shape)}".encode())
        for t in (self.x, self.y):
            h.update(np.ascontiguousarray(t.numpy()).data)
        return h.hexdigest()


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (pixel units) of uint8 images [n, C, H, W], from a 256-bin
    histogram per channel: exact, and faster than float arithmetic over every pixel."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var**0.5, 1.0))  # a constant channel: no division by ~0
    return tuple(means), tuple(stds)


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray, test_count: int,
                 num_classes: int, **extra) -> Dataset:
    """A Dataset from numpy arrays; uint8 images get channel statistics of their training part."""
    import torch

    mean = std = None
    if x.dtype == np.uint8:
        mean, std = _channel_stats(x[: len(x) - test_count])
    return Dataset(name, torch.from_numpy(x), torch.from_numpy(y), num_classes=num_classes,
                   test_count=test_count, mean=mean, std=std, **extra)


@functools.lru_cache(maxsize=4)
def load_dataset(cfg: DataConfig, cache_dir: str | None = None) -> Dataset:
    """Load the configured dataset (cached per process: workers call this once per job).

    cache_dir: where a dataset that is slow to decode (imagefolder) keeps its decoded pixels, the
    store's `data/` folder; None = decode without a cache.
    """
    import torch

    if cfg.dataset == "digits":
        pixels, labels = _digits_arrays()
        # Pixels are counts 0..16 of an 8x8 grid; scale to [0, 1].
        x = torch.tensor(pixels / 16.0, dtype=torch.float32)
        y = torch.tensor(labels, dtype=torch.int64)
        return Dataset("digits", x, y, num_classes=10)
    if cfg.dataset == "cifar10":
        from . import cifar

        images, labels, test_count = cifar.load(cfg.root, allow_download=cfg.download)
        return Dataset("cifar10", torch.from_numpy(images), torch.from_numpy(labels),
                       num_classes=cifar.NUM_CLASSES, test_count=test_count, mean=cifar.MEAN,
                       std=cifar.STD)
    if cfg.dataset == "cifar100":
        from . import cifar

        images, labels, test_count = cifar.load(cfg.root, allow_download=cfg.download,
                                                variant=cifar.CIFAR100)
        return _from_arrays("cifar100", images, labels, test_count, cifar.CIFAR100.num_classes)
    if cfg.dataset == "svhn":
        from . import svhn

        images, labels, test_count = svhn.load(cfg.root, allow_download=cfg.download)
        return _from_arrays("svhn", images, labels, test_count, svhn.NUM_CLASSES)
    if cfg.dataset == "imagefolder":
        from . import imagefolder

        images, labels, test_count, classes, meta = imagefolder.load(cfg.root, cfg.image_size,
                                                                     cache_dir)
        write = None
        if meta is not None:
            def write() -> None:
                from .store import atomic_write_bytes

                path = Path(cache_dir) / imagefolder.CACHE_NAME
                atomic_write_bytes(path, imagefolder.cache_bytes(images, meta))

        return _from_arrays("imagefolder", images, labels, test_count, len(classes),
                            write_cache=write)
    if cfg.dataset == "arrays":
        from . import arrays

        x, y, test_count = arrays.load(cfg.root)
        return _from_arrays("arrays", x, y, test_count, int(y[: len(y) - test_count].max()) + 1)
    raise DataError(f"unknown dataset {cfg.dataset!r}; expected one of: {', '.join(DATASETS)}")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: pixels [1797, 64] in 0..16 and labels [1797].

    Read straight from the CSV that scikit-learn ships, because importing scikit-learn costs about
    1.2 s per process (measured), paid again by every worker; `load_digits` is the fallback.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset ships with scikit-learn, which is not installed; "
                        "run `make install`")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - layout changed upstream

    bunch = load_digits()
    return bunch.data, bunch.target


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split: the test set has ceil(test_fraction * n) examples (as
    scikit-learn counts them), each class giving its share rounded by largest remainder."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    target = int(np.ceil(test_fraction * n))
    exact = counts * test_fraction
    take = np.floor(exact).astype(int)
    # Hand out the remaining test slots to the classes with the largest fractional parts.
    for k in np.argsort(-(exact - take), kind="stable")[: target - take.sum()]:
        take[k] += 1
    test = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        test.append(rng.choice(members, size=k, replace=False))
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def fixed_test_count(cfg: DataConfig) -> int:
    """How many examples at the end of the dataset form its fixed test set (0: none)."""
    if cfg.dataset == "digits":
        return 0
    return load_dataset(cfg).test_count  # cached: the caller has just loaded it


def make_split(labels: np.ndarray, cfg: DataConfig, *, test_count: int | None = None,
               num_classes: int | None = None) -> dict[str, np.ndarray]:
    """The train/test split, then the forget set inside train (see the module's docstring).

    Train/test is the dataset's fixed split where it has one (the last `test_count` examples are the
    test set), else a seeded stratified split by `cfg.test_fraction` (digits). With
    `cfg.validation_size` > 0 a validation set is first taken out of train
    (`_hold_out_validation`). labels: int [num_examples]; test_count and num_classes default to the
    loaded dataset's. Returns int64 index arrays `train`, `test`, `forget`, `retain` (each sorted;
    forget and retain partition train) and, only when asked for, `valid`.
    """
    labels = np.asarray(labels)
    fixed = fixed_test_count(cfg) if test_count is None else test_count
    if fixed:
        train, test = np.arange(len(labels) - fixed), np.arange(len(labels) - fixed, len(labels))
    else:
        train, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    valid = None
    if cfg.validation_size > 0:
        train, valid = _hold_out_validation(train, cfg)
    kind = cfg.forget.kind or "random"
    if kind == "random":
        forget = _random_forget(train, cfg)
    elif kind == "class":
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if cfg.dataset != "digits" else 10
        forget = _class_forget(train, labels, cfg.forget.classes, num_classes, cfg.dataset)
    else:
        forget = _indices_forget(train, cfg.forget.file)
    if len(forget) >= len(train):
        raise DataError(
            f"the forget set ({_describe(cfg)}) is the whole training set of {len(train)} "
            "examples, which leaves no retain set to train reference models on; forget fewer"
        )
    retain = np.setdiff1d(train, forget)
    split = {
        "train": train.astype(np.int64),
        "test": test.astype(np.int64),
        "forget": forget.astype(np.int64),
        "retain": retain.astype(np.int64),
    }
    if valid is not None:  # absent otherwise: the split (and its hash) stay as they were
        split["valid"] = valid.astype(np.int64)
    return split


def _describe(cfg: DataConfig) -> str:
    f = cfg.forget
    if f.kind == "class":
        return f"data.forget classes {list(f.classes)}"
    if f.kind == "indices":
        return f"data.forget.file {f.file}"
    return f"data.forget.size={f.size}" if f.kind else f"data.forget_size={cfg.forget_size}"


def _random_forget(train: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """A seeded random draw of data.forget.size (or data.forget_size) training examples."""
    key = "data.forget.size" if cfg.forget.kind else "data.forget_size"
    size = cfg.forget.size if cfg.forget.kind else cfg.forget_size
    forget_count = int(round(size * len(train))) if size < 1 else int(size)
    if not 1 <= forget_count < len(train):
        raise DataError(
            f"{key}={size} gives {forget_count} forget examples out of {len(train)} training "
            f"examples; expected between 1 and {len(train) - 1}: change --set {key}"
        )
    # The same draw as before data.forget existed: stores made with forget_size keep their split.
    rng = np.random.default_rng(cfg.split_seed)
    return np.sort(rng.choice(train, size=forget_count, replace=False))


def _class_forget(train: np.ndarray, labels: np.ndarray, classes: tuple[int, ...],
                  num_classes: int, dataset: str) -> np.ndarray:
    """Every training example whose label is one of `classes`."""
    present = set(np.unique(labels[train]).tolist())
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise DataError(
            f"data.forget.classes {unknown} are not classes of the {dataset} training set (its "
            f"labels are 0..{num_classes - 1}"
            + (f"; {sorted(set(range(num_classes)) - present)} have no training examples"
               if len(present) < num_classes else "")
            + "); list labels that occur in training"
        )
    return train[np.isin(labels[train], classes)]


def read_indices(path_text: str) -> np.ndarray:
    """The indices in a .npy file (a 1-D integer array) or a text file (one integer a line; blank
    lines and lines starting with # are skipped) -> int64 [k]."""
    path = Path(path_text).expanduser()
    fix = ("give a .npy file of a 1-D integer array (np.save(path, indices)) or a text file "
           "with one training index a line")
    if not path.is_file():
        raise DataError(f"data.forget.file {path.resolve()} does not exist; {fix} (a relative "
                        "path counts from the current folder)")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"data.forget.file {path} cannot be read as .npy "
                            f"({type(exc).__name__}: {exc}); {fix}") from None
        if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "iu":
            what = (f"{values.dtype} {list(values.shape)}" if isinstance(values, np.ndarray)
                    else type(values).__name__)
            raise DataError(f"data.forget.file {path} holds {what}, not a 1-D integer array; "
                            f"{fix}")
        return values.astype(np.int64)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.forget.file {path} is not a text file ({type(exc).__name__}); "
                        f"{fix}") from None
    values = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise DataError(f"data.forget.file {path} line {number}: {text[:40]!r} is not an "
                            f"integer index; {fix}") from None
    return np.asarray(values, dtype=np.int64)


def _indices_forget(train: np.ndarray, path_text: str) -> np.ndarray:
    """train[i] for every index i in the file: indices count the training examples in order."""
    idx = read_indices(path_text)
    if len(idx) == 0:
        raise DataError(f"data.forget.file {path_text} holds no indices; list at least one "
                        "training index")
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        dups = values[counts > 1]
        raise DataError(f"data.forget.file {path_text} lists {len(dups)} index(es) more than once "
                        f"(e.g. {int(dups[0])}); list each training index once")
    bad = idx[(idx < 0) | (idx >= len(train))]
    if len(bad):
        raise DataError(f"data.forget.file {path_text} holds {len(bad)} index(es) outside "
                        f"0..{len(train) - 1} (e.g. {int(bad[0])}); indices count the "
                        f"{len(train)} training examples, in the order the dataset's reader "
                        "yields them")
    return np.sort(train[idx])


def _hold_out_validation(train: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train without the validation set, the validation set), both sorted index arrays.

    Drawn uniformly from train with its own random stream (split_seed, 1), before the forget set
    is drawn from what remains.
    """
    size = cfg.validation_size
    count = int(round(size * len(train))) if size < 1 else int(size)
    if not 1 <= count <= len(train) - 2:
        raise DataError(
            f"data.validation_size={size} gives {count} validation examples out of {len(train)} "
            f"training examples; expected between 1 and {len(train) - 2} (train must keep a "
            "forget and a retain example): change --set data.validation_size"
        )
    rng = np.random.default_rng([cfg.split_seed, 1])
    valid = np.sort(rng.choice(train, size=count, replace=False))
    return np.setdiff1d(train, valid), valid
