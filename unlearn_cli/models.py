"""Model builders by name. A checkpoint stores the spec that rebuilds its model.

A model takes batches of the dataset in its stored form (see `data.py`): for image datasets the spec
holds a `normalize` entry (per-channel mean and std in pixel units) and the model begins with a
`Normalize` layer that turns uint8 pixels (NCHW, or NHWC) into normalised float32. Its constants are
non-persistent buffers: they move with `.to(device)` but are rebuilt from the spec, not stored in
the state dict. The digits MLP has no such layer and its spec and state dict are as they were.

Architectures:
- `mlp`: Flatten, then Linear+ReLU per `hidden` width, then a Linear classifier.
- `resnet18`: ResNet-18 in its CIFAR form (3x3 stride-1 stem, no max-pool; 11.17 M parameters,
  1.11 GFLOP forward per 32x32 image), as trained by the challenge's starting kit.
- `fastnet`: a small conv net in the spirit of airbench94 (Keller Jordan, 2024): a frozen 2x2
  whitening convolution set from the training images (`init_from_data`), then three blocks of
  conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU (widths 64, 256, 256), a
  max-pool and a bias-free linear head scaled by 1/9. Its BatchNorms learn only a bias, whose
  learning rate is 64x that of the weights (via a reparametrisation, so plain SGD does it).
- `torchvision:NAME`: any torchvision classification model (`torchvision.models.list_models()`),
  built with `num_classes` from the data and random weights (never downloaded ones).
- a plugin, `path/to/file.py:fn` or `pkg.module:fn`: `fn(num_classes, input_shape)` returns the
  `nn.Module`; it receives inputs as the normalisation layer leaves them (float32 NCHW images, or
  the features as stored). The spec records the plugin's absolute path and the SHA-256 of its
  file: a checkpoint is rebuilt from that file, and refused if the file changed since.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import TORCHVISION, ModelConfig, plugin_arch
from .errors import ConfigError, StoreError

DEFAULT_WIDTHS = {"resnet18": (64, 128, 256, 512), "fastnet": (64, 256, 256)}


def model_spec(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, *,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
               ) -> dict[str, Any]:
    """Everything needed to rebuild the model: stored in every checkpoint.

    mean, std: per-channel statistics of the raw input (pixel units) for the normalisation layer;
    None for inputs that are stored ready to use (digits).
    """
    spec: dict[str, Any] = {
        "arch": cfg.arch,
        "hidden": list(cfg.hidden),
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
    }
    if cfg.arch in DEFAULT_WIDTHS:
        spec["widths"] = list(cfg.widths or DEFAULT_WIDTHS[cfg.arch])
    if is_plugin(cfg.arch):
        spec["plugin"] = plugin_record(cfg.arch)
    if mean is not None and std is not None:
        spec["normalize"] = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return spec


class Normalize(nn.Module):
    """Raw pixels (uint8 or any dtype, NCHW or NHWC) -> float32 (x - mean) / std per channel.

    The output keeps the input's memory layout (an NHWC batch comes out channels-last).
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, c, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[1]
        if x.dim() == 4 and x.shape[1] != c and x.shape[-1] == c:
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view
        return (x.float() - self.mean) * self.inv_std


# ---------------------------------------------------------------- ResNet-18, CIFAR form


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem without max-pool, 4 stages of 2 blocks."""

    def __init__(self, widths: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- fastnet (airbench-style)

FASTNET_BN_MOMENTUM = 0.4  # torch's convention (weight of the new batch): airbench's 0.6
FASTNET_BN_EPS = 1e-12
FASTNET_BIAS_SCALE = 8.0  # bias = 8 * parameter: SGD moves the bias 8^2 = 64x faster (airbench)
FASTNET_LOGIT_SCALE = 1 / 9  # airbench's output scaling
WHITEN_KERNEL = 2  # whitening patch size, pixels
WHITEN_IMAGES = 5000  # training images whose patches set the whitening layer
WHITEN_EPS = 5e-4  # added to the patch covariance's eigenvalues


class BiasOnlyBatchNorm(nn.Module):
    """BatchNorm without a learned scale; its bias is stored divided by FASTNET_BIAS_SCALE."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=FASTNET_BN_EPS, momentum=FASTNET_BN_MOMENTUM,
                                   affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + (FASTNET_BIAS_SCALE * self.bias).view(1, -1, 1, 1).to(x.dtype)


