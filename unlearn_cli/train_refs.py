"""`unlearn train-refs`: the original model and N reference models, resumable.

The original model is trained on the whole training set; reference model i is trained from scratch
on the retain set with seed i. Every finished model is stored with its per-sample outputs; a rerun
(after a crash, Ctrl-C or with a larger N) trains only what is missing and never rewrites a
finished file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import Config, check_num_models
from .launch import (
    CostModel,
    Job,
    JobOutcome,
    Lazy,
    plan,
    prestart,
    raise_failures,
    run_jobs,
    user_code,
)
from .store import ORIGINAL, REFERENCE, Store

ORIGINAL_SEED = 2_000_000_000  # apart from reference seeds 0..N-1 and unlearning seeds 1e6 + i
ENSEMBLE_ARCHS = ("mlp",)  # engine auto on a CPU: these train as lockstep ensembles
MAX_ENSEMBLE_CHUNK = 25  # models per ensemble job: bounds the work a crash can lose


SPREAD_JOBS = 4  # launch.timed_alone is dealt over at least this many jobs' seeds


def timed_alone(seeds: list[int], chunk_size: int, total: int) -> list[int]:
    """Which of `seeds` (reference seeds, or unlearning runs' indices) to train alone, timed
    between speed probes, for the runtime ratio; the ensemble engine trains the others of their
    job in lockstep. chunk_size: the jobs' cut (`_chunks`: launch.chunk_size, else
    MAX_ENSEMBLE_CHUNK); total: launch.timed_alone.

    Dealt round-robin over the first G = max(SPREAD_JOBS, ceil(total / chunk_size)) jobs' worth of
    seeds, slot by slot: seed s at position p of chunk c (c < G) is the (p * G + c)-th dealt, and
    timed alone when that is below `total`. The demo's 100 models in jobs of 25 get 8 each with
    the default of 32 (seeds 0-7, 25-32, 50-57, 75-82). The rule reads the seed only: which
    models are trained alone (and so their last bits, since a lockstep group's rounding depends
    on its members) depends neither on how many models a command asks for nor on what a resumed
    run finds stored, nor on --workers. A bank of fewer than G jobs has fewer than `total` (a
    bank of 10: 8 of 32). A total, not a count per job, so that a bank of 1,000 models (40 jobs)
    pays for no more than a bank of 100.

    Why 32 by default: one digits model's CPU time varies by ~14% (sd) from one model to the
    next beside a busy neighbour, independently from one model to the next (a full reference run
    timed right beside each unlearning run, tried instead of the probe, varied as much), so only
    more models timed alone make the ratio steadier. `benchmarks/bench_runtime_ratio.py`
    at the demo's size beside one busy process read `retrain` at 0.935-1.091 in 10 runs with 32 (10
    within 1 +- 0.15), against 0.839-1.015 in 5 runs with 12 (4 of 5), 0.867-1.261 in 10 with 16 (9
    of 10) and 0.845-1.176 in 5 with 8 (3 of 5). The price: each model timed alone costs more than
    a lockstep member (the demo took 26.3 s with 32, 21.3 s with 12, side by side:
    bench_demo.py in benchmarks/results/latest.txt).
    """
    if chunk_size <= 0 or total <= 0:
        return []
    spread = max(SPREAD_JOBS, -(-total // chunk_size))
    chosen = []
    for seed in seeds:
        chunk, position = divmod(seed, chunk_size)
        if chunk < spread and position * spread + chunk < total:
            chosen.append(seed)
    return chosen


def split_alone(seeds: list[int], chosen: list[int], lockstep: bool) -> tuple[list[int], list[int]]:
    """A job's seeds as (trained one by one and timed, trained together in lockstep), in seed
    order: with lockstep (the ensemble engine), the seeds timed_alone() chose go one by one and
    the others together, except a single one left over, which goes one by one too (no lockstep
    group of one: an honest time instead of a share); without, every seed one by one."""
    picked = set(chosen)
    together = [s for s in seeds if s not in picked] if lockstep else []
    if len(together) == 1:
        together = []
    return [s for s in seeds if s not in together], together


@dataclasses.dataclass(frozen=True)
class TrainRefsResult:
    store: Path
    trained_original: bool
    trained: list[int]  # reference seeds trained by this run
    reused: list[int]  # reference seeds already stored
    outcomes: list[JobOutcome]
    # Models that were stored but damaged or incomplete, and were trained again: what was wrong.
    redone: dict[str, str] = dataclasses.field(default_factory=dict)
    # experiment.json was lost and written again, vouched for by this many models' provenance.
    rebuilt: int = 0


def prepare_split(cfg: Config, dataset: Any = None) -> dict[str, Any]:
    """The experiment's split with the labels `score` needs (so scoring never loads data).

    dataset: the loaded `data.Dataset` (loaded here when None)."""
    import numpy as np

    from .data import load_dataset, make_split

    if dataset is None:
        dataset = load_dataset(cfg.data)
    labels = dataset.y.numpy()
    split = make_split(labels, cfg.data, test_count=dataset.test_count,
                       num_classes=dataset.num_classes)
    for name in ("forget", "test", "retain"):
        split[f"{name}_labels"] = labels[split[name]].astype(np.int64)
    return split


def describe(cfg: Config, dataset: Any) -> dict[str, Any]:
    """What experiment.json records about the data: its fingerprint is checked on every run."""
    return {"dataset": cfg.data.dataset, "fingerprint": dataset.fingerprint,
            "num_examples": len(dataset.y), "test_count": dataset.test_count,
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape)}


def load_checked(cfg: Config, store: Store, exp: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The dataset and the model spec, checked against the store's record (if it has one) and
    against each other (the model takes the data), before anything is written or launched."""
    from .data import load_dataset
    from .models import check_model, check_sources, model_spec

    dataset = load_dataset(cfg.data, str(store.root / "data"))
    if exp:
        store.check_data(dataset.fingerprint, cfg.data.dataset, cfg.data.root)
    spec = exp.get("model_spec") or model_spec(cfg.model, dataset.input_shape,
                                               dataset.num_classes, mean=dataset.mean,
                                               std=dataset.std)
    check_sources(spec)
    if not exp or not store.is_done(ORIGINAL):
        check_model(spec, dataset.x[:2], cfg.data.dataset)
    if dataset.is_images is False and (cfg.train.crop_padding or cfg.train.flip):
        from .errors import ConfigError

        raise ConfigError(f"train.crop_padding: expected 0 and train.flip false for the "
                          f"{cfg.data.dataset} features (crop and flip need images)")
    return dataset, spec


