"""CIFAR-10 and CIFAR-100 from disk, in torchvision's layout, read without running any code from the
data folder.

Layout (as torchvision and the original archives make it):

    <data.root>/cifar-10-batches-py/data_batch_1 .. data_batch_5   10,000 training images each
    <data.root>/cifar-10-batches-py/test_batch                     10,000 test images
    <data.root>/cifar-100-python/train                             50,000 training images
    <data.root>/cifar-100-python/test                              10,000 test images

Each file is a pickled dict (protocol 2, written by Python 2) with `data`: uint8 [k, 3072] (the
1,024 red values of a 32x32 image row by row, then green, then blue) and the labels: `labels` (k
ints in 0..9) for CIFAR-10, `fine_labels` (k ints in 0..99) for CIFAR-100, whose 20 coarse
superclasses (`coarse_labels`) are not used.

Why not torchvision's `CIFAR10` class: it checks the MD5 of every batch file, so it refuses any
archive but the real one (tests write a tiny one), and it unpickles with the full `pickle` module,
which runs whatever code a pickle names. Here a restricted unpickler admits only what the real files
contain: plain containers, numpy arrays (numpy's `_reconstruct`, `ndarray`, `dtype`) and
`_codecs.encode` (how Python 3 writes bytes at protocol 2). Anything else is refused with a
`DataError`, so a data folder cannot run code. torchvision is used only to download (it checks the
archive's MD5), and only when `data.download: true`.

The images are kept as the files store them: uint8 [n, 3, 32, 32] (NCHW), 184 MB for all 60,000.
Models normalise their own input (see `models.Normalize`), so every caller passes raw batches.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np

from .errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One of the two archives: where its files are and what its labels are called."""

    title: str  # for messages
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    url: str
    torchvision_class: str  # the torchvision.datasets class that knows the archive's MD5


CIFAR10 = Variant("CIFAR-10", FOLDER, TRAIN_FILES, TEST_FILE, "labels", NUM_CLASSES, URL,
                  "CIFAR10")
CIFAR100 = Variant("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
                   "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100")

# Per-channel mean and std of the training images, in pixel units (0..255): the values of the
# challenge's starting kit, (0.4914, 0.4822, 0.4465) and (0.2023, 0.1994, 0.2010) on a 0..1 scale.
MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
STD = (0.2023 * 255, 0.1994 * 255, 0.2010 * 255)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch file may name, mapped to the objects they resolve to."""
    try:  # numpy >= 2 moved the helpers to numpy._core; numpy.core still names them in old files
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    import _codecs

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return obj


def read_batch(path: Path, variant: Variant = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 [k, 3, 32, 32], labels int64 [k]); DataError if it is not
    a batch of `variant` or names anything but plain data."""
    title, url = variant.title, variant.url
    try:
        with open(path, "rb") as fh:
            # latin1, as torchvision does: Python 2 str (the pixel bytes) becomes str that numpy
            # turns back into bytes; keys come out as str ('data') or bytes (b'data').
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} is not a plain {title} batch ({exc}); it was refused unread: replace "
            f"{path.parent} with the real archive ({url})"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(
            f"{path} cannot be read as a {title} batch ({type(exc).__name__}: {exc}); replace "
            f"{path.parent} with the real archive ({url})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a {title} batch dict; "
                        f"replace {path.parent} with the real archive ({url})")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = batch.get("data"), batch.get(variant.label_key)
    size = int(np.prod(IMAGE_SHAPE))
    ok = (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        and data.shape[1] == size and isinstance(labels, (list, np.ndarray))
        and len(labels) == len(data)
    )
    if ok:
        labels = np.asarray(labels)
        ok = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and (
            len(labels) == 0 or (labels.min() >= 0 and labels.max() < variant.num_classes))
    if not ok:
        raise DataError(
            f"{path} is not a {title} batch: expected 'data' uint8 [k, {size}] and "
            f"'{variant.label_key}' (k ints in 0..{variant.num_classes - 1}); replace "
            f"{path.parent} with the real archive ({url})"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def find_folder(root: str | Path, variant: Variant = CIFAR10) -> Path | None:
    """The batches folder under `root` (or `root` itself if it is that folder), else None."""
    root = Path(root).expanduser()
    for candidate in (root / variant.folder, root):
        if all((candidate / name).is_file()
               for name in (*variant.train_files, variant.test_file)):
            return candidate
    return None


def download(root: str | Path, variant: Variant = CIFAR10) -> None:
    """Download and extract the archive into `root` through torchvision (which checks its MD5)."""
    root = Path(root).expanduser()
    try:
        import torchvision.datasets
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError:
        raise DataError(f"data.download needs torchvision, which is not installed; run "
                        f"`make install`, or put {variant.folder} in the data folder by hand"
                        ) from None
    known = getattr(torchvision.datasets, variant.torchvision_class)
    try:
        # torchvision's own address, file name and MD5 for the archive.
        download_and_extract_archive(known.url, str(root), filename=known.filename,
                                     md5=known.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures alike
        raise DataError(
            f"downloading {variant.title} into {root.resolve()} failed ({type(exc).__name__}: "
            f"{exc}); download {variant.url} by hand and extract it there (it holds "
            f"{variant.folder}/)"
        ) from None


def load(root: str | Path, *, allow_download: bool = False, variant: Variant = CIFAR10
         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Read CIFAR-10 (or `variant`) from `root`: images uint8 [n_train + n_test, 3, 32, 32], labels
    int64, and n_test (the test images come last: the training files in order, then the test
    file)."""
    folder = find_folder(root, variant)
    if folder is None and allow_download:
        download(root, variant)
        folder = find_folder(root, variant)
    names = (*variant.train_files, variant.test_file)
    if folder is None:
        where = (Path(root).expanduser() / variant.folder).resolve()
        missing = [n for n in names if not (where / n).is_file()]
        raise DataError(
            f"{variant.title} not found: {where} is missing {', '.join(missing)}; download "
            f"{variant.url} and extract it into {where.parent} (or rerun with "
            "--set data.download=true, which needs internet), or point --set data.root=... at "
            f"the folder that holds {variant.folder}/"
        )
    parts = [read_batch(folder / name, variant) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels, len(parts[-1][1])
