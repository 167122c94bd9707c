"""Experiment configuration: YAML -> frozen dataclasses, `--set` overrides, validation.

Every problem in a config (unknown keys, wrong types, bad values) is collected and reported in one
`ConfigError`, each line naming its dotted key. Unknown keys are errors, never ignored: a typo such
as `train.epoch` would otherwise silently train with the default.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "digits.yaml"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits (bundled with scikit-learn) | cifar10 (from root)
    root: str = "data"  # folder for datasets that live on disk; unused by digits
    download: bool = False  # cifar10: download into root if missing (needs internet)
    # Share of all examples held out as the test set, stratified. Digits only: cifar10 has a fixed
    # test set (test_batch).
    test_fraction: float = 0.25
    forget_size: float = 0.1  # forget set: a count (>= 1) or a fraction of train (< 1)
    split_seed: int = 0  # seeds the train/test split and the choice of the forget set


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"  # mlp | resnet18 (CIFAR form) | fastnet (airbench-style conv net)
    hidden: tuple[int, ...] = (128,)  # mlp: hidden layer widths, units
    # Channels per stage; empty = the architecture's own: resnet18 [64, 128, 256, 512],
    # fastnet [64, 256, 256]. Smaller values make tiny test models.
    widths: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # SGD with Nesterov momentum and a cosine schedule to zero. On digits, 30 epochs at lr 0.1 reach
    # about 97.5% test accuracy (three seeds measured: 97.3-98.0%); lr 0.02 stays below 96%.
    epochs: int = 30  # passes over the training data
    batch_size: int = 64  # examples per step
    lr: float = 0.1  # peak learning rate, per step of batch_size examples
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2, applied by SGD
    engine: str = "auto"  # auto | ensemble (many models as one batched model) | loop (one by one)
    nesterov: bool = True  # Nesterov momentum; false = classical momentum (torch.optim.SGD's)
    schedule: str = "cosine"  # cosine (to 0) | triangle (airbench: 0.2x -> 1x at 23% -> 0.07x)
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0 = off
    drop_last: bool = False  # skip each epoch's last partial batch (fixed shapes for compile)
    crop_padding: int = 0  # pixels of zero padding before a random crop back to size; 0 = off
    flip: bool = False  # random horizontal flip of each training image
    # Speed only; ignored on CPU, where training stays plain float32 and eager.
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA; weights, BatchNorm stay fp32)
    channels_last: bool = False  # NHWC memory layout on CUDA (faster convolutions in bf16/fp16)
    compile: str = "none"  # none | default | reduce-overhead | max-autotune: torch.compile on CUDA


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:0,1
    workers: int = 0  # CPU worker processes; 0 = cores // threads, capped by the number of jobs
    workers_per_gpu: int = 1  # long-lived worker processes per GPU
    chunk_size: int = 0  # models per job; 0 = automatic
    # torch intra-op threads per CPU job. Fixed, not derived from the worker count, because the
    # thread count changes the order of float sums: a model is then bit-identical whatever
    # --workers is. 1 = one job per core, the fastest for many small models.
    threads: int = 1
    backend: str = "local"  # local (processes on this machine) | ray (a Ray cluster)
    address: str = "auto"  # ray: auto (RAY_ADDRESS or a running `ray start`) | local | host:port


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "digits"  # the experiment's name: the default store is runs/<name>
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    launch: LaunchConfig = LaunchConfig()
    # Hyperparameters per unlearning method: method.<name>.<key>. Validated against the method's own
    # parameter dataclass when the method is resolved (see methods/__init__.py).
    method: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity_hash(self) -> str:
        """A short stable hash of what defines the experiment (see `identity`)."""
        blob = json.dumps(identity(self.to_dict()), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The sections that define the reference models: a store made under other values is incompatible.
REFERENCE_SECTIONS = ("data", "model", "train")
# Keys in those sections that say where data lives or how to fetch it, not what the models are:
# moving the data folder must not make a store incompatible.
NOT_IDENTITY = {"data": ("root", "download")}


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (as `Config.to_dict()`) that defines an experiment."""
    out = {}
    for section in REFERENCE_SECTIONS:
        skip = NOT_IDENTITY.get(section, ())
        out[section] = {k: v for k, v in config.get(section, {}).items() if k not in skip}
    return out

_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "launch": LaunchConfig,
}


def _type_name(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if typing.get_origin(tp) is tuple:
        return "a list of integers"
    return str(tp)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check `value` against the annotation `tp`; return (ok, converted value)."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the number it spells.
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)  # nan and inf are never meant
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if typing.get_origin(tp) is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        return ok, tuple(value) if ok else value
    return True, value


