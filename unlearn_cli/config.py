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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

TORCHVISION = "torchvision:"  # model.arch prefix of torchvision's builders


def plugin_arch(arch: str) -> bool:
    """Whether model.arch names a user's builder function (`file.py:fn`, `pkg.module:fn`), not
    torchvision's. Here, not in `models`, so that it is known without importing torch."""
    return ":" in arch and not arch.startswith(TORCHVISION)

def _config_dir() -> Path:
    """The bundled configs: inside the installed package (a wheel maps the repository's top-level
    configs/ to unlearn_cli/configs, see pyproject.toml), else the source tree's configs/."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if packaged.is_dir() else here.parent / "configs"


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = CONFIG_DIR / "digits.yaml"
DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagefolder", "arrays")
FORGET_KINDS = ("random", "class", "indices")
BUILTIN_ARCHS = ("mlp", "resnet18", "fastnet")


@dataclasses.dataclass(frozen=True)
class ForgetConfig:
    """data.forget, the long form of the forget set; kind "" = the short form data.forget_size."""

    kind: str = ""  # random | class | indices
    size: float = 0.0  # random: a count (>= 1) or a fraction of train (< 1)
    classes: tuple[int, ...] = ()  # class: every training example of these labels
    file: str = ""  # indices: a .npy or a text file, one index a line (into the train set)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # digits (bundled with scikit-learn) | cifar10 | cifar100 | svhn | imagefolder | arrays
    dataset: str = "digits"
    # Where data that lives on disk is: a folder (cifar10, cifar100, svhn, imagefolder) or the
    # .npz file (arrays); unused by digits.
    root: str = "data"
    download: bool = False  # cifar10/cifar100/svhn: download into root if missing (internet)
    # Share of all examples held out as the test set, stratified. Digits only: the others have a
    # fixed test set.
    test_fraction: float = 0.25
    forget_size: float = 0.1  # forget set: a count (>= 1) or a fraction of train (< 1)
    split_seed: int = 0  # seeds the train/test split and the choice of the forget set
    image_size: int = 32  # imagefolder: images are resized (and centre-cropped) to this, pixels
    forget: ForgetConfig = ForgetConfig()  # the long form; overrides forget_size when set
    # Held-out validation set for methods that distil or tune on one (`reset-distill`): a count
    # (>= 1) or a fraction of train (< 1), taken out of train before the forget set is drawn, so
    # neither the original nor the reference models see it; 0 = none (the split as before).
    validation_size: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # mlp | resnet18 (CIFAR form) | fastnet (airbench-style conv net) | torchvision:NAME |
    # a plugin: path/to/file.py:fn or pkg.module:fn, called as fn(num_classes, input_shape)
    arch: str = "mlp"
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
    crop_padding: int = 0  # pixels of padding before a random crop back to size; 0 = off
    padding_mode: str = "zeros"  # zeros (torchvision's) | reflect (airbench94's)
    flip: bool = False  # horizontal flips of the training images
    flip_mode: str = "random"  # random (a coin per image and epoch) | alternate (airbench94)
    lookahead: bool = False  # airbench94's lookahead (slow weights from epoch 3), see training.py
    # Test-time augmentation of the stored outputs: none | flip | flip-translate (6 views). With it,
    # the metric reads every model's TTA logits.
    tta: str = "none"
    ensemble_size: int = 0  # engine ensemble: models per lockstep group; 0 = a job's all at once
    # Speed only; ignored on CPU, where training stays plain float32 and eager.
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA; weights, BatchNorm stay fp32)
    channels_last: bool = False  # NHWC memory layout on CUDA (faster convolutions in bf16/fp16)
    compile: str = "none"  # none | default | reduce-overhead | max-autotune: torch.compile on CUDA
    cuda_graph: bool = False  # capture each fixed-shape training step as a CUDA graph (CUDA)


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
    # Models (train-refs) or runs (apply) trained alone and timed between speed probes, for the
    # runtime ratio, when the ensemble engine trains the others in lockstep: chosen by seed
    # (train_refs.timed_alone; 32: the ratio of `retrain` then reads 1 +- 0.15 under load). The
    # loop engine times every model alone anyway.
    timed_alone: int = 32
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
        """A short hash of what defines the experiment (see `identity`), stable across versions:
        the form version 0.1.0 wrote (its keys kept whatever their value, every key added since
        left out while it holds its neutral value), so a config that 0.1.0 could express keeps the
        hash 0.1.0 gave it."""
        return _hash(identity(self.to_dict(), keep=HASHED_BY_0_1_0))

    def identity_hashes(self) -> set[str]:
        """Every hash a model of this experiment may carry: `identity_hash`, and the form of the
        stores made before 0.1.0 (every later key left out while neutral)."""
        return {self.identity_hash(), _hash(identity(self.to_dict()))}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# The sections that define the reference models: a store made under other values is incompatible.
REFERENCE_SECTIONS = ("data", "model", "train")
# Keys in those sections that say where data lives or how to fetch it, not what the models are:
# moving the data folder must not make a store incompatible.
NOT_IDENTITY = {"data": ("root", "download")}
# The keys of those sections that the first stores were written with. Every key added since is in
# ADDED_LATER with the value (JSON form) that reproduces what stores made before it did: a new key
# of data, model or train must be added there (a test checks it).
FIRST_KEYS = {
    "data": ("dataset", "root", "test_fraction", "forget_size", "split_seed"),
    "model": ("arch", "hidden"),
    "train": ("epochs", "batch_size", "lr", "momentum", "weight_decay", "engine"),
}
ADDED_LATER: dict[str, dict[str, Any]] = {
    "data": {"download": False, "image_size": 32,
             "forget": {"kind": "", "size": 0.0, "classes": [], "file": ""},
             "validation_size": 0.0},
    "model": {"widths": []},
    "train": {"nesterov": True, "schedule": "cosine", "label_smoothing": 0.0, "drop_last": False,
              "crop_padding": 0, "flip": False, "precision": "fp32", "channels_last": False,
              "compile": "none", "padding_mode": "zeros", "flip_mode": "random",
              "lookahead": False, "tta": "none", "ensemble_size": 0, "cuda_graph": False},
}
# The later keys that stores of version 0.1.0 hashed whatever their value: `identity_hash` keeps
# them, so 0.1.0's hashes stay what they were; `identity_hashes` also accepts the earlier form.
HASHED_BY_0_1_0 = {
    "data": ("download",),
    "model": ("widths",),
    "train": ("nesterov", "schedule", "label_smoothing", "drop_last", "crop_padding", "flip",
              "precision", "channels_last", "compile"),
}


def identity(config: Mapping[str, Any], *,
             keep: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The part of a resolved config (as `Config.to_dict()`) that defines an experiment.

    A key of ADDED_LATER is left out while it holds its neutral value (the value that reproduces
    what came before it), so adding a key changes no existing identity; `keep` names later keys
    to keep whatever their value (per section).
    """
    out = {}
    for section in REFERENCE_SECTIONS:
        skip = NOT_IDENTITY.get(section, ())
        kept = (keep or {}).get(section, ())
        later = ADDED_LATER.get(section, {})
        out[section] = {k: v for k, v in config.get(section, {}).items()
                        if k not in skip and (k in kept or not (k in later and v == later[k]))}
    # The long form of the forget set makes data.forget_size moot; {kind: random, size: N} is the
    # same experiment as forget_size: N; an indices file's place is not what defines the
    # experiment (its content is, through the split's hash).
    data = out.get("data", {})
    forget = data.pop("forget", None) or {}
    if forget.get("kind") == "random":
        data["forget_size"] = forget.get("size")
    elif forget.get("kind"):
        data.pop("forget_size", None)
        data["forget"] = {k: v for k, v in forget.items() if k != "file"}
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
        # A bare number is refused, not taken as [number]: `hidden: 128` may well mean [128, 128].
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
        if dataclasses.is_dataclass(hints[key]):  # a nested section, such as data.forget
            kwargs[key] = build_dataclass(hints[key], value, f"{prefix}.{key}", problems)
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            hint = ""
            if typing.get_origin(hints[key]) is tuple and isinstance(value, int):
                hint = f" (write [{value}] for one)"
            problems.append(
                f"{prefix}.{key}: expected {_type_name(hints[key])}, got {value!r}{hint}"
            )
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _check_values(cfg: Config, problems: list[str]) -> None:
    def need(cond: bool, key: str, what: str, value: Any) -> None:
        if not cond:
            problems.append(f"{key}: expected {what}, got {value!r}")

    d, t, m, launch = cfg.data, cfg.train, cfg.model, cfg.launch
    need(d.dataset in DATASETS, "data.dataset", f"one of: {', '.join(DATASETS)}", d.dataset)
    need(0 < d.test_fraction < 1, "data.test_fraction", "a fraction between 0 and 1",
         d.test_fraction)
    need(d.image_size >= 8 if d.dataset == "imagefolder" else d.image_size == 32,
         "data.image_size", "pixels >= 8" if d.dataset == "imagefolder" else
         f"no value for {d.dataset} (only imagefolder resizes; remove the key)", d.image_size)
    _check_forget(d.forget, problems)
    need(not d.download or d.dataset in ("cifar10", "cifar100", "svhn"), "data.download",
         f"false for {d.dataset} (only cifar10, cifar100 and svhn can be downloaded)", d.download)
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
    need(m.arch in BUILTIN_ARCHS or ":" in m.arch, "model.arch",
         f"one of: {', '.join(BUILTIN_ARCHS)}, torchvision:NAME, or a plugin path/to/file.py:fn "
         "or pkg.module:fn", m.arch)
    need(d.validation_size == 0 or 0 < d.validation_size < 1
         or (d.validation_size >= 1 and float(d.validation_size).is_integer()),
         "data.validation_size", "0 (none), a fraction in (0, 1) or a whole count >= 1",
         d.validation_size)
    need(all(h >= 1 for h in m.hidden), "model.hidden", "widths >= 1", list(m.hidden))
    stages = {"mlp": 0, "resnet18": 4, "fastnet": 3}.get(m.arch, 0)
    need(len(m.widths) in ((0, stages) if stages else (0,)) and all(w >= 1 for w in m.widths),
         "model.widths",
         f"{stages} widths >= 1 for {m.arch} (or none)" if stages else f"none for {m.arch}",
         list(m.widths))
    need(d.dataset != "digits" or not (m.arch in ("resnet18", "fastnet")
                                       or m.arch.startswith("torchvision:")), "model.arch",
         f"an architecture for {d.dataset} (mlp); {m.arch} needs images (cifar10, ...)", m.arch)
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
    need((t.crop_padding == 0 and not t.flip) or d.dataset != "digits", "train.crop_padding",
         f"0 and train.flip false for {d.dataset} (crop and flip need images)",
         f"crop_padding={t.crop_padding}, flip={t.flip}")
    need(t.padding_mode in ("zeros", "reflect"), "train.padding_mode", "zeros or reflect",
         t.padding_mode)
    need(t.flip_mode in ("random", "alternate"), "train.flip_mode", "random or alternate",
         t.flip_mode)
    need(t.tta in ("none", "flip", "flip-translate"), "train.tta", "none, flip or flip-translate",
         t.tta)
    need(t.tta == "none" or d.dataset not in ("digits", "arrays"), "train.tta",
         f"none for {d.dataset} (test-time flips and shifts need images)", t.tta)
    need(t.ensemble_size >= 0, "train.ensemble_size", "an integer >= 0 (0 = automatic)",
         t.ensemble_size)
    need(t.precision in ("fp32", "bf16", "fp16"), "train.precision", "fp32, bf16 or fp16",
         t.precision)
    need(t.compile in ("none", "default", "reduce-overhead", "max-autotune"), "train.compile",
         "none, default, reduce-overhead or max-autotune", t.compile)
    device = launch.device.strip().lower()
    need(device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and all(
        p.strip().isdigit() for p in device[5:].split(","))), "launch.device",
        "auto, cpu, cuda or a GPU list such as cuda:0,1", launch.device)
    need(launch.workers >= 0, "launch.workers", "an integer >= 0 (0 = automatic)", launch.workers)
    need(launch.workers_per_gpu >= 1, "launch.workers_per_gpu", "an integer >= 1",
         launch.workers_per_gpu)
    need(launch.chunk_size >= 0, "launch.chunk_size", "an integer >= 0 (0 = automatic)",
         launch.chunk_size)
    need(launch.threads >= 1, "launch.threads", "an integer >= 1", launch.threads)
    need(launch.timed_alone >= 1, "launch.timed_alone", "an integer >= 1", launch.timed_alone)
    need(launch.backend in ("local", "ray"), "launch.backend", "local or ray", launch.backend)
    need(bool(launch.address.strip()), "launch.address", "auto, local or host:port",
         launch.address)


