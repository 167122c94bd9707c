"""The checkpoint store: the only module that knows paths.

One folder per experiment:

    <store>/
      experiment.json              resolved config, its hash, the split's hash, versions, created
      split.npz                    indices into the dataset: train, test, forget, retain
      original/model.pt            the model trained on the whole training set
      original/outputs.npz         its per-sample outputs (see below)
      reference/seed-000007/...    reference model 7: trained from scratch on retain, seed 7
      unlearned/<method>/method.json                 the method, its parameters, how it was named
      unlearned/<method>/seed-1000003/...            unlearning run 3 of that method

Each model folder holds `model.pt` (state dict + provenance; loads with `weights_only=True`) and
`outputs.npz` (forget and test logits, retain loss and correctness, provenance as JSON). A model is
done when its `outputs.npz` exists: it is written last.

Every write goes to a temporary file in the same folder (fsynced) and is renamed over the target
with `os.replace`, so a crash never leaves a file that looks complete. Temporary files left by a
killed run are removed by the next command that writes. A lock file keeps two writers apart.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import io
import json
import os
import platform
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, diff_sections, from_mapping, identity
from .errors import StoreError, UnlearnError

SCHEMA = "unlearn.store/1"
TMP_MARK = ".tmp-"
ORIGINAL = "original"
REFERENCE = "reference"
UNLEARNED = "unlearned"


def default_store(cfg: Config) -> Path:
    """Where an experiment lives when no `--store` is given: runs/<config name>."""
    return Path("runs") / cfg.name


def versions() -> dict[str, str]:
    """Versions of what produced an artifact (torch only if it is already imported)."""
    import sys

    from . import __version__

    out = {"unlearn": __version__, "python": platform.python_version(), "numpy": np.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def seed_dir_name(seed: int) -> str:
    return f"seed-{seed:06d}"


def method_dir_name(method: str) -> str:
    """A folder name for a method or a plugin spec such as `path/to/file.py:fn`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method).strip("._") or "method"


# ---------------------------------------------------------------- atomic writes


def _file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's 0600 would hide results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _npz_bytes(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps(meta)))
    return buf.getvalue()


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- the store