def _identity_init_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 'same' convolution whose first `cin` filters start as the identity (a built-in skip)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


class FastBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _identity_init_conv(cin, cout)
        self.norm1 = BiasOnlyBatchNorm(cout)
        self.conv2 = _identity_init_conv(cout, cout)
        self.norm2 = BiasOnlyBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, widths: list[int], num_classes: int, in_channels: int):
        super().__init__()
        patch = in_channels * WHITEN_KERNEL**2
        # Frozen: set from the data by `init_from_data`; its bias is trained.
        self.whiten = nn.Conv2d(in_channels, 2 * patch, WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        blocks, cin = [], 2 * patch
        for w in widths:
            blocks.append(FastBlock(cin, w))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        x = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        return self.head(x) * FASTNET_LOGIT_SCALE


# ---------------------------------------------------------------- building


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an untrained model from a spec (initialised from torch's global RNG)."""
    arch = spec["arch"]
    norm = spec.get("normalize")
    front: list[nn.Module] = [Normalize(norm["mean"], norm["std"])] if norm else []
    if arch == "mlp":
        layers: list[nn.Module] = [*front, nn.Flatten()]
        width = math.prod(spec["input_shape"])
        for hidden in spec["hidden"]:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, spec["num_classes"]))
        return nn.Sequential(*layers)
    if arch in ("resnet18", "fastnet"):
        cls = ResNet18 if arch == "resnet18" else FastNet
        body = cls(spec["widths"], spec["num_classes"], spec["input_shape"][0])
    elif arch.startswith(TORCHVISION):
        body = _torchvision_model(arch[len(TORCHVISION):], spec["num_classes"])
    elif is_plugin(arch):
        body = _plugin_model(spec)
    else:
        raise ValueError(f"unknown model arch {spec['arch']!r}")
    return nn.Sequential(*front, body) if front else body


# ---------------------------------------------------------------- torchvision and plugins

is_plugin = plugin_arch  # a user's builder function, not torchvision's (config.plugin_arch)


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    """torchvision's classification model `name`, randomly initialised, num_classes outputs."""
    import torchvision
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)  # classification models only
    if name not in known:
        raise ConfigError(
            f"model.arch: torchvision {torchvision.__version__} has no classification model "
            f"{name!r}; use one of torchvision.models.list_models(), e.g. torchvision:resnet18, "
            "torchvision:resnet50, torchvision:mobilenet_v3_small"
        )
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        # Their auxiliary heads make training return a tuple; the metric needs plain logits.
        kwargs.update(aux_logits=False, init_weights=True)
    return tvm.get_model(name, **kwargs)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _FILE_HASHES[key]


def plugin_record(arch: str) -> dict[str, Any]:
    """Where a model plugin lives: {path (absolute), module (or None for a file), function,
    sha256 of the file}; ConfigError if it cannot be found."""
    where, _, fn_name = arch.rpartition(":")
    if not where or not fn_name.isidentifier():
        raise ConfigError(f"model.arch {arch!r} is not of the form path/to/file.py:function or "
                          "pkg.module:function (or torchvision:NAME, or a built-in)")
    module = None
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"model.arch {arch!r}: file {path} does not exist; give the path of "
                              "a .py file, relative to the current folder or absolute")
    else:
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not Path(found.origin).is_file():
            raise ConfigError(f"model.arch {arch!r}: cannot find module {where!r}; check the name "
                              "and that it is importable (installed, or its folder on PYTHONPATH)")
        module, path = where, Path(found.origin).resolve()
    return {"path": str(path), "module": module, "function": fn_name, "sha256": _sha256(path)}


