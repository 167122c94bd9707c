"""Datasets and the seeded train/test/forget/retain split.

A dataset is held whole in memory as tensors in its stored form: `x` [num_examples, *input_shape]
and `y` int64 [num_examples]. For digits, `x` is float32 in [0, 1] [n, 64]; for CIFAR-10 it is the
raw uint8 pixels [n, 3, 32, 32] (NCHW), 184 MB for all 60,000 images, which fits on any GPU and
is 4x smaller than float32.

The data -> model contract: a model takes batches of `x` exactly as stored. Image models begin with
a normalisation layer (`models.Normalize`, built from `Dataset.mean`/`std` and kept in the model
spec) that turns uint8 pixels into normalised float32, so `train_refs`, `apply`, every unlearning
method and `per_sample_outputs` all pass raw batches, and a checkpoint is usable on its own.
Augmentation (random crop, flip) is not part of the model: it is a `training.fit` option that the
train section's recipe turns on, applied to raw uint8 batches on the data's device.

The split is a dict of index arrays into the dataset; it is made once per experiment and kept in
the store, so every model of an experiment sees exactly the same forget and retain sets. Digits has
one pool that is split into train/test (stratified, `data.test_fraction`); CIFAR-10 has a fixed
test set (`test_batch`), stored last, so `data.test_fraction` does not apply to it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError

DATASETS = ("digits", "cifar10")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x: torch.Tensor  # noqa: F821  [num_examples, *input_shape], the stored form (see above)
    y: torch.Tensor  # noqa: F821  int64 [num_examples]
    num_classes: int
    # Examples at the end of x that form a fixed test set; 0 = none (drawn by data.test_fraction).
    test_count: int = 0
    # Per-channel mean and std of raw pixel values, for the model's normalisation layer; None for
    # data that is stored ready to use (digits).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@functools.lru_cache(maxsize=4)
def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the configured dataset (cached per process: workers call this once per job)."""
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


def make_split(labels: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The train/test split, then a seeded random forget set inside train.

    Train/test is the dataset's fixed split where it has one (CIFAR-10: the last `test_count`
    examples are the test set), else a seeded stratified split by `cfg.test_fraction` (digits).
    With `cfg.validation_size` > 0 a validation set is first taken out of train
    (`_hold_out_validation`). labels: int [num_examples]. Returns int64 index arrays `train`,
    `test`, `forget`, `retain` (each sorted; forget and retain partition train) and, only when
    asked for, `valid`.
    """
    labels = np.asarray(labels)
    fixed = fixed_test_count(cfg)
    if fixed:
        train, test = np.arange(len(labels) - fixed), np.arange(len(labels) - fixed, len(labels))
    else:
        train, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    valid = None
    if cfg.validation_size > 0:
        train, valid = _hold_out_validation(train, cfg)
    forget_count = (
        int(round(cfg.forget_size * len(train))) if cfg.forget_size < 1 else int(cfg.forget_size)
    )
    if not 1 <= forget_count < len(train):
        raise DataError(
            f"data.forget_size={cfg.forget_size} gives {forget_count} forget examples out of "
            f"{len(train)} training examples; expected between 1 and {len(train) - 1}: "
            "change --set data.forget_size"
        )
    rng = np.random.default_rng(cfg.split_seed)
    forget = np.sort(rng.choice(train, size=forget_count, replace=False))
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