def choose_engine(cfg: Config, device: str) -> str:
    """ensemble on CPU for models without buffers (many small models at once); loop otherwise."""
    if cfg.train.engine != "auto":
        return cfg.train.engine
    if device != "cpu":
        return "loop"
    # By name, without importing torch (this runs before the fork server is started).
    return "ensemble" if cfg.model.arch in ENSEMBLE_ARCHS else "loop"


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
    check_num_models(num_models)
    store = Store(store_root)
    exp = store.check_compatible(cfg) if store.exists() else {}  # fail fast, touching nothing
    # Workers fork from a server that imports torch now, beside this process's own imports.
    stored = set(store.done_seeds(REFERENCE)) if exp else set()
    missing = [s for s in range(num_models) if s not in stored]
    jobs = _chunks(missing, cfg.launch.chunk_size, 1, choose_engine(cfg, "cpu"))
    costs = CostModel(store, "train-refs", enabled=not user_code(None, cfg.model.arch))
    sizes = [len(job) for job in jobs] + [1] * int(not (exp and store.is_done(ORIGINAL)))
    prestart(cfg.launch, num_jobs=len(sizes),
             stays_here=lambda slots: costs.stays_here(sizes, slots))
    dataset, spec = load_checked(cfg, store, exp)
    split = prepare_split(cfg, dataset)
    with store.writing():
        rebuilt = 0
        record = describe(cfg, dataset)
        if not store.exists() and store.stored_models():  # experiment.json lost: rebuild it?
            rebuilt = store.rebuild_experiment(cfg, split, dataset.num_classes, data=record,
                                               model_spec=spec)
        store.init_experiment(cfg, split, num_classes=dataset.num_classes, data=record,
                              model_spec=spec)
        store.check_identity()  # no model made under other settings joins this bank
        if dataset.write_cache is not None:
            dataset.write_cache()  # imagefolder: workers read the decoded images from the store
        # A model that looks done but is damaged (model.pt unreadable or missing, outputs that do
        # not fit) is forgotten here and trained again below, so that rerunning this command is
        # the fix for every damaged reference model and for a damaged original.
        redone = {}
        for kind, seeds in ((ORIGINAL, [None]), (REFERENCE, range(num_models))):
            for seed, problem in store.damaged(kind, seeds).items():
                store.discard(kind, seed)
                redone[store.describe(kind, seed)] = problem
        done = set(store.done_seeds(REFERENCE))
        missing = [s for s in range(num_models) if s not in done]
        need_original = not store.is_done(ORIGINAL)
        count = len(missing) + int(need_original)
        launch = cfg.launch
        slots = plan(launch, num_jobs=count)
        engine = choose_engine(cfg, slots[0].device)
        from .context import gpu_workers, store_trained  # imports torch: after the checks above

        base = {"config": cfg.to_dict(), "engine": engine, "gpu_workers": gpu_workers(slots)}
        jobs = []
        if need_original:
            jobs.append(Job("original", f"{__name__}:train_job",
                            {**base, "kind": ORIGINAL, "seeds": [ORIGINAL_SEED],
                             "alone": [ORIGINAL_SEED]}, 1))
        alone = set(timed_alone(missing, launch.chunk_size or MAX_ENSEMBLE_CHUNK,
                                launch.timed_alone))
        for chunk in _chunks(missing, launch.chunk_size, len(slots), engine):
            name = f"reference-{chunk[0]}" + (f"..{chunk[-1]}" if len(chunk) > 1 else "")
            jobs.append(Job(name, f"{__name__}:train_job",
                            {**base, "kind": REFERENCE, "seeds": chunk,
                             "alone": [s for s in chunk if s in alone]}, len(chunk)))
        if on_plan is not None:
            # Reused reference models only: the original is not one (it was counted as one).
            on_plan(count, len(done & set(range(num_models))))
        inline, note = costs.decide(jobs, slots, launch.backend, inline)
        if on_event is not None and jobs:
            what = " and ".join(part for part in (
                "the original" if need_original else "",
                f"{len(missing)} reference model(s)" if missing else "") if part)
            on_event("plan", "", f"training {what}: "
                                 f"{describe_launch(jobs, slots, engine, inline=inline)}{note}")
        # Workers hand each finished model back; only this process writes the store.
        outcomes = run_jobs(jobs, slots, backend=launch.backend, address=launch.address,
                            shared=shared_inputs(cfg, split, store, spec), inline=inline,
                            on_result=lambda job_id, trained: store_trained(store, trained),
                            on_event=costs.watch(on_event))
        costs.record(jobs, outcomes, counted=lambda job: job.id != "original")
    raise_failures(outcomes, what="training", kept="the other models are stored")
    return TrainRefsResult(store.root, need_original, missing,
                           sorted(done & set(range(num_models))), outcomes, redone, rebuilt)


