"""`reset-head`: re-initialise the classifier (the last linear layer), then fine-tune on retain.

Throwing away the head removes what it memorised of the forget set outright; the fine-tuning on
retain (the same recipe as `finetune`) rebuilds it from the features alone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..models import classifier_head
from ..training import fit
from .api import UnlearnData


@dataclasses.dataclass(frozen=True)
class Params:
    epochs: int = 5  # passes over the retain set after the reset
    batch_size: int = 64  # examples per step
    lr: float = 0.1  # peak learning rate, cosine to zero
    momentum: float = 0.9
    weight_decay: float = 5e-4


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier_head(model).reset_parameters()
    return fit(
        model, data.retain_x, data.retain_y,
        epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
        momentum=params.momentum, weight_decay=params.weight_decay, seed=seed,
    )