def build_dataclass(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build the frozen dataclass `cls` from a mapping, appending every problem to `problems`.

    Keys are named in problems as `<prefix>.<key>`. Returns an instance built from the valid keys
    (defaults elsewhere), so that callers can keep collecting problems in other sections.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{prefix}: expected a mapping of keys to values, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            problems.append(
                f"{prefix}.{key}: unknown key; valid keys under {prefix}: {', '.join(names)}"
            )
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problems.append(
                f"{prefix}.{key}: expected {_type_name(hints[key])}, got {value!r}"
            )
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _check_values(cfg: Config, problems: list[str]) -> None:
    def need(cond: bool, key: str, what: str, value: Any) -> None:
        if not cond:
            problems.append(f"{key}: expected {what}, got {value!r}")

    d, t, m, launch = cfg.data, cfg.train, cfg.model, cfg.launch
    need(d.dataset in ("digits", "cifar10"), "data.dataset", "one of: digits, cifar10",
         d.dataset)
    need(0 < d.test_fraction < 1, "data.test_fraction", "a fraction between 0 and 1",
         d.test_fraction)
    need(d.dataset == "digits" or d.test_fraction == DataConfig.test_fraction,
         "data.test_fraction",
         f"no value for {d.dataset}, whose test set is fixed (remove the key)",
         d.test_fraction)
    need(
        0 < d.forget_size < 1 or (d.forget_size >= 1 and float(d.forget_size).is_integer()),
        "data.forget_size",
        "a fraction in (0, 1) or a whole count >= 1",
        d.forget_size,
    )
    need(m.arch in ("mlp", "resnet18", "fastnet"), "model.arch",
         "one of: mlp, resnet18, fastnet", m.arch)
    need(all(h >= 1 for h in m.hidden), "model.hidden", "widths >= 1", list(m.hidden))
    stages = {"mlp": 0, "resnet18": 4, "fastnet": 3}.get(m.arch, 0)
    need(len(m.widths) in ((0, stages) if stages else (0,)) and all(w >= 1 for w in m.widths),
         "model.widths",
         f"{stages} widths >= 1 for {m.arch} (or none)" if stages else f"none for {m.arch}",
         list(m.widths))
    need(m.arch == "mlp" or d.dataset == "cifar10", "model.arch",
         f"an architecture for {d.dataset} (mlp); {m.arch} needs 3x32x32 images (cifar10)", m.arch)
    need(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    need(t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "a number > 0", t.lr)
    need(0 <= t.momentum < 1, "train.momentum", "a number in [0, 1)", t.momentum)
    need(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    need(
        t.engine in ("auto", "ensemble", "loop"), "train.engine", "auto, ensemble or loop", t.engine
    )
    need(t.schedule in ("cosine", "triangle"), "train.schedule", "cosine or triangle", t.schedule)
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", "a number in [0, 1)",
         t.label_smoothing)
    need(t.crop_padding >= 0, "train.crop_padding", "an integer >= 0 (0 = no random crop)",
         t.crop_padding)
    need((t.crop_padding == 0 and not t.flip) or d.dataset == "cifar10", "train.crop_padding",
         f"0 and train.flip false for {d.dataset} (crop and flip need images)",
         f"crop_padding={t.crop_padding}, flip={t.flip}")
    need(t.precision in ("fp32", "bf16", "fp16"), "train.precision", "fp32, bf16 or fp16",
         t.precision)
    need(t.compile in ("none", "default", "reduce-overhead", "max-autotune"), "train.compile",
         "none, default, reduce-overhead or max-autotune", t.compile)
    need(launch.workers >= 0, "launch.workers", "an integer >= 0 (0 = automatic)", launch.workers)
    need(launch.workers_per_gpu >= 1, "launch.workers_per_gpu", "an integer >= 1",
         launch.workers_per_gpu)
    need(launch.chunk_size >= 0, "launch.chunk_size", "an integer >= 0 (0 = automatic)",
         launch.chunk_size)
    need(launch.threads >= 1, "launch.threads", "an integer >= 1", launch.threads)
    need(launch.backend in ("local", "ray"), "launch.backend", "local or ray", launch.backend)
    need(bool(launch.address.strip()), "launch.address", "auto, local or host:port",
         launch.address)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set dotted.key=value`; the value is read as YAML (`3`, `0.1`, `[64, 64]`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {text!r}: expected dotted.key=value, for example --set train.epochs=10"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with every `--set` applied in order."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config is {type(raw).__name__}, expected a mapping of sections "
                          "(data:, model:, train:, ...) at the top level")
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"--set {text!r}: {part!r} holds a value, not a section; "
                    "set the section's keys one by one"
                )
            node = child
        node[path[-1]] = value
    return out


def from_mapping(raw: Any, *, source: str = "config") -> Config:
    """Validate a raw mapping (parsed YAML plus overrides) into a `Config`, or raise one error."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {raw!r}")
    known = ["name", *(_SECTIONS), "method"]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name":
            if isinstance(value, str) and value not in ("", ".", "..") and "/" not in value:
                kwargs["name"] = value
            else:
                problems.append(
                    f"name: expected a folder name (no '/', not '.' or '..'), got {value!r}"
                )
        elif key in _SECTIONS:
            kwargs[key] = build_dataclass(_SECTIONS[key], value, key, problems)
        elif key == "method":
            if value is None:
                value = {}
            if not isinstance(value, Mapping) or not all(
                isinstance(v, Mapping) or v is None for v in value.values()
            ):
                problems.append(
                    "method: expected one mapping of hyperparameters per method name, "
                    "for example method: {finetune: {epochs: 5}}"
                )
            else:
                kwargs["method"] = {str(k): dict(v or {}) for k, v in value.items()}
        else:
            problems.append(f"{key}: unknown key; valid top-level keys: {', '.join(known)}")
    cfg = Config(**kwargs)
    _check_values(cfg, problems)
    if problems:
        raise ConfigError(
            f"{source} has {len(problems)} problem(s): " + "; ".join(problems)
        )
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (the digits default when `path` is None) and apply `--set` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        hint = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(
            f"config file {path} does not exist; pass --config with an existing YAML file "
            f"(bundled: {hint})"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = str(exc).replace("\n", " ")
        raise ConfigError(f"{path} is not valid YAML: {line}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; pass a YAML config") from None
    overrides = list(overrides)
    raw = apply_overrides(raw or {}, overrides)
    source = f"{path} with the command-line options" if overrides else str(path)
    return from_mapping(raw, source=source)


def diff_sections(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings, as `key: old -> new`."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_sections(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