def describe_launch(jobs: list[Job], slots: list[Any], engine: str | None = None, *,
                    inline: bool | None = None) -> str:
    """`5 jobs on 2 CPU workers, 1 thread each (ensemble engine)`: how a run will be spread
    (inline as passed to launch.run_jobs)."""
    kind = "GPU" if slots[0].gpu >= 0 else "CPU"
    threads = slots[0].threads
    engine_note = f" ({engine} engine)" if engine else ""
    # launch.run_jobs runs these in this process (one CPU slot, unless told otherwise)
    if inline or (inline is None and len(slots) == 1 and kind == "CPU"):
        return f"{len(jobs)} job(s) in this process, {threads} thread(s){engine_note}"
    return (f"{len(jobs)} job(s) on {len(slots)} {kind} worker(s), {threads} thread(s) each"
            + engine_note)


def shared_inputs(cfg: Config, split: dict[str, Any], store: Store,
                  spec: dict[str, Any]) -> dict[str, Any]:
    """What every job of an experiment needs, sent once per worker (or Ray node): the split, the
    model spec, and the dataset, which local workers read themselves and Ray ships from the
    driver."""
    return {"split": split, "spec": spec,
            "dataset": Lazy("unlearn_cli.context:dataset_arrays",
                            (cfg.to_dict()["data"], str(store.root / "data")))}


