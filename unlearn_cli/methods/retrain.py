"""`retrain`: train from scratch on the retain set, with the reference models' recipe (the oracle).

Builds a fresh model from `seed`, then trains it on the retain set alone with the recipe of the
experiment's `train` section, exactly as `train-refs` trains reference model i with seed i. A
retrained model is a draw from the very distribution the metric compares against, so `retrain`
shows what a perfect unlearner scores at this N (the ceiling of F), at a runtime ratio of about 1,
far over the challenge's gate of 0.2.

What it needs from the caller (`UnlearnData`): `model_spec` and `train_recipe`, how the reference
models were made. Without a spec it re-initialises the given model's layers in place from `seed`
(`reinitialise`: the same weights as `init_model` for the MLP; not for models with custom
initialisation such as fastnet); without a recipe it uses the `train` section's defaults, which
are the digits recipe (configs/digits.yaml). It has no hyperparameters of its own: any other
recipe would not be the oracle.

Source: exact unlearning by retraining from scratch, the reference of the NeurIPS 2023 Machine
Unlearning Challenge (Triantafillou et al., arXiv:2406.09073) and of every other method here.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import TrainConfig
from ..training import fit, fit_ensemble, recipe
from .api import UnlearnData, reinitialise


@dataclasses.dataclass(frozen=True)
class Params:
    pass  # the recipe is the experiment's `train` section


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    train = data.train_recipe if data.train_recipe is not None else recipe(TrainConfig())
    # The same seed initialises the weights and orders the data, as `train-refs` does.
    if data.model_spec is not None:
        from ..models import fresh_model, init_from_data

        # The worker's one module for this spec, with this seed's initial weights: no new module
        # (and no recompilation under train.compile) per run, as in train-refs.
        model = fresh_model(dict(data.model_spec), seed, device)
        init_from_data(model, data.retain_x)  # data-dependent layers, from the retain set only
    else:
        reinitialise(model, seed)
    return fit(model, data.retain_x, data.retain_y, seed=seed, **train)


def unlearn_lockstep(models: list[nn.Module], data: UnlearnData, params: Params, *, device,
                     seeds: list[int]) -> list[nn.Module]:
    """`unlearn` for K seeds at once (apply's ensemble engine), as train-refs trains reference
    models in lockstep: fresh models from each seed, trained together on the retain set."""
    if data.model_spec is None:  # no spec: re-initialise the copies in place, one by one
        for model, seed in zip(models, seeds):
            reinitialise(model, seed)
    else:
        from ..models import init_from_data, init_model

        models = [init_model(dict(data.model_spec), seed).to(device) for seed in seeds]
        for model in models:
            init_from_data(model, data.retain_x)
    train = data.train_recipe if data.train_recipe is not None else recipe(TrainConfig())
    return fit_ensemble(models, data.retain_x, data.retain_y, seeds=seeds, **train)


unlearn.lockstep = unlearn_lockstep