class Store:
    """One experiment's folder. Cheap to construct; touches the disk only when asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # layout -----------------------------------------------------------------
    @property
    def experiment_file(self) -> Path:
        return self.root / "experiment.json"

    @property
    def split_file(self) -> Path:
        return self.root / "split.npz"

    def model_dir(self, kind: str, seed: int | None = None, method: str | None = None) -> Path:
        if kind == ORIGINAL:
            return self.root / ORIGINAL
        if kind == REFERENCE:
            return self.root / REFERENCE / seed_dir_name(int(seed))
        if kind == UNLEARNED:
            return self.root / UNLEARNED / method_dir_name(str(method)) / seed_dir_name(int(seed))
        raise ValueError(f"unknown model kind {kind!r}")

    def method_file(self, method: str) -> Path:
        return self.root / UNLEARNED / method_dir_name(method) / "method.json"

    # experiment identity -------------------------------------------------------
    def exists(self) -> bool:
        return self.experiment_file.is_file()

    def read_experiment(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(
                f"no experiment in store {self.root} (experiment.json is missing); "
                f"run `unlearn train-refs --store {self.root}` first"
            )
        try:
            return json.loads(self.experiment_file.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{self.experiment_file} is unreadable ({exc}); it was not written by this tool "
                "or was damaged: use a new --store"
            ) from None

    def init_experiment(self, cfg: Config, split: Mapping[str, np.ndarray], *,
                        data: Mapping[str, Any] | None = None,
                        model_spec: Mapping[str, Any] | None = None) -> None:
        """Create the experiment, or check that an existing one matches `cfg` and `split`.

        data: what the data was ({dataset, fingerprint, ...}, see `check_data`); model_spec: the
        spec every model of the experiment is built from (so a plugin model is rebuilt from its
        recorded file from any folder). Both are recorded when given.
        """
        split_hash = hash_split(split)
        if self.exists():
            self.check_compatible(cfg, split_hash=split_hash)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.split_file, _npz_bytes(split, {"split_hash": split_hash}))
        record = {
            "schema": SCHEMA,
            "config": cfg.to_dict(),
            "config_hash": cfg.identity_hash(),
            "split_hash": split_hash,
            "versions": versions(),
            "created": now(),
        }
        if data is not None:
            record["data"] = dict(data)
        if model_spec is not None:
            record["model_spec"] = dict(model_spec)
        atomic_write_json(self.experiment_file, record)

    def check_data(self, fingerprint: str, dataset: str, where: str) -> None:
        """Refuse data whose content fingerprint differs from the one the store recorded.

        Stores made before fingerprints were recorded have none and are not checked (their
        split's hash, which holds the labels, still is).
        """
        stored = (self.read_experiment().get("data") or {}).get("fingerprint")
        if stored is not None and stored != fingerprint:
            raise StoreError(
                f"store {self.root} was made from other data: the {dataset} dataset at {where} "
                f"changed since (fingerprint {stored} then, {fingerprint} now); restore the data "
                "the store was made from, or use a new --store"
            )

    def check_compatible(self, cfg: Config, *, split_hash: str | None = None) -> dict[str, Any]:
        """Refuse a store made under other data/model/train settings, naming the differences."""
        exp = self.read_experiment()
        try:
            # Through the current defaults: a key added since the store was made counts as its
            # default, so older stores stay usable.
            stored = from_mapping(exp.get("config", {})).to_dict()
        except UnlearnError as exc:
            raise StoreError(
                f"store {self.root} was made by another version of unlearn and its config no "
                f"longer validates ({exc}); use a new --store"
            ) from None
        diffs = diff_sections(identity(stored), identity(cfg.to_dict()))
        if diffs:
            raise StoreError(
                f"store {self.root} was made under a different config ({'; '.join(diffs)}); "
                "use the config it was made with, or a new --store"
            )
        if split_hash is not None and exp.get("split_hash") != split_hash:
            raise StoreError(
                f"store {self.root} holds a different forget/retain split "
                f"({exp.get('split_hash')} stored, {split_hash} now) although the config matches "
                "(the dataset or scikit-learn changed?); use a new --store"
            )
        return exp

    def load_split(self) -> dict[str, np.ndarray]:
        arrays, _ = self._load_npz(self.split_file)
        return arrays

    # writers -------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's write lock, and clear temp files a killed run left behind."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--store {self.root} is a file, not a folder; give a folder path")
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"another unlearn command is writing to store {self.root}; wait for it to "
                    "finish (or stop it) and run this command again"
                ) from None
            self.clean_temp()
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def clean_temp(self) -> list[Path]:
        """Remove temp files left by killed runs; only call while holding the write lock."""
        removed = []
        for path in self.root.rglob(f"*{TMP_MARK}*"):
            if path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path)
        return removed

    def save_model(self, kind: str, seed: int | None, state_dict: Any, meta: Mapping[str, Any],
                   *, method: str | None = None, model_spec: Mapping[str, Any]) -> Path:
        """Save a checkpoint: state dict, what rebuilds the model, provenance."""
        path = self.model_dir(kind, seed, method) / "model.pt"
        payload = {"state_dict": state_dict, "model": dict(model_spec), "meta": json.dumps(meta)}
        atomic_write_bytes(path, _torch_bytes(payload))
        return path

    def save_outputs(self, kind: str, seed: int | None, arrays: Mapping[str, np.ndarray],
                     meta: Mapping[str, Any], *, method: str | None = None) -> Path:
        path = self.model_dir(kind, seed, method) / "outputs.npz"
        atomic_write_bytes(path, _npz_bytes(arrays, meta))
        return path

    def save_method(self, method: str, record: Mapping[str, Any]) -> None:
        """Record a method's parameters; refuse other parameters once a run is stored.

        While no run is stored (e.g. every run failed), the record is simply replaced, so fixing a
        bad hyperparameter does not require a new store.
        """
        path = self.method_file(method)
        if path.is_file() and self.done_seeds(UNLEARNED, method):
            try:
                stored = json.loads(path.read_text())
            except ValueError:
                raise StoreError(
                    f"{path} is damaged (not JSON); delete it and rerun `unlearn apply`"
                ) from None
            diffs = diff_sections(stored.get("params", {}), dict(record.get("params", {})))
            if diffs or stored.get("spec") != record.get("spec"):
                what = "; ".join(diffs) or f"{stored.get('spec')!r} -> {record.get('spec')!r}"
                raise StoreError(
                    f"method {method!r} in store {self.root} was run with other settings "
                    f"({what}); use the same settings, or a new --store"
                )
            return
        atomic_write_json(path, dict(record))

    # readers -------------------------------------------------------------------
    def done_seeds(self, kind: str, method: str | None = None) -> list[int]:
        """Seeds whose outputs are stored, ascending."""
        if kind == REFERENCE:
            base = self.root / REFERENCE
        else:
            base = self.root / UNLEARNED / method_dir_name(str(method))
        if not base.is_dir():
            return []
        seeds = []
        for child in base.iterdir():
            if child.name.startswith("seed-") and (child / "outputs.npz").is_file():
                with contextlib.suppress(ValueError):
                    seeds.append(int(child.name[5:]))
        return sorted(seeds)

    def is_done(self, kind: str, seed: int | None = None, method: str | None = None) -> bool:
        return (self.model_dir(kind, seed, method) / "outputs.npz").is_file()

    def stored_methods(self) -> list[str]:
        """Methods with at least one finished run, in the order they were first recorded."""
        base = self.root / UNLEARNED
        if not base.is_dir():
            return []
        found = []
        for child in base.iterdir():
            rec = child / "method.json"
            if rec.is_file() and self.done_seeds(UNLEARNED, child.name):
                try:
                    found.append((rec.stat().st_mtime, json.loads(rec.read_text())["name"]))
                except (ValueError, KeyError):
                    raise StoreError(f"{rec} is damaged; delete it and rerun `unlearn apply` "
                                     "for that method") from None
        return [name for _, name in sorted(found)]

    def method_record(self, method: str) -> dict[str, Any]:
        path = self.method_file(method)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise StoreError(
                f"{path} is damaged (not JSON); delete it and rerun `unlearn apply --method "
                f"{method} --store {self.root}`"
            ) from None

    def load_outputs(self, kind: str, seed: int | None = None,
                     method: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self._load_npz(self.model_dir(kind, seed, method) / "outputs.npz")

    def load_model(self, kind: str, seed: int | None = None,
                   method: str | None = None) -> dict[str, Any]:
        """Load a checkpoint as {state_dict, model, meta}; a damaged file is a StoreError."""
        import torch

        path = self.model_dir(kind, seed, method) / "model.pt"
        if not path.is_file():
            raise StoreError(f"checkpoint {path} is missing; run `unlearn train-refs "
                             f"--store {self.root}` to train it")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["meta"] = json.loads(payload["meta"])
            payload["state_dict"], payload["model"]  # noqa: B018 (presence check)
        except Exception as exc:  # noqa: BLE001 (any failure to read means a damaged file)
            raise StoreError(
                f"checkpoint {path} is damaged or truncated ({type(exc).__name__}); delete it and "
                f"rerun `unlearn train-refs --store {self.root}` to train it again"
            ) from None
        return payload

    def _load_npz(self, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if not path.is_file():
            raise StoreError(f"{path} is missing; the store is incomplete: rerun the command "
                             "that writes it")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreError(
                f"{path} is damaged or truncated ({type(exc).__name__}); delete its folder "
                f"{path.parent} and rerun the command that made it"
            ) from None
        return arrays, meta


def hash_split(split: Mapping[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(split):
        h.update(key.encode())
        h.update(np.ascontiguousarray(split[key], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
