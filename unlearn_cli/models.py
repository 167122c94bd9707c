"""Model builders by name. A checkpoint stores the spec that rebuilds its model."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import ModelConfig


def model_spec(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Everything needed to rebuild the model: stored in every checkpoint."""
    return {
        "arch": cfg.arch,
        "hidden": list(cfg.hidden),
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build an untrained model from a spec (initialised from torch's global RNG)."""
    if spec["arch"] == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec["input_shape"])
        for hidden in spec["hidden"]:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, spec["num_classes"]))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model arch {spec['arch']!r}")


def init_model(spec: dict[str, Any], seed: int) -> nn.Module:
    """A freshly initialised model whose weights depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


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
    """Models without buffers (no BatchNorm statistics) can be trained as a vmapped ensemble."""
    return not any(True for _ in model.buffers())
