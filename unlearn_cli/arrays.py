"""Any data already in numpy: one .npz file at `data.root`.

The file holds four arrays (write it with `np.savez(path, x_train=..., y_train=..., x_test=...,
y_test=...)`):

- `x_train`, `x_test`: either images as uint8 [n, C, H, W] or [n, H, W, C] with C = 1 or 3 (told
  apart by where the 1 or 3 is; grayscale [n, H, W] is taken as C = 1), kept as uint8 NCHW; or
  features as floats [n, d], kept as float32 and fed to the model as they are;
- `y_train`, `y_test`: integer labels [n] in 0..K-1, where K = 1 + the largest training label.

It is read with `allow_pickle=False`: an object array (which would need code to load) is refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")
HOW = ("write it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...): images "
       "uint8 [n, C, H, W] or [n, H, W, C] (C = 1 or 3), or float features [n, d]; integer "
       "labels [n] from 0")


def _images_nchw(x: np.ndarray) -> np.ndarray | None:
    """uint8 images in NCHW, or None if the channel axis cannot be told."""
    if x.ndim == 3:  # grayscale [n, H, W]
        return x[:, None]
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if first and not last:
        return x
    if last and not first:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if first and last and x.shape[1] == x.shape[3]:  # [n, 3, H, 3]: take the usual NCHW
        return x
    return None


def _inputs(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    """Check one input array and bring it to the stored form (uint8 NCHW or float32 [n, d])."""
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        images = _images_nchw(x)
        if images is None:
            raise DataError(f"{path}: {name} has shape {list(x.shape)}, in which neither axis 1 "
                            "nor axis 3 holds 1 or 3 channels; give images as [n, C, H, W] or "
                            "[n, H, W, C] with C = 1 or 3")
        return images
    if x.dtype.kind == "f" and x.ndim == 2:
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {name} holds NaN or infinite values; replace them (for "
                            "example by the feature's mean) and save the file again")
        return x.astype(np.float32)
    raise DataError(f"{path}: {name} is {x.dtype} {list(x.shape)}; expected uint8 images [n, C, H, "
                    f"W] or [n, H, W, C], or float features [n, d]: {HOW}")


def load(root: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Read the .npz at `root`: inputs (uint8 [n, C, H, W] or float32 [n, d]) of train then test,
    labels int64 [n], and n_test."""
    path = Path(root).expanduser()
    if not path.is_file():
        where = path.resolve()
        raise DataError(f"arrays: {where} is not a file; point --set data.root=... at the .npz "
                        f"file ({HOW})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} cannot be read as an .npz of plain arrays ({type(exc).__name__}: "
                        f"{exc}); {HOW}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds one array (a .npy), not an .npz of four; {HOW}")
    with npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (it holds "
                            f"{', '.join(npz.files) or 'nothing'}); {HOW}")
        try:
            arrays = {k: npz[k] for k in KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path} cannot be read as an .npz of plain arrays "
                            f"({type(exc).__name__}: {exc}); {HOW}") from None
    xs = {k: _inputs(path, k, arrays[k]) for k in ("x_train", "x_test")}
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:] or xs["x_train"].dtype != xs[
            "x_test"].dtype:
        raise DataError(f"{path}: x_train {arrays['x_train'].dtype} {list(arrays['x_train'].shape)}"
                        f" and x_test {arrays['x_test'].dtype} {list(arrays['x_test'].shape)} "
                        "differ in kind or shape per example; give both in one form")
    for part in ("train", "test"):
        x, y = xs[f"x_{part}"], arrays[f"y_{part}"]
        if len(x) == 0:
            raise DataError(f"{path}: x_{part} is empty; give at least one example")
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
            raise DataError(f"{path}: y_{part} is {y.dtype} {list(y.shape)}; expected integer "
                            f"labels [{len(x)}], one per row of x_{part}")
        if y.min() < 0:
            raise DataError(f"{path}: y_{part} holds the label {int(y.min())}; labels are "
                            "0..K-1: renumber the classes from 0")
    num_classes = int(arrays["y_train"].max()) + 1
    if arrays["y_test"].max() >= num_classes:
        raise DataError(f"{path}: y_test holds the label {int(arrays['y_test'].max())}, which no "
                        f"training example has (training labels are 0..{num_classes - 1}); "
                        "drop those test examples or add training examples of that class")
    x = np.concatenate([xs["x_train"], xs["x_test"]])
    y = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    return x, y, len(arrays["y_test"])