def _chunks(seeds: list[int], chunk_size: int, num_slots: int, engine: str) -> list[list[int]]:
    """The jobs' seeds: runs of consecutive seeds cut at multiples of the chunk size.

    Which seeds share a job decides which are trained together (the ensemble engine) and which
    ones are trained alone first, so the cuts depend on the seeds only, never on `num_slots`: the
    same missing seeds give the same models whatever `--workers` is. Chunk size: launch.chunk_size,
    else MAX_ENSEMBLE_CHUNK for the ensemble engine and 1 for the loop engine.
    """
    del num_slots  # see above: the worker count must not change the models
    if chunk_size <= 0:
        chunk_size = MAX_ENSEMBLE_CHUNK if engine == "ensemble" else 1
    chunks: dict[int, list[int]] = {}
    for seed in seeds:
        chunks.setdefault(seed // chunk_size, []).append(seed)
    return list(chunks.values())


# ------------------------------------------------------------------ worker side


class CpuClock:
    """CPU seconds this process spends in a block (all its threads; `time.process_time`).

    On a CPU the runtime ratio divides CPU seconds, not wall seconds: on a shared machine the wall
    time of the same work varies with what else runs (several-fold under a load of 10 on 2
    cores), while its CPU time barely moves, and train-refs and apply run at different moments.
    On a GPU, where the work is not the process's CPU time, the ratio divides wall seconds.
    """

    def __enter__(self) -> CpuClock:
        import time

        self._start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        self.seconds = time.process_time() - self._start


def timing_context() -> dict[str, Any]:
    """What a wall time was measured under, stored beside it: the machine's 1-minute load
    average and torch's intra-op threads. `score` reports both, for each side of the ratio."""
    import os

    import torch

    return {"load_average": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}


def warm_steps(ctx: Any, options: dict[str, Any]) -> None:
    """A few untimed training steps on a throwaway model, before a job's first timed model.

    The first steps in a process pay one-off costs (thread pools, allocator, kernel selection)
    that later ones do not. Both sides of the runtime ratio do this same warm-up: train-refs
    before its first model timed alone, apply before its first run. Two batches of the retain
    set, one epoch, no augmentation cost worth counting; the model is dropped.
    """
    from .models import init_model
    from .training import fit

    x, y = ctx.subset("retain")
    size = min(len(y), 2 * options["batch_size"])
    model = init_model(ctx.spec, 0).to(ctx.device)
    fit(model, x[:size], y[:size], **{**options, "epochs": 1, "compile": "none"}, seed=0)


PROBE_STEPS = 24  # training steps of the reference recipe in one speed probe


class Probe:
    """The machine's speed of the moment, for the runtime ratio: CPU and wall seconds of
    PROBE_STEPS training steps of the reference recipe on a throwaway model (retain set, no
    compilation).

    Every model or unlearning run that is timed alone is timed between two probes (chained: the
    probe after one run is the probe before the next), and stores their mean beside its times;
    `score` divides each time by it, on both sides of the ratio. So a ratio of two times taken
    under different loads (the bank in the morning, the method at noon on a busier machine)
    becomes a ratio of work. Measured on this project's 2-core machine under a load average of
    6-10 (other agents' work), `retrain` (7 models a side, 10 epochs): 0.84-1.16 in 6 runs with
    probes of 38 steps (an earlier rounding; now exactly PROBE_STEPS; median distance from 1:
    0.06), against 0.81-1.37 in seconds (0.14). At the demo's size (100 a side) beside one busy
    process, see timed_alone(): the ratio is as steady as the number of models timed alone. A
    longer probe did not help: a model's own time varies as much. Costs PROBE_STEPS steps per run
    timed alone, never more than the recipe's own training (a digits model takes 570 steps, a
    finetune run 95).
    """

    def __init__(self, ctx: Any, options: dict[str, Any]):
        self.ctx, self.options = ctx, options
        self.last: tuple[float, float] | None = None  # (cpu, wall) of the latest probe

    def take(self) -> dict[str, float]:
        """Probe now; returns probe_cpu_seconds / probe_wall_seconds for the run that ended just
        before: the mean of this probe and the previous one (empty for the first probe)."""
        from .context import Stopwatch
        from .models import init_model
        from .training import fit

        x, y = self.ctx.subset("retain")
        batch = max(1, int(self.options["batch_size"]))
        # PROBE_STEPS steps, never more than the recipe's own training (a tiny test recipe).
        per_epoch = max(1, -(-len(y) // batch))
        steps = max(1, min(PROBE_STEPS, int(self.options["epochs"]) * per_epoch))
        epochs = -(-steps // per_epoch)
        size = min(len(y), -(-steps // epochs) * batch)  # epochs x ceil(size / batch) = steps
        model = init_model(self.ctx.spec, 0).to(self.ctx.device)
        options = {**self.options, "epochs": epochs, "compile": "none", "cuda_graph": False}
        with Stopwatch(self.ctx.device) as watch, CpuClock() as cpu:
            fit(model, x[:size], y[:size], **options, seed=0)
        before, self.last = self.last, (cpu.seconds, watch.seconds)
        if before is None:
            return {}
        return {"probe_cpu_seconds": (before[0] + cpu.seconds) / 2,
                "probe_wall_seconds": (before[1] + watch.seconds) / 2}


def train_job(payload: dict[str, Any], *, device: str, progress: Callable[[int], None],
              shared: dict[str, Any]) -> Iterator[Any]:
    """Train the models of one job, yielding each as a `context.Trained` (the driver stores it).

    The worker keeps one model module per spec (`models.fresh_model`) and loads each seed's initial
    weights into it, so a compiled model (train.compile) is compiled once per worker, by `warm_up`,
    before the first timed model.
    """
    from .context import Stopwatch, context, finish_model, provenance, timing
    from .models import fresh_model, init_from_data, init_model
    from .training import fit, fit_ensemble, recipe, warm_up

    ctx = context(payload, device, shared)
    kind = payload["kind"]
    options = recipe(ctx.cfg.train)
    x, y = ctx.subset("train" if kind == ORIGINAL else "retain")
    seeds = payload["seeds"]  # the driver skips a model stored meanwhile by another run
    seed_of = (lambda s: ORIGINAL_SEED) if kind == ORIGINAL else (lambda s: s)

    def train_alone(seed: int) -> tuple[Any, float, float]:
        model = fresh_model(ctx.spec, seed, ctx.device)
        if warm_up(model, x, y, **options):  # compiled it just now: start again from the init
            model = fresh_model(ctx.spec, seed, ctx.device)
        with Stopwatch(ctx.device) as watch, CpuClock() as cpu:
            init_from_data(model, x)  # data-dependent layers (fastnet's whitening), from x only
            fit(model, x, y, seed=seed, **options)
        return model, watch.seconds, cpu.seconds

    warm_steps(ctx, options)  # the first timed model must not pay the process's first steps

    # The seeds timed_alone() chose (payload["alone"]) are trained alone, timed: honest "retrain
    # from scratch" times for the runtime ratio in `score`, which ensemble shares would
    # understate; on the ensemble engine the others in lockstep (split_alone).
    one_by_one, together = split_alone(seeds, payload["alone"], payload["engine"] == "ensemble")
    probe = Probe(ctx, options)
    if one_by_one:  # nothing to time: no probe
        probe.take()
    for seed in one_by_one:
        model, seconds, cpu_seconds = train_alone(seed_of(seed))
        meta = provenance(ctx, kind, seed_of(seed), wall_seconds=seconds,
                          cpu_seconds=cpu_seconds, engine="loop", **timing(ctx, payload),
                          **timing_context(), **probe.take())
        yield finish_model(ctx, kind, seed if kind != ORIGINAL else None, model, meta)
    if together:
        from .lockstep import groups

        for group in groups(together, ctx.cfg.train.ensemble_size):  # lockstep, K at once
            models = [init_model(ctx.spec, s).to(ctx.device) for s in group]
            with Stopwatch(ctx.device) as watch, CpuClock() as cpu:
                for model in models:
                    init_from_data(model, x)
                fit_ensemble(models, x, y, seeds=group, **options)
            share, cpu_share = watch.seconds / len(group), cpu.seconds / len(group)
            for seed, model in zip(group, models):
                meta = provenance(ctx, kind, seed, wall_seconds=share, cpu_seconds=cpu_share,
                                  timing="ensemble-share", engine="ensemble",
                                  ensemble_size=len(group), **timing_context())
                yield finish_model(ctx, kind, seed, model, meta)
