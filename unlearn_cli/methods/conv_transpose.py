"""`conv-transpose`: transpose the spatial axes of every conv kernel, then fine-tune on retain.

Each k x k kernel w[out, in, i, j] becomes w[out, in, j, i]: the layer keeps its weights' values
and norms but every filter now looks at the mirror image of the patterns it learned (1 x 1
kernels are unchanged), so the network's function is scrambled at every depth while its weight
statistics, which fine-tuning relies on, stay those of a trained network. Fine-tuning on the
retain set then rebuilds the function from the retain set.

Adaptation: a model without convolutions (the digits MLP) has no kernels, but its input layer is
a convolution whose kernel covers the whole image: when it reads a flattened square image
(digits: 8 x 8 = 64 inputs, row by row), each of its rows is transposed as an 8 x 8 kernel. The
later linear layers read hidden units, which have no spatial axes, and are left alone. A model
whose input layer does not read a square image is refused with one line.

Layers that do not train (fastnet's data-set whitening) are left as they are: fine-tuning could
not repair them.

Source: the entry Deep Unlearn lists fifth among the seven winners of the NeurIPS 2023 Machine
Unlearning Challenge (Cadet et al., arXiv:2410.01276, `KGLTop5`, "Convolution Transpose"; the
challenge: Triantafillou et al., arXiv:2406.09073). Team values (CIFAR-10 / ResNet-18): 3
epochs, batch 64, SGD lr 0.001, momentum 0.9, weight decay 5e-4, cosine per epoch.

Digits calibration (the rule in methods/__init__.py; `benchmarks/calibrate_methods.py`, N = 20
runs from the stored original against 20 reference models: mean logit-scaled forget confidence
of the retrained models 5.51, of the original 5.82; the original's test accuracy 0.967):
    epochs  lr      confidence  test accuracy
    3       0.001  -2.73        0.278   (the team's values)
    3       0.01   -0.27        0.679
    3       0.03    0.91        0.862
    3       0.1     3.14        0.923
    3       0.2     4.85        0.940
    3       0.3     5.52        0.940   (2.6 points of test accuracy lost)
    5       0.1     4.01        0.944
    5       0.2     5.63        0.960   <- the digits default
    5       0.3     6.58        0.960
Transposing the MLP's input layer scrambles it entirely: digits needs the fine-tuning of
`finetune` (5 epochs, here at lr 0.2) to rebuild it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..errors import MethodError
from ..training import SGD
from .api import UnlearnData, train_pass, weight_layers


@dataclasses.dataclass(frozen=True)
class Params:
    epochs: int = 5  # passes over retain (team: 3; digits calibration)
    batch_size: int = 64  # (team: 64)
    lr: float = 0.2  # peak learning rate, cosine per epoch (team: 0.001; digits calibration)
    momentum: float = 0.9  # plain (heavy-ball) momentum (team: 0.9)
    weight_decay: float = 5e-4  # (team: 5e-4)


@torch.no_grad()
def transpose_kernels(model: nn.Module) -> int:
    """Transpose the spatial axes of the model's trainable conv kernels in place (or of its
    input layer's rows read as square images, on a model without convolutions); returns how
    many layers changed. Raises MethodError when there is nothing to transpose."""
    layers, kind = weight_layers(model)
    if kind == "conv":
        for conv in layers:
            w = conv.weight
            if w.shape[2] != w.shape[3]:
                raise MethodError(f"conv-transpose: a conv layer has a {w.shape[2]}x{w.shape[3]} "
                                  "kernel; transposing needs square kernels")
            w.copy_(w.transpose(2, 3).clone())
        return len(layers)
    first = layers[0] if layers else None
    side = math.isqrt(first.in_features) if first is not None else 0
    if first is None or side * side != first.in_features:
        inputs = first.in_features if first is not None else "no"
        raise MethodError(
            f"conv-transpose transposes conv kernels: this model has no Conv2d layer and its "
            f"input layer reads {inputs} features, not a square image; use it with a conv "
            "model (model.arch resnet18 or fastnet) or square image inputs (digits)"
        )
    w = first.weight  # [out, side * side], rows are flattened side x side images
    w.copy_(w.view(-1, side, side).transpose(1, 2).reshape(w.shape))
    return 1


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    p = params
    transpose_kernels(model)
    opt = SGD(list(model.parameters()), lr=p.lr, momentum=p.momentum,
              weight_decay=p.weight_decay, nesterov=False)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(p.epochs):
        opt.lr = p.lr * 0.5 * (1 + math.cos(math.pi * epoch / p.epochs))
        train_pass(model, data.retain_x, data.retain_y, opt, batch_size=p.batch_size,
                   generator=order)
    model.eval()
    return model
