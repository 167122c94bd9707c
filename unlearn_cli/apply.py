"""`unlearn apply`: run an unlearning method N times from the original checkpoint, resumable.

Run i uses seed UNLEARN_SEED_BASE + i (distinct from the reference seeds 0..N-1) and is stored with
its per-sample outputs and the wall time of the method alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import Config, check_num_models
from .errors import MethodError, StoreError, UnlearnError
from .launch import (
    CostModel,
    Job,
    JobOutcome,
    plan,
    plan_slots,
    prestart,
    raise_failures,
    run_jobs,
    user_code,
)
from .methods import (
    Interrupts,
    check_method_sections,
    is_plugin,
    method_params,
    resolve,
    user_code_error,
)
from .store import ORIGINAL, REFERENCE, UNLEARNED, Store

UNLEARN_SEED_BASE = 1_000_000
JOB_SIZE = 10  # unlearning runs per job: a crash loses at most this many per worker
DRY_RUN_REPEAT_SECONDS = 30.0  # a dry run whose first run took less is run again, timed warm


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    store: Path
    method: str
    trained: list[int]
    reused: list[int]
    outcomes: list[JobOutcome]
    # Runs that were stored but damaged or incomplete, and were made again: what was wrong.
    redone: dict[str, str] = dataclasses.field(default_factory=dict)


def unlearn_seed(run_index: int) -> int:
    return UNLEARN_SEED_BASE + run_index


def check_ready(store: Store) -> list[int]:
    """The stored reference seeds; raise if the store cannot be unlearned from yet."""
    store.read_experiment()
    refs = store.done_seeds(REFERENCE)
    missing = [what for what, absent in (("original model", not store.is_done(ORIGINAL)),
                                         ("reference models", not refs)) if absent]
    if missing:
        # The command keeps the bank's size (--num-models), so following it trains only what is
        # missing, not a default-sized bank on top of a small one.
        raise StoreError(
            f"store {store.root} has no {' and no '.join(missing)}; run "
            f"`{store.redo_command(REFERENCE)}` first"
        )
    return refs


def check_data_and_model(cfg: Config, store: Store) -> dict[str, Any]:
    """Refuse changed data or a changed model plugin; returns the original checkpoint."""
    from .data import load_dataset
    from .models import check_sources

    dataset = load_dataset(cfg.data, str(store.root / "data"))
    store.check_data(dataset.fingerprint, cfg.data.dataset, cfg.data.root)
    original = store.load_model(ORIGINAL)
    check_sources(original["model"])
    return original


def run(
    cfg: Config,
    store_root: str | Path,
    *,
    method_spec: str,
    num_models: int | None = None,
    on_event: Callable[[str, str, Any], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    inline: bool | None = None,
) -> ApplyResult:
    # Cheap checks first: a wrong argument or store is answered before torch is imported (the
    # built-in methods' parameters and the original checkpoint need it).
    check_num_models(num_models)
    method = resolve(method_spec)
    check_method_sections(cfg, (method.name,) if is_plugin(method_spec) else ())
    store = Store(store_root)
    refs = check_ready(store)
    n = num_models if num_models is not None else len(refs)
    # Workers fork from a server that imports torch now, beside this process's own imports and
    # checks (a refusal below costs only that server's start, in the background).
    stored = set(store.done_seeds(UNLEARNED, method_spec))
    costs = CostModel(store, f"apply:{method_spec}",
                      enabled=not user_code(method_spec, cfg.model.arch))
    todo = [unlearn_seed(i) for i in range(n) if unlearn_seed(i) not in stored]
    sizes = [len(chunk) for chunk in _chunks(todo, cfg.launch.chunk_size, 1, "ensemble")]
    prestart(cfg.launch, num_jobs=len(todo),
             stays_here=lambda slots: costs.stays_here(sizes, slots))
    store.check_compatible(cfg)
    store.check_identity()
    params = method_params(method, cfg)
    original = check_data_and_model(cfg, store)  # and a damaged checkpoint, before any worker
    record = {
        "name": method_spec,
        "spec": method_spec,
        "summary": method.summary,
        "params": dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params,
    }
    with store.writing():
        store.save_method(method_spec, record)
        redone = {}
        for seed, problem in store.damaged(UNLEARNED, [unlearn_seed(i) for i in range(n)],
                                           method_spec).items():
            store.discard(UNLEARNED, seed, method_spec)
            redone[store.describe(UNLEARNED, seed, method_spec)] = problem
        done = set(store.done_seeds(UNLEARNED, method_spec))
        missing = [unlearn_seed(i) for i in range(n) if unlearn_seed(i) not in done]
        launch = cfg.launch
        slots = plan(launch, num_jobs=len(missing))  # nothing missing: no cluster is joined
        from .context import gpu_workers, store_trained
        from .train_refs import MAX_ENSEMBLE_CHUNK, choose_engine, timed_alone

        engine = ("ensemble" if lockstep_of(method) is not None
                  and choose_engine(cfg, slots[0].device) == "ensemble" else "loop")
        base = {"config": cfg.to_dict(), "method": method_spec, "gpu_workers": gpu_workers(slots),
                "engine": engine}
        # Which runs are timed alone: by run index, as train-refs chooses reference seeds.
        alone = {UNLEARN_SEED_BASE + i for i in timed_alone(
            [s - UNLEARN_SEED_BASE for s in missing], launch.chunk_size or MAX_ENSEMBLE_CHUNK,
            launch.timed_alone)}
        jobs = [
            Job(f"{method_spec}-{chunk[0] - UNLEARN_SEED_BASE}", f"{__name__}:apply_job",
                {**base, "seeds": chunk, "alone": [s for s in chunk if s in alone]}, len(chunk))
            for chunk in _chunks(missing, launch.chunk_size, len(slots), engine)
        ]
        if on_plan is not None:
            on_plan(len(missing), n - len(missing))
        inline, note = costs.decide(jobs, slots, launch.backend, inline)
        if on_event is not None and jobs:
            from .train_refs import describe_launch

            on_event("plan", "", f"running {method_spec} {len(missing)} time(s): "
                                 f"{describe_launch(jobs, slots, engine, inline=inline)}{note}")
        # Workers get the original model with the data (once per worker or Ray node), not a path,
        # and hand each run back: only this process writes the store.
        outcomes = run_jobs(jobs, slots, backend=launch.backend, address=launch.address,
                            shared=_shared(cfg, store, original), inline=inline,
                            on_result=lambda job_id, trained: store_trained(store, trained),
                            on_event=costs.watch(on_event))
        costs.record(jobs, outcomes)
    raise_failures(outcomes, what="unlearning", kept="the finished runs are stored")
    reused = sorted(s for s in done if s < unlearn_seed(n))
    return ApplyResult(store.root, method_spec, missing, reused, outcomes, redone)


def lockstep_of(method: Any) -> Any:
    """The method's lockstep form, if it has one: `fn.lockstep(models, data, params, *, device,
    seeds)` runs it once per seed on K copies of the original at once (`lockstep.fit_lockstep`)
    and returns the K unlearned models, each the model `fn` would return for its seed up to float
    rounding (tests/test_apply_lockstep.py). Built-ins: finetune, retrain; a plugin may set it."""
    return getattr(method.fn, "lockstep", None)


def _chunks(missing: list[int], chunk_size: int, num_slots: int, engine: str) -> list[list[int]]:
    """The jobs' seeds. Lockstep (ensemble engine): train-refs' cut on run indices (runs of
    consecutive indices cut at multiples of the chunk size, train_refs.MAX_ENSEMBLE_CHUNK by
    default), from the seeds alone, because which runs share a lockstep group changes their float
    rounding: the results must not depend on --workers. One at a time (loop): JOB_SIZE runs per
    job, fewer so that every slot gets work;
    each run is then independent of which job it is in."""
    if engine == "ensemble":  # train-refs' cut, on run indices
        from .train_refs import _chunks as cut_by_seed

        runs = cut_by_seed([s - UNLEARN_SEED_BASE for s in missing], chunk_size, num_slots, engine)
        return [[UNLEARN_SEED_BASE + i for i in chunk] for chunk in runs]
    size = chunk_size or JOB_SIZE
    size = max(1, min(size, -(-len(missing) // num_slots) if missing else 1))
    return [missing[i : i + size] for i in range(0, len(missing), size)]


def _shared(cfg: Config, store: Store, original: dict[str, Any]) -> dict[str, Any]:
    """The run's shared inputs: the experiment's (see `train_refs.shared_inputs`), built around
    the original checkpoint's own spec, and the original model itself."""
    from .train_refs import shared_inputs

    spec = dict(original["model"])
    return {**shared_inputs(cfg, store.load_split(), store, spec), "original": original}


# ------------------------------------------------------------------ worker side


def _run_once(ctx: Any, method: Any, params: Any, original: dict[str, Any], data: Any,
              seed: int) -> tuple[Any, float, float]:
    """Run the method once from a fresh copy of the original model.

    Returns (model, wall seconds, CPU seconds) of the method's call alone. `training.fit` inside
    the method trains with the experiment's speed options (precision, channels_last, compile,
    cuda_graph), as the reference models it is timed against were.
    """
    import torch
    from torch import nn

    model = _original_copy(ctx, original)
    torch.manual_seed(seed)
    result, seconds, cpu_seconds = _call_method(
        ctx, method, data, lambda: method.fn(model, data, params, device=ctx.device, seed=seed),
        f"seed {seed}")
    if not isinstance(result, nn.Module):
        raise MethodError(
            f"method {method.spec!r} returned {type(result).__name__} at seed {seed}; "
            "it must return the unlearned torch.nn.Module"
        )
    return result.eval(), seconds, cpu_seconds


def _original_copy(ctx: Any, original: dict[str, Any]) -> Any:
    from .models import build_model

    model = build_model(original["model"])
    model.load_state_dict(original["state_dict"])
    return model.to(ctx.device).eval()


def _call_method(ctx: Any, method: Any, data: Any, call: Callable[[], Any], where: str
                 ) -> tuple[Any, float, float]:
    """call() (the method's code) with the experiment's speed options, timed: (its result, wall
    seconds, CPU seconds). Whatever the method raises or exits with becomes one MethodError line
    naming the method and `where` (the seeds); a real Ctrl-C goes on up."""
    from .context import Stopwatch
    from .train_refs import CpuClock
    from .training import speed_options

    interrupts = Interrupts()
    try:
        with interrupts, speed_options(**data.speed), Stopwatch(ctx.device) as watch, \
                CpuClock() as cpu:
            result = call()
    except UnlearnError:
        raise
    except BaseException as exc:  # noqa: BLE001 - the method's code: sys.exit, its own ^C
        what = user_code_error(exc, interrupts)
        if what is not None:
            raise MethodError(f"method {method.spec!r} {what} at {where}") from None
        if not isinstance(exc, Exception):
            raise  # a real Ctrl-C: stop the run, keep what is stored
        raise MethodError(
            f"method {method.spec!r} failed at {where}: {type(exc).__name__}: {exc}"
        ) from exc
    return result, watch.seconds, cpu.seconds


def _run_lockstep(ctx: Any, method: Any, params: Any, original: dict[str, Any], data: Any,
                  seeds: list[int]) -> tuple[list[Any], float, float]:
    """Run the method once per seed in lockstep (`lockstep_of`): (the K unlearned models, wall
    seconds, CPU seconds of the whole group)."""
    import torch
    from torch import nn

    models = [_original_copy(ctx, original) for _ in seeds]
    torch.manual_seed(seeds[0])
    where = f"seeds {seeds[0]}..{seeds[-1]} (run in lockstep)"
    result, seconds, cpu_seconds = _call_method(
        ctx, method, data,
        lambda: lockstep_of(method)(models, data, params, device=ctx.device, seeds=seeds), where)
    if not (isinstance(result, (list, tuple)) and len(result) == len(seeds)
            and all(isinstance(m, nn.Module) for m in result)):
        raise MethodError(f"method {method.spec!r}'s lockstep form returned {type(result).__name__}"
                          f" at {where}; it must return one torch.nn.Module per seed")
    return [m.eval() for m in result], seconds, cpu_seconds


def _method_data(ctx: Any) -> Any:
    from .methods.api import UnlearnData
    from .training import recipe, speed_of

    forget_x, forget_y = ctx.subset("forget")
    retain_x, retain_y = ctx.subset("retain")
    valid_x, valid_y = ctx.subset("valid") if "valid" in ctx.split else (None, None)
    # The spec and recipe of the reference models: `retrain` (the oracle) rebuilds them exactly.
    return UnlearnData(forget_x, forget_y, retain_x, retain_y, ctx.num_classes,
                       model_spec=ctx.spec, train_recipe=recipe(ctx.cfg.train),
                       valid_x=valid_x, valid_y=valid_y, speed=speed_of(ctx.cfg.train))


def apply_job(payload: dict[str, Any], *, device: str, progress: Callable[[int], None],
              shared: dict[str, Any]) -> Iterator[Any]:
    """Run the method once per seed of the job, yielding each result as a `context.Trained` (the
    driver stores it); runs in a worker."""
    from .context import context, finish_model, provenance, timing
    from .train_refs import Probe, split_alone, timing_context, warm_steps
    from .training import recipe, warm_up_method

    ctx = context(payload, device, shared)
    spec = payload["method"]
    method = resolve(spec)
    params = method_params(method, ctx.cfg)
    original = shared["original"]
    data = _method_data(ctx)
    # The same untimed warm-up as train-refs does before its first timed model, so that both
    # sides of the runtime ratio are timed warm.
    warm_steps(ctx, recipe(ctx.cfg.train))
    todo = payload["seeds"]  # the driver skips a run stored meanwhile by another command
    if todo:  # on a GPU: autotuning and compilation untimed, once per worker and method
        warm_up_method(lambda: _run_once(ctx, method, params, original, data, todo[0]),
                       ctx.device, key=(spec, ctx.cfg.identity_hash()))
    failures: list[str] = []
    # Lockstep: the runs train_refs.timed_alone chose (payload["alone"]) run alone (their times
    # are honest single-run times for the runtime ratio, like train-refs' models timed alone),
    # the others at once; split as train-refs splits a job.
    one_by_one, together = split_alone(todo, payload["alone"], payload.get("engine") == "ensemble")
    # Every run timed alone is timed between two speed probes (train_refs.Probe), as train-refs
    # times its models: `score` divides each time by its probe.
    probe = Probe(ctx, recipe(ctx.cfg.train))
    if one_by_one:  # nothing to time: no probe
        probe.take()
    for seed in one_by_one:
        # One failing seed must not cost the job's other seeds: note it and go on.
        try:
            model, seconds, cpu_seconds = _run_once(ctx, method, params, original, data, seed)
            speed = probe.take()
            meta = provenance(ctx, UNLEARNED, seed, method=spec, wall_seconds=seconds,
                              cpu_seconds=cpu_seconds, run_index=seed - UNLEARN_SEED_BASE,
                              **timing(ctx, payload), **timing_context(), **speed)
            trained = finish_model(ctx, UNLEARNED, seed, model, meta, method=spec)
        except MethodError as exc:  # also outputs that do not fit, e.g. 20 logits for 10 classes
            failures.append(str(exc))
            continue
        yield trained
    if together:
        try:
            models, seconds, cpu_seconds = _run_lockstep(ctx, method, params, original, data,
                                                         together)
        except MethodError as exc:
            failures.append(str(exc))
            models = []
        for seed, model in zip(together, models):
            meta = provenance(ctx, UNLEARNED, seed, method=spec,
                              wall_seconds=seconds / len(together),
                              cpu_seconds=cpu_seconds / len(together),
                              run_index=seed - UNLEARN_SEED_BASE, timing="ensemble-share",
                              engine="ensemble", ensemble_size=len(together), **timing_context())
            try:
                trained = finish_model(ctx, UNLEARNED, seed, model, meta, method=spec)
            except MethodError as exc:
                failures.append(str(exc))
                continue
            yield trained
    if failures:
        more = f" (and {len(failures) - 1} more seed(s) of this job)" if len(failures) > 1 else ""
        raise MethodError(failures[0] + more)


def dry_run(cfg: Config, store_root: str | Path, *, method_spec: str) -> dict[str, Any]:
    """Run the method once from the original, in this process, and store nothing.

    Returns the accuracies on forget/retain/test and the wall time, next to the original's.
    """
    import numpy as np

    from .context import context
    from .launch import resolve_shared
    from .training import per_sample_outputs

    method = resolve(method_spec)
    check_method_sections(cfg, (method.name,) if is_plugin(method_spec) else ())
    store = Store(store_root)
    check_ready(store)
    store.check_compatible(cfg)
    store.check_identity()
    params = method_params(method, cfg)
    original = check_data_and_model(cfg, store)
    launch = cfg.launch
    slot = plan_slots(launch.device, workers=1, workers_per_gpu=1, num_jobs=1)[0]
    ctx = context({"config": cfg.to_dict()}, slot.local_device(),
                  resolve_shared(_shared(cfg, store, original)))
    data = _method_data(ctx)
    model, cold, _ = _run_once(ctx, method, params, original, data, unlearn_seed(0))
    # The first run in this process pays its warm-up (imports, thread pools, first kernels);
    # stored runs are timed warm. So run it again, timed, when that is cheap; else say so.
    if cold <= DRY_RUN_REPEAT_SECONDS:
        model, seconds, _ = _run_once(ctx, method, params, original, data, unlearn_seed(0))
        timing = (f"the method's second run in this process (warm, as stored runs are timed); "
                  f"its first took {cold:.2f} s with warm-up")
    else:
        seconds = cold
        timing = "the method's first run in this process: it includes warm-up"
    split = ctx.split

    def accuracies(outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return {
            "forget": float((outputs["forget_logits"].argmax(1) == split["forget_labels"]).mean()),
            "retain": float(outputs["retain_correct"].mean()),
            "test": float((outputs["test_logits"].argmax(1) == split["test_labels"]).mean()),
        }

    stored, meta = store.load_outputs(ORIGINAL)
    return {
        "method": method_spec,
        "seed": unlearn_seed(0),
        "device": str(ctx.device),
        "original": {**accuracies(stored), "seconds": float(meta.get("wall_seconds", np.nan))},
        "unlearned": {**accuracies(per_sample_outputs(model, ctx.x, ctx.y, split,
                                                      tta=cfg.train.tta)),
                      "seconds": seconds},
        "timing": {"unlearned": timing,
                   "original": "its training as train-refs timed it (on the whole train set)"},
    }
