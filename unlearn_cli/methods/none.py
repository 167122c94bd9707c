"""`none`: return the original model unchanged.

A floor for the metric: all N runs give identical outputs, so every forget example's unlearned bank
has zero spread and its epsilon is the cap (metric-spec 1.3): forget quality is exactly 0.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .api import UnlearnData


@dataclasses.dataclass(frozen=True)
class Params:
    pass


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    return model
