"""A folder of the user's own images, one subfolder per class, decoded once into a uint8 cache.

Layout (`data.root`):

    <data.root>/train/<class>/<any name>.png|.jpg|...   training images
    <data.root>/test/<class>/...                         test images

Classes are the subfolders of `train/`, sorted by name; label k is the k-th name. `test/` may lack
a class but may not add one. Files are taken in sorted path order (subfolders of a class folder
included), train first, so the order is the same on every machine. Hidden files (`.DS_Store`) are
skipped; every other file must be an image Pillow can read, else the run stops naming it.

Each image is converted to RGB, centre-cropped to a square and resized to `data.image_size`
pixels (Pillow's bilinear filter, which antialiases when shrinking), and kept as uint8
[n, 3, S, S], like CIFAR. Decoding is the slow part, so the pixels are cached in the store
(`<store>/data/imagefolder.npz`) with a key made of every file's path, size and modification time
and the image size; a later run (and every worker) reads the cache while the key matches, and
decodes again when a file was added, removed or changed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from .errors import DataError

CACHE_NAME = "imagefolder.npz"
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
LAYOUT = "data.root must hold train/<class>/<images> and test/<class>/<images>"


def _files(folder: Path) -> list[Path]:
    """Non-hidden files under `folder`, sorted by path (hidden folders skipped too)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        out.append(path)
    return out


def scan(root: str | Path) -> tuple[list[str], list[Path], np.ndarray, int]:
    """The class names, every image path (train, then test), their labels int64 [n] and n_test."""
    root = Path(root).expanduser()
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"imagefolder: {(root / part).resolve()} is not a folder; {LAYOUT} "
                            "(set --set data.root=... to that folder)")
    classes = sorted(p.name for p in (root / "train").iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: {(root / 'train').resolve()} has no class folders; "
                        f"{LAYOUT}")
    paths: list[Path] = []
    labels: list[int] = []
    n_test = 0
    for part in ("train", "test"):
        base = root / part
        for stray in base.iterdir():
            if stray.is_file() and not stray.name.startswith("."):
                raise DataError(f"imagefolder: {stray} is not inside a class folder; move it into "
                                f"{base}/<class>/ or remove it")
        present = sorted(p.name for p in base.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise DataError(f"imagefolder: {base / unknown[0]} is a class that {root / 'train'} "
                            f"lacks; add {root / 'train' / unknown[0]}/ with its training "
                            "images, or remove the test folder")
        for name in present:
            files = _files(base / name)
            if not files:
                raise DataError(f"imagefolder: the class folder {base / name} is empty; put its "
                                "images in it, or remove the folder")
            paths += files
            labels += [classes.index(name)] * len(files)
            if part == "test":
                n_test += len(files)
    if n_test == 0:
        raise DataError(f"imagefolder: {root / 'test'} holds no images; {LAYOUT}")
    return classes, paths, np.asarray(labels, dtype=np.int64), n_test


def cache_key(root: Path, paths: list[Path], image_size: int) -> str:
    """A hash of what the decoded pixels depend on: every file's path, size and mtime."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{image_size}".encode())
    for path in paths:
        st = path.stat()
        h.update(f"\n{path.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def decode(path: Path, image_size: int) -> np.ndarray:
    """One image file -> uint8 [3, image_size, image_size]: RGB, centre-cropped square, resized."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.fit(img.convert("RGB"), (image_size, image_size),
                               method=Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: {path} is not an image Pillow can read "
                        f"({type(exc).__name__}: {exc}); remove it or replace it with a "
                        ".png or .jpg file") from None
    return pixels.transpose(2, 0, 1)


def _read_cache(path: Path, key: str, n: int, image_size: int) -> np.ndarray | None:
    """The cached pixels if the cache exists, is intact and matches `key`; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            images = npz["images"]
    except Exception:  # noqa: BLE001 - a damaged cache is only decoded again
        return None
    if (meta.get("key") != key or images.dtype != np.uint8
            or images.shape != (n, 3, image_size, image_size)):
        return None
    return images


def cache_bytes(images: np.ndarray, meta: dict) -> bytes:
    """The cache file's content: the pixels and `meta` (holding the key) as an .npz."""
    buf = io.BytesIO()
    np.savez(buf, images=images, meta=np.array(json.dumps(meta)))
    return buf.getvalue()


def load(root: str | Path, image_size: int, cache_dir: str | Path | None = None
         ) -> tuple[np.ndarray, np.ndarray, int, list[str], dict | None]:
    """Read the image folder: images uint8 [n_train + n_test, 3, S, S], labels int64, n_test, the
    class names, and, when `cache_dir` is given and its cache was missing or stale, the metadata
    to write a new one with (`cache_bytes`; the caller writes it where it may write), else None."""
    root = Path(root).expanduser()
    classes, paths, labels, n_test = scan(root)
    key = cache_key(root, paths, image_size)
    cache = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    if cache is not None:
        images = _read_cache(cache, key, len(paths), image_size)
        if images is not None:
            return images, labels, n_test, classes, None
    images = np.stack([decode(p, image_size) for p in paths])
    meta = None
    if cache is not None:
        meta = {"key": key, "root": str(root.resolve()), "classes": classes}
    return images, labels, n_test, classes, meta
