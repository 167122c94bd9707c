"""`unlearn train-refs`: the original model and N reference models, resumable.

The original model is trained on the whole training set; reference model i is trained from scratch
on the retain set with seed i. Every finished model is stored with its per-sample outputs; a rerun
(after a crash, Ctrl-C or with a larger N) trains only what is missing and never rewrites a
finished file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .launch import Job, JobOutcome, Lazy, plan, raise_failures, run_jobs
from .store import ORIGINAL, REFERENCE, Store

ORIGINAL_SEED = 2_000_000_000  # apart from reference seeds 0..N-1 and unlearning seeds 1e6 + i
MAX_ENSEMBLE_CHUNK = 25  # models per ensemble job: bounds the work a crash can lose


@dataclasses.dataclass(frozen=True)
class TrainRefsResult:
    store: Path
    trained_original: bool
    trained: list[int]  # reference seeds trained by this run
    reused: list[int]  # reference seeds already stored
    outcomes: list[JobOutcome]


def prepare_split(cfg: Config) -> dict[str, np.ndarray]:
    """The experiment's split with the labels `score` needs (so scoring never loads data)."""
    from .data import load_dataset, make_split

    labels = load_dataset(cfg.data).y.numpy()
    split = make_split(labels, cfg.data)
    for name in ("forget", "test", "retain"):
        split[f"{name}_labels"] = labels[split[name]].astype(np.int64)
    return split


def choose_engine(cfg: Config, device: str) -> str:
    """ensemble on CPU for models without buffers (many small models at once); loop otherwise."""
    if cfg.train.engine != "auto":
        return cfg.train.engine
    if device != "cpu":
        return "loop"
    from .models import arch_supports_ensemble

    return "ensemble" if arch_supports_ensemble(cfg.model.arch) else "loop"


def run(
    cfg: Config,
    store_root: str | Path,
    *,
    num_models: int,
    on_event: Callable[[str, str, Any], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    inline: bool | None = None,
) -> TrainRefsResult:
    """Train what is missing. on_plan(models_to_train, models_reused) is called before launching."""
    if num_models < 1:
        from .errors import UnlearnError

        raise UnlearnError(f"--num-models must be at least 1, got {num_models}")
    store = Store(store_root)
    if store.exists():
        store.check_compatible(cfg)  # fail fast, before touching anything
    split = prepare_split(cfg)
    from .context import store_trained  # imports torch: after the checks above
    with store.writing():
        store.init_experiment(cfg, split)
        done = set(store.done_seeds(REFERENCE))
        missing = [s for s in range(num_models) if s not in done]
        need_original = not store.is_done(ORIGINAL)
        count = len(missing) + int(need_original)
        launch = cfg.launch
        slots = plan(launch, num_jobs=count)
        engine = choose_engine(cfg, slots[0].device)
        base = {"config": cfg.to_dict(), "engine": engine}
        jobs = []
        if need_original:
            jobs.append(Job("original", f"{__name__}:train_job",
                            {**base, "kind": ORIGINAL, "seeds": [ORIGINAL_SEED]}, 1))
        for chunk in _chunks(missing, launch.chunk_size, len(slots), engine):
            name = f"reference-{chunk[0]}" + (f"..{chunk[-1]}" if len(chunk) > 1 else "")
            jobs.append(Job(name, f"{__name__}:train_job",
                            {**base, "kind": REFERENCE, "seeds": chunk}, len(chunk)))
        if on_plan is not None:
            on_plan(count, len(done & set(range(num_models))) + int(not need_original))
        outcomes = run_jobs(jobs, slots, backend=launch.backend, address=launch.address,
                            shared=shared_inputs(cfg, split), inline=inline,
                            on_result=lambda job_id, trained: store_trained(store, trained),
                            on_event=on_event)
    raise_failures(outcomes, what="training", kept="the other models are stored")
    return TrainRefsResult(store.root, need_original, missing, sorted(done), outcomes)


def shared_inputs(cfg: Config, split: dict[str, np.ndarray]) -> dict[str, Any]:
    """What every job of an experiment needs, sent once per worker (or Ray node): the split, and
    the dataset, which local workers read themselves and Ray ships from the driver."""
    return {"split": split,
            "dataset": Lazy("unlearn_cli.context:dataset_arrays", (cfg.to_dict()["data"],))}


def _chunks(seeds: list[int], chunk_size: int, num_slots: int, engine: str) -> list[list[int]]:
    if not seeds:
        return []
    if chunk_size <= 0:
        if engine == "ensemble":
            # One ensemble per worker, cut into pieces of at most MAX_ENSEMBLE_CHUNK models.
            chunk_size = min(MAX_ENSEMBLE_CHUNK, math.ceil(len(seeds) / num_slots))
        else:
            chunk_size = 1
    return [seeds[i : i + chunk_size] for i in range(0, len(seeds), chunk_size)]


# ------------------------------------------------------------------ worker side


def train_job(payload: dict[str, Any], *, device: str, progress: Callable[[int], None],
              shared: dict[str, Any]) -> Iterator[Any]:
    """Train the models of one job, yielding each as a `context.Trained` (the driver stores it).

    The worker keeps one model module per spec (`models.fresh_model`) and loads each seed's initial
    weights into it, so a compiled model (train.compile) is compiled once per worker, by `warm_up`,
    before the first timed model.
    """
    from .context import Stopwatch, context, finish_model, provenance
    from .models import fresh_model, init_from_data, init_model
    from .training import fit, fit_ensemble, recipe, warm_up

    ctx = context(payload, device, shared)
    kind = payload["kind"]
    options = recipe(ctx.cfg.train)
    x, y = ctx.subset("train" if kind == ORIGINAL else "retain")
    seeds = payload["seeds"]
    seed_of = (lambda s: ORIGINAL_SEED) if kind == ORIGINAL else (lambda s: s)
    stored_seed = (lambda s: None) if kind == ORIGINAL else (lambda s: s)

    def train_alone(seed: int) -> tuple[Any, float]:
        model = fresh_model(ctx.spec, seed, ctx.device)
        if warm_up(model, x, y, **options):  # compiled it just now: start again from the init
            model = fresh_model(ctx.spec, seed, ctx.device)
        with Stopwatch(ctx.device) as watch:
            init_from_data(model, x)  # data-dependent layers (fastnet's whitening), from x only
            fit(model, x, y, seed=seed, **options)
        return model, watch.seconds

    # The first model of a job is always trained alone: its wall time is an honest "retrain from
    # scratch" time for the runtime ratio in `score`, which ensemble shares would understate.
    first, rest = seeds[0], seeds[1:]
    model, seconds = train_alone(seed_of(first))
    meta = provenance(ctx, kind, seed_of(first), wall_seconds=seconds, timing="sequential",
                      engine="loop")
    yield finish_model(ctx, kind, stored_seed(first), model, meta)
    if not rest:
        return
    if payload["engine"] == "ensemble":
        models = [init_model(ctx.spec, s).to(ctx.device) for s in rest]
        with Stopwatch(ctx.device) as watch:
            fit_ensemble(models, x, y, seeds=rest, **options)
        share = watch.seconds / len(rest)
        for seed, model in zip(rest, models):
            meta = provenance(ctx, kind, seed, wall_seconds=share, timing="ensemble-share",
                              engine="ensemble", ensemble_size=len(rest))
            yield finish_model(ctx, kind, seed, model, meta)
        return
    for seed in rest:
        model, seconds = train_alone(seed)
        meta = provenance(ctx, kind, seed, wall_seconds=seconds, timing="sequential",
                          engine="loop")
        yield finish_model(ctx, kind, seed, model, meta)
