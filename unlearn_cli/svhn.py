"""SVHN (cropped digits) from disk, in torchvision's layout, read with scipy.

Layout (as torchvision downloads it, straight into `data.root`; `data.root/svhn/` works too):

    <data.root>/train_32x32.mat    73,257 training images
    <data.root>/test_32x32.mat     26,032 test images

Each file is a MATLAB v5 file with `X`: uint8 [32, 32, 3, n] (height, width, channel, image) and
`y`: [n, 1] labels 1..10, where 10 means the digit 0 (torchvision maps it to 0, as here).
`extra_32x32.mat` is not used. `scipy.io.loadmat` reads only numeric arrays here: nothing in the
file is run. Images are kept as uint8 [n, 3, 32, 32] (NCHW), like CIFAR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError

TRAIN_FILE, TEST_FILE = "train_32x32.mat", "test_32x32.mat"
URL = "http://ufldl.stanford.edu/housenumbers/"
NUM_CLASSES = 10


def find_folder(root: str | Path) -> Path | None:
    """The folder under `root` holding both files (`root` itself or `root/svhn`), else None."""
    root = Path(root).expanduser()
    for candidate in (root, root / "svhn"):
        if (candidate / TRAIN_FILE).is_file() and (candidate / TEST_FILE).is_file():
            return candidate
    return None


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One .mat file -> (images uint8 [n, 3, 32, 32], labels int64 [n] in 0..9)."""
    import scipy.io

    fix = f"replace it with the file from {URL}{path.name}"
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError:  # MATLAB v7.3 (HDF5), which loadmat cannot read
        raise DataError(f"{path} is a MATLAB v7.3 file, which scipy cannot read; save it as v5 "
                        f"(MATLAB: save(..., '-v7')) or {fix}") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a damaged file
        raise DataError(f"{path} cannot be read as an SVHN .mat file ({type(exc).__name__}: "
                        f"{exc}); {fix}") from None
    x, y = mat.get("X"), mat.get("y")
    ok = (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4
          and x.shape[:3] == (32, 32, 3) and isinstance(y, np.ndarray)
          and y.size == x.shape[3] and y.dtype.kind in "iuf")
    if ok:
        y = y.reshape(-1)
        ok = bool(np.all(y == np.round(y)) and (y.size == 0 or (y.min() >= 1 and y.max() <= 10)))
    if not ok:
        raise DataError(
            f"{path} is not an SVHN file: expected X uint8 [32, 32, 3, n] and y [n, 1] with "
            f"labels 1..10 (10 = digit 0); {fix}"
        )
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, n] -> [n, C, H, W]
    return images, (y.astype(np.int64) % 10)


def download(root: str | Path) -> None:
    """Download both files into `root` through torchvision (which checks their MD5)."""
    root = Path(root).expanduser()
    try:
        from torchvision.datasets import SVHN
        from torchvision.datasets.utils import download_url
    except ImportError:
        raise DataError("data.download needs torchvision, which is not installed; run "
                        f"`make install`, or put {TRAIN_FILE} and {TEST_FILE} in data.root by "
                        "hand") from None
    try:
        for split in ("train", "test"):
            url, filename, md5 = SVHN.split_list[split]
            download_url(url, str(root), filename=filename, md5=md5)
    except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures alike
        raise DataError(
            f"downloading SVHN into {root.resolve()} failed ({type(exc).__name__}: {exc}); "
            f"download {URL}{TRAIN_FILE} and {URL}{TEST_FILE} by hand into that folder"
        ) from None


def load(root: str | Path, *, allow_download: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Read SVHN from `root`: images uint8 [n_train + n_test, 3, 32, 32], labels int64 in 0..9,
    and n_test (the test images come last)."""
    folder = find_folder(root)
    if folder is None and allow_download:
        download(root)
        folder = find_folder(root)
    if folder is None:
        where = Path(root).expanduser().resolve()
        missing = [n for n in (TRAIN_FILE, TEST_FILE) if not (where / n).is_file()]
        raise DataError(
            f"SVHN not found: {where} is missing {', '.join(missing)}; download them from {URL} "
            "into that folder (or rerun with --set data.download=true, which needs internet), or "
            "point --set data.root=... at the folder that holds them"
        )
    train_x, train_y = read_split(folder / TRAIN_FILE)
    test_x, test_y = read_split(folder / TEST_FILE)
    return np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]), len(test_y)
