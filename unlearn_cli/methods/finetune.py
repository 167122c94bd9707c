"""`finetune`: keep training the original model on the retain set only.

The baseline of the NeurIPS 2023 challenge's starting kit: SGD (momentum 0.9, weight decay 5e-4),
lr 0.1 with cosine annealing, 5 epochs over the retain set. The forget set is forgotten only as
far as further training on the rest washes it out.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..training import fit, fit_ensemble
from .api import UnlearnData


@dataclasses.dataclass(frozen=True)
class Params:
    epochs: int = 5  # passes over the retain set
    batch_size: int = 64  # examples per step
    lr: float = 0.1  # peak learning rate, cosine to zero
    momentum: float = 0.9
    weight_decay: float = 5e-4


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    return fit(
        model, data.retain_x, data.retain_y,
        epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
        momentum=params.momentum, weight_decay=params.weight_decay, seed=seed,
    )


def unlearn_lockstep(models: list[nn.Module], data: UnlearnData, params: Params, *, device,
                     seeds: list[int]) -> list[nn.Module]:
    """`unlearn` for K copies of the original at once, member k with seeds[k] (apply's ensemble
    engine; `lockstep.fit_lockstep`): the same models as K calls, up to float rounding."""
    return fit_ensemble(
        models, data.retain_x, data.retain_y,
        epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
        momentum=params.momentum, weight_decay=params.weight_decay, seeds=seeds,
    )


unlearn.lockstep = unlearn_lockstep
