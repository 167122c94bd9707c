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
import math
import os
import platform
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config import ADDED_LATER, Config, diff_sections, from_mapping, identity
from .errors import OutputsError, StoreError, UnlearnError


class _LazyNumpy:
    """numpy, imported on first use. Answering `--help` or a wrong argument needs the store's
    paths but none of its arrays; numpy's import is a fifth of such an answer's time."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)


np = _LazyNumpy()

SCHEMA = "unlearn.store/1"
TMP_MARK = ".tmp-"
ORIGINAL = "original"
REFERENCE = "reference"
UNLEARNED = "unlearned"
ModelKey = tuple[str, int | None, str | None]  # (kind, seed, method) of one stored model

# What every model's outputs.npz must hold: name -> (the split part that sizes its first axis,
# whether it has a class axis, the numpy dtype kinds allowed). `training.per_sample_outputs` makes
# them; `score` reads them. Checked when written and when read (`check_outputs`).
OUTPUTS = {
    "forget_logits": ("forget", True, "f"),  # float [F, C]
    "test_logits": ("test", True, "f"),  # float [T, C]
    "retain_loss": ("retain", False, "f"),  # float [R], cross-entropy
    "retain_correct": ("retain", False, "b"),  # bool [R]
}
MAX_COST_SECONDS = 86_400.0  # launch-costs.json: larger values are not believed


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
        self._split: dict[str, np.ndarray] | None = None  # read once: it never changes
        self._hashes: set[str] | None = None
        self._classes: int | None = None  # read once (see num_classes)
        # experiment.json's text as last read, with the (inode, size, mtime) it was read at:
        # read again only when the file changed (scoring asks for it once per model read)
        self._experiment: tuple[tuple[int, int, int], str] | None = None

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

    @property
    def costs_file(self) -> Path:  # launch.CostModel's measurements
        return self.root / "launch-costs.json"

    # measured costs of running jobs (launch.CostModel) ----------------------------
    def read_costs(self, key: str, machine: Mapping[str, Any]) -> dict[str, float]:
        """The costs last measured for `key` ("train-refs", "apply:finetune") on this machine:
        {"model_seconds": s, "startup_seconds": s}, each present only if stored as a finite
        number >= 0. Anything else (no file, a damaged file, another machine) is {}: the costs
        only guide where jobs run, they never change a result."""
        try:
            record = json.loads(self.costs_file.read_text())
            entry = record["costs"][key] if record.get("machine") == dict(machine) else {}
            if not isinstance(entry, dict):
                return {}
            costs = {name: float(value) for name, value in entry.items()
                     if name in ("model_seconds", "startup_seconds")
                     and isinstance(value, (int, float)) and not isinstance(value, bool)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
                RecursionError):
            return {}
        # A day per model or more is no measurement of this tool's jobs.
        return {name: value for name, value in costs.items()
                if math.isfinite(value) and 0 <= value < MAX_COST_SECONDS}

    def record_costs(self, key: str, machine: Mapping[str, Any],
                     costs: Mapping[str, float]) -> None:
        """Keep the costs just measured for `key` (replacing that key's; a record of another
        machine, or a damaged one, is replaced whole). Caller holds the store lock."""
        try:
            record = json.loads(self.costs_file.read_text())
            if not isinstance(record, dict) or record.get("machine") != dict(machine):
                raise ValueError
            book = dict(record["costs"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            book = {}
        book[key] = {**(book.get(key) if isinstance(book.get(key), dict) else {}), **costs}
        atomic_write_json(self.costs_file, {"machine": dict(machine), "costs": book})

    # experiment identity -------------------------------------------------------
    def exists(self) -> bool:
        return self.experiment_file.is_file()

    def read_experiment(self) -> dict[str, Any]:
        if not self.exists():
            stored = self.stored_models()
            if stored:
                raise StoreError(
                    f"store {self.root} has lost its experiment.json but holds {len(stored)} "
                    f"model(s); `{self.redo_command(REFERENCE)}` rebuilds it when given the "
                    "config they were made with (--config, --set), checked against their provenance"
                )
            raise StoreError(
                f"no experiment in store {self.root} (experiment.json is missing); "
                f"run `unlearn train-refs --store {self.root}` first"
            )
        try:
            info = self.experiment_file.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if self._experiment is None or self._experiment[0] != stamp:
                self._experiment = (stamp, self.experiment_file.read_text())
            exp = json.loads(self._experiment[1])  # a fresh dict: the caller may change it
            if not isinstance(exp, dict):
                raise ValueError("not a JSON object")
            return exp
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{self.experiment_file} is unreadable ({exc}); delete {self.experiment_file} "
                f"and run `{self.redo_command(REFERENCE)}` with the config its models were made "
                "with: it rebuilds experiment.json after checking that config against their "
                "provenance"
            ) from None

    def stored_models(self) -> list[ModelKey]:
        """(kind, seed, method folder) of every model whose outputs.npz exists."""
        found: list[ModelKey] = []
        if (self.model_dir(ORIGINAL) / "outputs.npz").is_file():
            found.append((ORIGINAL, None, None))
        found += [(REFERENCE, seed, None) for seed in self.done_seeds(REFERENCE)]
        base = self.root / UNLEARNED
        if base.is_dir():
            for child in sorted(base.iterdir()):
                found += [(UNLEARNED, seed, child.name)
                          for seed in self.done_seeds(UNLEARNED, child.name)]
        return found

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

    def _model_hashes(self, methods: Collection[str] | None = None
                      ) -> dict[tuple[str, str | None], list[ModelKey]]:
        """The stored models grouped by the (config hash, split hash) their provenance carries;
        with `methods`, the unlearning runs of those methods only (and every other model)."""
        groups: dict[tuple[str, str | None], list[ModelKey]] = {}
        folders = None if methods is None else {method_dir_name(m) for m in methods}
        for kind, seed, method in self.stored_models():
            if folders is not None and kind == UNLEARNED and method not in folders:
                continue
            path = self.model_dir(kind, seed, method) / "outputs.npz"
            try:
                meta = json.loads(str(read_npz(path, only="meta")["meta"]))
                key = (str(meta["config_hash"]), meta.get("split_hash"))
            except Exception:  # noqa: BLE001 - damaged: found and redone by `damaged`
                continue
            groups.setdefault(key, []).append((kind, seed, method))
        return groups

    def _name_models(self, models: list[ModelKey]) -> str:
        names = [self.describe(*m) for m in models[:4]]
        return ", ".join(names) + (f" and {len(models) - 4} more" if len(models) > 4 else "")

    def check_identity(self, methods: Collection[str] | None = None) -> None:
        """Refuse a store whose experiment.json was edited, or whose models disagree with it.

        Every model's provenance carries the config hash and the split hash it was made under;
        they must be those of experiment.json, whose own config must still give the hash it was
        written with. Otherwise models trained under different settings would be mixed silently.
        With `methods`, only those methods' unlearning runs are checked (with every other model).
        """
        exp = self.read_experiment()
        cfg = self._stored_config(exp)
        accepted = cfg.identity_hashes()
        if exp.get("config_hash") not in accepted:
            raise StoreError(
                f"{self.experiment_file} was edited: its config no longer gives the hash it was "
                f"written with ({exp.get('config_hash')}); restore it, or delete "
                f"{self.experiment_file} and run `{self.redo_command(REFERENCE)}` with the config "
                "the models were made with, which rebuilds it after checking their provenance"
            )
        foreign = [m for (config_hash, split_hash), models in self._model_hashes(methods).items()
                   if config_hash not in accepted or split_hash != exp.get("split_hash")
                   for m in models]
        if foreign:
            paths = " ".join(str(self.model_dir(*m)) for m in foreign[:3])
            raise StoreError(
                f"store {self.root} mixes models made under other settings than its "
                f"experiment.json ({exp.get('config_hash')}): {len(foreign)} model(s), "
                f"{self._name_models(foreign)}; restore the experiment.json they were made with, "
                f"or remove their folders ({paths}{' ...' if len(foreign) > 3 else ''}) and make "
                "them again"
            )

    def _stored_config(self, exp: Mapping[str, Any]) -> Config:
        try:
            # Through the current defaults: a key added since the store was made counts as its
            # default, so older stores stay usable.
            return from_mapping(exp.get("config", {}))
        except UnlearnError as exc:
            raise StoreError(
                f"store {self.root} was made by another version of unlearn and its config no "
                f"longer validates ({exc}); use a new --store"
            ) from None

    def rebuild_experiment(self, cfg: Config, split: Mapping[str, np.ndarray],
                           num_classes: int | None, *, data: Mapping[str, Any] | None = None,
                           model_spec: Mapping[str, Any] | None = None) -> int:
        """Write a lost experiment.json again, if `cfg` and `split` are what the models were
        made under (their provenance). Returns how many models vouched for it."""
        split_hash = hash_split(split)
        groups = self._model_hashes()
        accepted = cfg.identity_hashes()
        foreign = [(h, len(m)) for h, m in groups.items()
                   if h[0] not in accepted or h[1] != split_hash]
        if foreign:
            seen = "; ".join(f"{n} under {h[0]} (split {h[1]})" for h, n in foreign)
            raise StoreError(
                f"store {self.root} has lost its experiment.json, and its models were not made "
                f"under this config ({cfg.identity_hash()}, split {split_hash}): {seen}; pass "
                "the config they were made with (--config, --set), or use a new --store"
            )
        self._write_experiment(cfg, split, split_hash, num_classes, data=data,
                               model_spec=model_spec)
        return sum(len(m) for m in groups.values())

    def init_experiment(self, cfg: Config, split: Mapping[str, np.ndarray],
                        num_classes: int | None = None, *,
                        data: Mapping[str, Any] | None = None,
                        model_spec: Mapping[str, Any] | None = None) -> None:
        """Create the experiment, or check that an existing one matches `cfg` and `split`.

        num_classes: the dataset's class count, recorded so that every model's outputs can be
        checked against it (stores made before it was recorded read it from the original model).
        data: what the data was ({dataset, fingerprint, ...}, see `check_data`); model_spec: the
        spec every model of the experiment is built from (so a plugin model is rebuilt from its
        recorded file from any folder). Both are recorded when given.
        """
        split_hash = hash_split(split)
        if self.exists():
            self.check_compatible(cfg, split_hash=split_hash)
            self.repair_split(split)
            return
        self._write_experiment(cfg, split, split_hash, num_classes, data=data,
                               model_spec=model_spec)

    def _write_experiment(self, cfg: Config, split: Mapping[str, np.ndarray], split_hash: str,
                          num_classes: int | None, *, data: Mapping[str, Any] | None = None,
                          model_spec: Mapping[str, Any] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.split_file, _npz_bytes(split, {"split_hash": split_hash}))
        self._split = self._hashes = self._classes = None  # what was read before is stale
        self._experiment = None
        record = {
            "schema": SCHEMA,
            "config": cfg.to_dict(),
            "config_hash": cfg.identity_hash(),
            "split_hash": split_hash,
            "versions": versions(),
            "created": now(),
        }
        if num_classes is not None:
            record["num_classes"] = int(num_classes)
        if data is not None:
            record["data"] = dict(data)
        if model_spec is not None:
            record["model_spec"] = dict(model_spec)
        atomic_write_json(self.experiment_file, record)

    def check_compatible(self, cfg: Config, *, split_hash: str | None = None) -> dict[str, Any]:
        """Refuse a store made under other data/model/train settings, naming the differences."""
        exp = self.read_experiment()
        stored = self._stored_config(exp).to_dict()
        every = {section: tuple(keys) for section, keys in ADDED_LATER.items()}  # show all keys
        diffs = diff_sections(identity(stored, keep=every), identity(cfg.to_dict(), keep=every))
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
        """The split's index arrays (and labels), read once per Store object."""
        if self._split is None:
            try:
                self._split, _ = self._load_npz(self.split_file)
            except StoreError as exc:
                raise StoreError(f"{exc}; `{self.redo_command(REFERENCE)}` writes it again "
                                 "from the store's config") from None
        return self._split

    def repair_split(self, split: Mapping[str, np.ndarray]) -> bool:
        """Write split.npz again if it is missing or damaged and `split` is the recorded one.

        `split` is recomputed from the config by the caller; its hash must equal the one in
        experiment.json (checked by `init_experiment` first). Returns True if it was rewritten.
        """
        try:
            if hash_split(self._load_npz(self.split_file)[0]) == self.read_experiment().get(
                    "split_hash"):
                return False
        except StoreError:
            pass
        split_hash = hash_split(split)
        if split_hash != self.read_experiment().get("split_hash"):
            raise StoreError(
                f"{self.split_file} is damaged and the config gives another split "
                f"({split_hash}, {self.read_experiment().get('split_hash')} recorded); "
                "use a new --store"
            )
        atomic_write_bytes(self.split_file, _npz_bytes(split, {"split_hash": split_hash}))
        self._split = None
        return True

    def _accepted_hashes(self) -> set[str]:
        """The config hashes a model of this store may carry (read once per Store object)."""
        if self._hashes is None:
            self._hashes = self._stored_config(self.read_experiment()).identity_hashes()
        return self._hashes

    def num_classes(self) -> int | None:
        """The class count every model's logits must have; None when the store cannot tell."""
        if self._classes is not None:
            return self._classes
        exp = self.read_experiment()
        if isinstance(exp.get("num_classes"), int):
            self._classes = exp["num_classes"]
            return self._classes
        path = self.model_dir(ORIGINAL) / "outputs.npz"  # a store from before it was recorded
        if path.is_file():
            arrays, _ = self._load_npz(path)
            logits = arrays.get("forget_logits")
            if logits is not None and logits.ndim == 2:
                self._classes = int(logits.shape[1])
        return self._classes

    # checks ----------------------------------------------------------------------
    def describe(self, kind: str, seed: int | None = None, method: str | None = None) -> str:
        """A model as a user names it: `reference model seed 7`, `finetune run seed 1000003`."""
        return describe_model(kind, seed, method)

    def redo_command(self, kind: str, method: str | None = None) -> str:
        """The command that makes a model of this kind again, as far as the store holds them.

        Both commands redo a damaged or incomplete model themselves (see `damaged`); the count
        keeps a rerun from training more models than the store had.
        """
        if kind == UNLEARNED:
            seeds = self.done_seeds(UNLEARNED, method)
            # Unlearning seeds are UNLEARN_SEED_BASE + run index (apply.py).
            count = f" --num-models {max(seeds) - 1_000_000 + 1}" if seeds else ""
            return f"unlearn apply --method {method} --store {self.root}{count}"
        seeds = self.done_seeds(REFERENCE)
        count = f" --num-models {max(seeds) + 1}" if seeds else ""
        return f"unlearn train-refs --store {self.root}{count}"

    def check_outputs(self, arrays: Mapping[str, np.ndarray], *, kind: str, seed: int | None,
                      method: str | None = None) -> str | None:
        """What is wrong with one model's outputs (see `outputs_problem`), or None if they fit."""
        return outputs_problem(arrays, self.load_split(), self.num_classes())

    def damaged(self, kind: str, seeds: Iterable[int | None] = (None,),
                method: str | None = None) -> dict[int | None, str]:
        """Models that look done (their outputs.npz exists) but are damaged or incomplete.

        seed -> what is wrong: outputs.npz unreadable or not fitting the experiment, model.pt
        missing or not a complete checkpoint. Reads every outputs.npz; of model.pt only the zip
        directory at its end (a truncated or foreign file fails there), except for the original,
        which every unlearning run starts from, whose every byte is checked against its CRCs.
        """
        found: dict[int | None, str] = {}
        for seed in seeds:
            folder = self.model_dir(kind, seed, method)
            outputs = folder / "outputs.npz"
            if not outputs.is_file():
                continue  # not done: it will be made anyway
            try:
                arrays, _ = self._load_npz(outputs)
                problem = self.check_outputs(arrays, kind=kind, seed=seed, method=method)
            except StoreError as exc:
                problem = str(exc)
            if problem is None:
                problem = _checkpoint_problem(folder / "model.pt", every_byte=kind == ORIGINAL)
            if problem:
                found[seed] = problem
        return found

    def discard(self, kind: str, seed: int | None = None, method: str | None = None) -> None:
        """Forget a damaged model so that it is made again: its outputs.npz (the mark of a
        finished model) goes first, then its checkpoint. Only call while holding the lock."""
        folder = self.model_dir(kind, seed, method)
        for name in ("outputs.npz", "model.pt"):
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()

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
        """Store a model's per-sample outputs (this marks it done), after checking them.

        Outputs that do not fit the experiment (another class count, a wrong split, NaN) raise
        OutputsError and nothing is written: stored, they would spoil every score of the store.
        """
        problem = self.check_outputs(arrays, kind=kind, seed=seed, method=method)
        if problem:
            raise OutputsError(
                f"{self.describe(kind, seed, method)}: its outputs do not fit the experiment "
                f"({problem}); nothing was stored for it: fix the model or method (one output per "
                "class) and rerun"
            )
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
                    f"{path} is damaged (not JSON); delete {path} and rerun this command"
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
                except (ValueError, KeyError, TypeError):
                    raise StoreError(
                        f"{rec} is damaged; delete {rec} and rerun `unlearn apply --method "
                        f"{child.name} --store {self.root}` (the method of that folder)"
                    ) from None
        return [name for _, name in sorted(found)]

    def method_record(self, method: str) -> dict[str, Any]:
        path = self.method_file(method)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise StoreError(
                f"{path} is damaged (not JSON); delete {path} and rerun `unlearn apply --method "
                f"{method} --store {self.root}`"
            ) from None

    def load_outputs(self, kind: str, seed: int | None = None,
                     method: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One model's outputs (see OUTPUTS) and provenance, refused unless they fit the store.

        Returns float `forget_logits` [F, C], `test_logits` [T, C], `retain_loss` [R] and bool
        `retain_correct` [R]. A damaged or foreign file is an OutputsError naming the model, the
        file and the command that makes it again.
        """
        path = self.model_dir(kind, seed, method) / "outputs.npz"
        try:
            arrays, meta = self._load_npz(path)
        except StoreError as exc:
            raise OutputsError(f"{self.describe(kind, seed, method)}: {exc}; "
                               f"`{self.redo_command(kind, method)}` makes it again") from None
        problem = self.check_outputs(arrays, kind=kind, seed=seed, method=method)
        if problem is None and meta.get("config_hash") not in self._accepted_hashes():
            problem = (f"it was made under config {meta.get('config_hash')}, the store's is "
                       f"{self.read_experiment().get('config_hash')}")
        if problem:
            raise OutputsError(
                f"{self.describe(kind, seed, method)}: {path} does not fit the experiment "
                f"({problem}); `{self.redo_command(kind, method)}` makes it again"
            )
        return arrays, meta

    def load_model(self, kind: str, seed: int | None = None,
                   method: str | None = None) -> dict[str, Any]:
        """Load a checkpoint as {state_dict, model, meta}; a damaged file is a StoreError."""
        import torch

        path = self.model_dir(kind, seed, method) / "model.pt"
        redo = f"`{self.redo_command(kind, method)}` finds it and makes it again"
        if not path.is_file():
            raise StoreError(f"checkpoint {path} is missing; {redo}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["meta"] = json.loads(payload["meta"])
            payload["state_dict"], payload["model"]  # noqa: B018 (presence check)
        except Exception as exc:  # noqa: BLE001 (any failure to read means a damaged file)
            raise StoreError(
                f"checkpoint {path} is damaged or truncated ({type(exc).__name__}); {redo}"
            ) from None
        return payload

    def _load_npz(self, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and the JSON `meta` of an npz file; a missing or damaged file is a StoreError
        whose message names the file (callers add the command that makes it again)."""
        if not path.is_file():
            raise StoreError(f"{path} is missing")
        try:
            arrays = read_npz(path)
            meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
            if not isinstance(meta, dict):
                raise ValueError("meta is not a JSON object")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path} is damaged or truncated ({type(exc).__name__})") from None
        return arrays, meta