def _plugin_model(spec: dict[str, Any]) -> nn.Module:
    """Call the plugin recorded in the spec, after checking its file is the one recorded."""
    record = spec.get("plugin") or plugin_record(spec["arch"])
    arch, path = spec["arch"], Path(record["path"])
    now = _verify_plugin_file(arch, record)
    if record.get("module"):
        try:
            module = importlib.import_module(record["module"])
        except Exception as exc:  # noqa: BLE001 - the user's module, any error
            raise ConfigError(f"model.arch {arch!r}: importing {record['module']} failed: "
                              f"{type(exc).__name__}: {exc}") from None
    else:
        name = f"unlearn_model_plugin_{now[:16]}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - the user's file, any error
                raise ConfigError(f"model.arch {arch!r}: importing {path} failed: "
                                  f"{type(exc).__name__}: {exc}") from None
            sys.modules[name] = module
    fn = getattr(module, record["function"], None)
    if not callable(fn):
        raise ConfigError(f"model.arch {arch!r}: {path} has no function {record['function']!r}")
    try:
        model = fn(int(spec["num_classes"]), tuple(spec["input_shape"]))
    except Exception as exc:  # noqa: BLE001 - the user's function, any error
        raise ConfigError(f"model.arch {arch!r}: {record['function']}({spec['num_classes']}, "
                          f"{tuple(spec['input_shape'])}) failed: {type(exc).__name__}: {exc}"
                          ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.arch {arch!r}: {record['function']} returned "
                          f"{type(model).__name__}; it must return a torch.nn.Module")
    return model


def _verify_plugin_file(arch: str, record: dict[str, Any]) -> str:
    """The plugin file's SHA-256; StoreError if the file is gone or not the one recorded."""
    path = Path(record["path"])
    if not path.is_file():
        raise StoreError(f"model plugin {arch!r}: its file {path} is gone; restore it (the "
                         "checkpoints need it to rebuild the model), or use a new --store")
    now = _sha256(path)
    if now != record["sha256"]:
        raise StoreError(
            f"model plugin {arch!r}: {path} changed since the model was made (sha256 "
            f"{record['sha256'][:12]}... then, {now[:12]}... now); restore the file the store was "
            "made with, or use a new --store"
        )
    return now


def check_sources(spec: dict[str, Any]) -> None:
    """Refuse a stored spec whose plugin file is gone or changed (before any worker starts)."""
    if is_plugin(spec.get("arch", "")) and spec.get("plugin"):
        _verify_plugin_file(spec["arch"], spec["plugin"])


def check_model(spec: dict[str, Any], x: torch.Tensor, dataset: str) -> None:
    """Build the model once and run two examples of `x` through it, in training and evaluation
    mode, so a model that cannot take the data fails here with one line, before any job starts.

    x: a few examples in the stored form [k, *input_shape]; dataset: its name, for messages.
    """
    arch, shape = spec["arch"], list(spec["input_shape"])
    needs_images = arch in ("resnet18", "fastnet") or arch.startswith(TORCHVISION)
    if needs_images and len(shape) != 3:
        raise ConfigError(f"model.arch {arch} needs images [C, H, W], but the {dataset} data "
                          f"holds features {shape}; use model.arch=mlp or a plugin")
    if arch.startswith(TORCHVISION) and shape[0] != 3:
        raise ConfigError(f"model.arch {arch} takes 3-channel images, but the {dataset} images "
                          f"have {shape[0]} channel(s); use resnet18, fastnet, mlp or a plugin")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(spec)
    batch = x[:2]
    for training in (True, False):
        model.train(training)
        try:
            with torch.no_grad():
                out = model(batch)
        except Exception as exc:  # noqa: BLE001 - any failure means the model does not fit
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(
                f"model.arch {arch} cannot take the {dataset} inputs {shape} "
                f"({type(exc).__name__}: {first[:200]}); choose another model.arch"
                + (", or a larger data.image_size" if dataset == "imagefolder" else "")
            ) from None
        want = [len(batch), spec["num_classes"]]
        if not isinstance(out, torch.Tensor) or list(out.shape) != want:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"model.arch {arch} returns {got} for a batch of {len(batch)}; "
                              f"expected logits {want} (one per class)")


