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
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig

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
        return nn.Sequential(*front, body) if front else body
    raise ValueError(f"unknown model arch {spec['arch']!r}")


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


def arch_supports_ensemble(arch: str) -> bool:
    """`supports_ensemble` by architecture name, without building a model."""
    return arch == "mlp"


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