def read_npz(path: Path, only: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (all of them, or only the one named `only`), as `np.load`
    with allow_pickle=False reads them (tested for equality).

    Scoring reads a few hundred to a few thousand small outputs.npz files; `np.load` spends
    ~1.5 ms on each, mostly in Python (zipfile's directory parsing, the .npy header parsed with
    `ast`). The files `np.savez` writes are uncompressed zip archives of .npy members with a
    fixed header layout, and those are read here directly: the zip directory and each member's
    local header are checked field by field, each member's CRC-32 is verified, and each .npy
    header must match numpy's own layout exactly, with a size that fits the member. Anything
    else (compressed members, zip64, another header layout, object arrays, a truncated or
    damaged file) goes to `np.load`, which reads it or raises as before.

    Raises OSError, ValueError, KeyError, EOFError or zipfile.BadZipFile for a damaged file.
    """
    data = path.read_bytes()
    arrays = _read_stored_npz(data, only)
    if arrays is None:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = npz.files if only is None else [only]
            arrays = {k: npz[k] for k in names}
    return arrays


_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': False, 'shape': \(((?:\d+, )*\d*,?)\), \}"
    r" *\n"
)


def _read_stored_npz(data: bytes, only: str | None) -> dict[str, np.ndarray] | None:
    """`read_npz` for the plain layout `np.savez` writes; None for anything else."""
    eocd = len(data) - 22  # end of central directory record, no archive comment
    if eocd < 0 or data[eocd : eocd + 4] != b"PK\x05\x06":
        return None
    disk, cd_disk, entries_here, entries, cd_size, cd_offset, comment = struct.unpack_from(
        "<HHHHIIH", data, eocd + 4
    )
    if disk or cd_disk or entries_here != entries or comment or cd_offset + cd_size != eocd:
        return None
    arrays: dict[str, np.ndarray] = {}
    at = cd_offset
    for _ in range(entries):
        if data[at : at + 4] != b"PK\x01\x02":
            return None
        (flags, method, crc, packed, size, name_len, extra_len, note_len, local) = (
            struct.unpack_from("<8xHH4xIIIHHH8xI", data, at)
        )
        name = data[at + 46 : at + 46 + name_len].decode("utf-8", "replace")
        at += 46 + name_len + extra_len + note_len
        if method != 0 or flags & 0x1 or packed != size or not name.endswith(".npy"):
            return None  # compressed, encrypted, or not an array: np.load decides
        if size == 0xFFFFFFFF or local == 0xFFFFFFFF:
            return None  # zip64
        key = name[:-4]
        if only is not None and key != only:
            continue
        if data[local : local + 4] != b"PK\x03\x04":
            return None
        local_method, local_name_len, local_extra_len = struct.unpack_from(
            "<4xH16xHH", data, local + 4
        )
        start = local + 30 + local_name_len + local_extra_len
        member = data[start : start + size]
        if local_method != 0 or len(member) != size or zlib.crc32(member) != crc:
            return None
        array = _read_stored_npy(member)
        if array is None:
            return None
        arrays[key] = array
    if at != eocd or (only is not None and only not in arrays):
        return None
    return arrays


def _read_stored_npy(member: bytes) -> np.ndarray | None:
    """One .npy member in numpy's format 1.0 layout, C order; None for anything else."""
    if member[:8] != b"\x93NUMPY\x01\x00" or len(member) < 10:
        return None
    (header_len,) = struct.unpack_from("<H", member, 8)
    header = member[10 : 10 + header_len].decode("latin1")
    match = _NPY_HEADER.fullmatch(header)
    if match is None:
        return None
    try:
        dtype = np.dtype(match.group(1))
    except TypeError:
        return None
    if dtype.hasobject or dtype.itemsize == 0:
        return None
    shape = tuple(int(d) for d in match.group(2).replace(",", " ").split())
    count = math.prod(shape)
    offset = 10 + header_len
    if len(member) - offset != count * dtype.itemsize:
        return None
    # A writable copy of the member's data (callers may change their arrays).
    return np.frombuffer(member, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def describe_model(kind: str, seed: int | None = None, method: str | None = None) -> str:
    """A model as a user names it: `reference model seed 7`, `finetune run seed 1000003`."""
    if kind == ORIGINAL:
        return "the original model"
    if kind == REFERENCE:
        return f"reference model seed {seed}"
    return f"{method} run seed {seed}"


def outputs_problem(arrays: Mapping[str, np.ndarray], split: Mapping[str, np.ndarray],
                    classes: int | None) -> str | None:
    """What is wrong with one model's outputs (see OUTPUTS), or None if they fit.

    Checks every key against the split's sizes and the class count (None: not recorded, any count
    of at least 2), the dtypes, and that the numbers are finite (a diverged model's NaN would make
    every score of the store NaN). Workers check their outputs with it before handing them over,
    and the store again when it writes and reads them.
    """
    for key, (part, has_classes, kinds) in OUTPUTS.items():
        if key not in arrays:
            return f"{key} is missing (found: {', '.join(sorted(arrays)) or 'nothing'})"
        value = arrays[key]
        rows = len(split[part])
        if has_classes:
            cols = classes if classes is not None else (value.shape[-1] if value.ndim else 0)
            if value.ndim != 2 or value.shape != (rows, cols) or cols < 2:
                want = f"({rows}, {classes})" if classes is not None else f"({rows}, classes)"
                return (f"{key} has shape {tuple(value.shape)}, expected {want}: {rows} "
                        f"{part} examples" + (f", {classes} classes" if classes else ""))
        elif value.shape != (rows,):
            return (f"{key} has shape {tuple(value.shape)}, expected ({rows},): one value per "
                    f"{part} example")
        if value.dtype.kind not in kinds:
            return f"{key} has dtype {value.dtype}, expected " + (
                "bool" if kinds == "b" else "floating point")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"{key} holds NaN or infinity (a diverged model)"
    return None

def _checkpoint_problem(path: Path, *, every_byte: bool) -> str | None:
    """What is wrong with a model.pt (torch.save writes a zip file), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return f"{path.name} is empty"
            bad = archive.testzip() if every_byte else None
        if bad is not None:
            return f"{path.name} is damaged ({bad} fails its CRC)"
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        return f"{path.name} is damaged or truncated ({type(exc).__name__})"
    return None


def hash_split(split: Mapping[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(split):
        h.update(key.encode())
        h.update(np.ascontiguousarray(split[key], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