# Models per bank. The official metric was run with 512; far more only costs disk (about 0.1 MB
# of outputs per digits model, 0.7 MB per CIFAR-10 model) and hours. A typo such as 99999999999
# would otherwise silently plan billions of jobs.
MAX_MODELS = 10_000


def check_num_models(n: int | None) -> None:
    """Refuse a --num-models outside 1..MAX_MODELS (None: the command's default)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--num-models must be at least 1, got {n}")
    if n > MAX_MODELS:
        raise ConfigError(
            f"--num-models {n} is more than {MAX_MODELS:,} models per bank; the challenge used "
            "512 (pick a number up to that, e.g. --num-models 100)"
        )


def _check_forget(f: ForgetConfig, problems: list[str]) -> None:
    """data.forget: each kind takes its own key and no other."""
    if not f.kind and f == ForgetConfig():
        return
    own = {"random": "size", "class": "classes", "indices": "file"}.get(f.kind)
    if own is None:
        problems.append(f"data.forget.kind: expected one of: {', '.join(FORGET_KINDS)}, got "
                        f"{f.kind!r} (for example data.forget={{kind: class, classes: [3]}})")
        return
    given = [k for k in ("size", "classes", "file") if getattr(f, k) != getattr(ForgetConfig, k)]
    for key in given:
        if key != own:
            problems.append(f"data.forget.{key}: expected no value for kind {f.kind} (it takes "
                            f"data.forget.{own}), got {getattr(f, key)!r}")
    if f.kind == "random" and not (0 < f.size < 1 or (f.size >= 1 and f.size.is_integer())):
        problems.append(f"data.forget.size: expected a fraction in (0, 1) or a whole count >= 1, "
                        f"got {f.size!r}")
    if f.kind == "class" and (not f.classes or min(f.classes) < 0
                              or len(set(f.classes)) != len(f.classes)):
        problems.append(f"data.forget.classes: expected distinct class labels >= 0, for example "
                        f"[3, 5], got {list(f.classes)!r}")
    if f.kind == "indices" and not f.file:
        problems.append("data.forget.file: expected the path of a .npy or text file of training "
                        "indices, one a line")


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
        # PyYAML's message spans several lines (with a caret drawing): keep its first sentence.
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value {raw.strip()!r} is not valid YAML ({what}); "
                          "quote strings, write lists as [1, 2]") from None
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
    """Load a YAML config (the digits default when `path` is None) and apply `--set` overrides.

    A bare name that is not a file here names a bundled config: `cifar10-fast` or
    `cifar10-fast.yaml` (`unlearn configs` lists them).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file() and path.parent == Path("."):
        path = bundled_config(path.name) or path
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass --config with an existing YAML file or the "
            f"name of a bundled one ({', '.join(n + '.yaml' for n in bundled_configs())}; "
            "`unlearn configs` lists them)"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; pass a YAML config") from None
    if raw is None:
        raise ConfigError(
            f"config file {path} is empty (no keys, or only comments); write the settings to "
            f"change (e.g. train: {{epochs: 10}}), or leave out --config for {DEFAULT_CONFIG.name}"
        )
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    source = f"{path} with the command-line options" if overrides else str(path)
    return from_mapping(raw, source=source)


def bundled_configs() -> list[str]:
    """Names of the configs that ship with the package, such as `digits`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def bundled_config(name: str) -> Path | None:
    """The bundled config called `name` (with or without .yaml), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    return CONFIG_DIR / f"{stem}.yaml" if stem in bundled_configs() else None


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