def init_model(spec: dict[str, Any], seed: int) -> nn.Module:
    """A freshly initialised model (on the CPU) whose weights depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


_WORKER_MODELS: dict[tuple[str, str], nn.Module] = {}
_MAX_WORKER_MODELS = 2  # a worker serves one experiment at a time; keep memory bounded


def fresh_model(spec: dict[str, Any], seed: int, device: torch.device | str) -> nn.Module:
    """A model with `init_model(spec, seed)`'s weights on `device`, reusing this process's module.

    A long-lived worker builds (and, when training compiles it, compiles) one module per spec and
    device, and copies each job's initial weights into it: the same weights as a new model, without
    a new module, so a compiled graph stays valid. The previous job's model is overwritten: finish
    with it (store it) before asking for the next.
    """
    key = (json.dumps(spec, sort_keys=True), str(torch.device(device)))
    init = init_model(spec, seed)
    model = _WORKER_MODELS.get(key)
    if model is None:
        if len(_WORKER_MODELS) >= _MAX_WORKER_MODELS:
            _WORKER_MODELS.clear()
        model = _WORKER_MODELS[key] = init.to(device)
    else:
        model.load_state_dict(init.state_dict())  # copies in place: layout and graphs stay
    return model.eval()


@torch.no_grad()
def init_from_data(model: nn.Module, x: torch.Tensor) -> None:
    """Data-dependent initialisation before training from scratch; a no-op for most models.

    fastnet: its whitening convolution gets, for each eigenvector v (eigenvalue l) of the
    uncentred covariance of the 2x2x3 patches of the first WHITEN_IMAGES images of `x` (normalised),
    the filters v / sqrt(l + eps) and -v / sqrt(l + eps). Call it with the model's own training set
    (a reference model sees only retain), never when fine-tuning.
    """
    net = model[-1] if isinstance(model, nn.Sequential) else model
    if not isinstance(net, FastNet):
        return
    images = x[:WHITEN_IMAGES]
    if isinstance(model, nn.Sequential) and isinstance(model[0], Normalize):
        images = model[0](images)
    images = images.float()
    c, k = images.shape[1], WHITEN_KERNEL
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # [n, c, h', w', k, k]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # rows ordered (c, kh, kw)
    cov = (patches.T @ patches / len(patches)).double().cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + WHITEN_EPS)[:, None]
    filters = filters.reshape(-1, c, k, k).float()
    net.whiten.weight.copy_(torch.cat([filters, -filters]))


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last linear layer (the classifier), for methods that re-initialise it."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError("the model has no nn.Linear layer to use as its classifier head")
    return last


def supports_ensemble(model: nn.Module) -> bool:
    """Models without stored buffers (no BatchNorm statistics) can be trained as a vmapped
    ensemble; non-persistent constants (the normalisation layer) are shared by all members."""
    names = {name for name, _ in model.named_parameters()}
    return all(key in names for key in model.state_dict())


# ---------------------------------------------------------------- cost


def forward_flops(spec: dict[str, Any]) -> int:
    """FLOPs of one forward pass on one example: 2 x the multiply-adds of every convolution and
    linear layer (the usual count; normalisation, activations and pooling are left out).

    Counted from the layer shapes on the meta device (no memory, no data). Forward + backward costs
    about 3x this (the backward pass computes gradients for both inputs and weights).
    """
    with torch.device("meta"):
        model = build_model(spec)
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += 2 * output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()(torch.zeros(1, *spec["input_shape"], device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total
