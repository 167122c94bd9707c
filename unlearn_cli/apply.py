"""`unlearn apply`: run an unlearning method N times from the original checkpoint, resumable.

Run i uses seed UNLEARN_SEED_BASE + i (distinct from the reference seeds 0..N-1) and is stored with
its per-sample outputs and the wall time of the method alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import Config
from .errors import MethodError, StoreError, UnlearnError
from .launch import Job, JobOutcome, plan, plan_slots, raise_failures, run_jobs
from .methods import check_method_sections, is_plugin, method_params, resolve
from .store import ORIGINAL, REFERENCE, UNLEARNED, Store

UNLEARN_SEED_BASE = 1_000_000
JOB_SIZE = 10  # unlearning runs per job: a crash loses at most this many per worker


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    store: Path
    method: str
    trained: list[int]
    reused: list[int]
    outcomes: list[JobOutcome]


def unlearn_seed(run_index: int) -> int:
    return UNLEARN_SEED_BASE + run_index


def check_ready(store: Store) -> list[int]:
    """The stored reference seeds; raise if the store cannot be unlearned from yet."""
    store.read_experiment()
    refs = store.done_seeds(REFERENCE)
    missing = [what for what, absent in (("the original model", not store.is_done(ORIGINAL)),
                                         ("reference models", not refs)) if absent]
    if missing:
        raise StoreError(
            f"store {store.root} has no {' and no '.join(missing)}; run `unlearn train-refs "
            f"--store {store.root}` first"
        )
    return refs


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
    method = resolve(method_spec)
    check_method_sections(cfg, (method.name,) if is_plugin(method_spec) else ())
    params = method_params(method, cfg)
    if num_models is not None and num_models < 1:
        raise UnlearnError(f"--num-models must be at least 1, got {num_models}")
    store = Store(store_root)
    refs = check_ready(store)
    store.check_compatible(cfg)
    original = store.load_model(ORIGINAL)  # a damaged checkpoint fails here, before any worker
    n = num_models if num_models is not None else len(refs)
    record = {
        "name": method_spec,
        "spec": method_spec,
        "summary": method.summary,
        "params": dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params,
    }
    with store.writing():
        store.save_method(method_spec, record)
        done = set(store.done_seeds(UNLEARNED, method_spec))
        missing = [unlearn_seed(i) for i in range(n) if unlearn_seed(i) not in done]
        launch = cfg.launch
        slots = plan(launch, num_jobs=max(1, len(missing)))
        size = launch.chunk_size or JOB_SIZE
        size = max(1, min(size, -(-len(missing) // len(slots)) if missing else 1))
        base = {"config": cfg.to_dict(), "method": method_spec}
        jobs = [
            Job(f"{method_spec}-{chunk[0] - UNLEARN_SEED_BASE}", f"{__name__}:apply_job",
                {**base, "seeds": chunk}, len(chunk))
            for chunk in (missing[i : i + size] for i in range(0, len(missing), size))
        ]
        if on_plan is not None:
            on_plan(len(missing), n - len(missing))
        from .context import store_trained
        from .train_refs import shared_inputs

        # Workers get the original model with the data (once per worker or Ray node), not a path.
        shared = {**shared_inputs(cfg, store.load_split()), "original": original}
        outcomes = run_jobs(jobs, slots, backend=launch.backend, address=launch.address,
                            shared=shared, inline=inline,
                            on_result=lambda job_id, trained: store_trained(store, trained),
                            on_event=on_event)
    raise_failures(outcomes, what="unlearning", kept="the finished runs are stored")
    reused = sorted(s for s in done if s < unlearn_seed(n))
    return ApplyResult(store.root, method_spec, missing, reused, outcomes)


# ------------------------------------------------------------------ worker side


def _run_once(ctx: Any, method: Any, params: Any, original: dict[str, Any], data: Any,
              seed: int) -> tuple[Any, float]:
    """Run the method once from a fresh copy of the original model; (model, method seconds)."""
    import torch
    from torch import nn

    from .context import Stopwatch
    from .models import build_model

    spec = method.spec
    model = build_model(original["model"])
    model.load_state_dict(original["state_dict"])
    model.to(ctx.device).eval()
    torch.manual_seed(seed)
    try:
        with Stopwatch(ctx.device) as watch:
            result = method.fn(model, data, params, device=ctx.device, seed=seed)
    except UnlearnError:
        raise
    except Exception as exc:
        raise MethodError(
            f"method {spec!r} failed at seed {seed}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(result, nn.Module):
        raise MethodError(
            f"method {spec!r} returned {type(result).__name__} at seed {seed}; "
            "it must return the unlearned torch.nn.Module"
        )
    return result.eval(), watch.seconds


def _method_data(ctx: Any) -> Any:
    from .methods.api import UnlearnData
    from .training import recipe

    forget_x, forget_y = ctx.subset("forget")
    retain_x, retain_y = ctx.subset("retain")
    # The spec and recipe of the reference models: `retrain` (the oracle) rebuilds them exactly.
    return UnlearnData(forget_x, forget_y, retain_x, retain_y, ctx.num_classes,
                       model_spec=ctx.spec, train_recipe=recipe(ctx.cfg.train))


def apply_job(payload: dict[str, Any], *, device: str, progress: Callable[[int], None],
              shared: dict[str, Any]) -> Iterator[Any]:
    """Run the method once per seed of the job, yielding each result as a `context.Trained` (the
    driver stores it); runs in a worker."""
    from .context import context, finish_model, provenance

    ctx = context(payload, device, shared)
    spec = payload["method"]
    method = resolve(spec)
    params = method_params(method, ctx.cfg)
    original = shared["original"]
    data = _method_data(ctx)
    failures: list[str] = []
    for seed in payload["seeds"]:
        # One failing seed must not cost the job's other seeds: note it and go on.
        try:
            model, seconds = _run_once(ctx, method, params, original, data, seed)
            meta = provenance(ctx, UNLEARNED, seed, method=spec, wall_seconds=seconds,
                              timing="sequential", run_index=seed - UNLEARN_SEED_BASE)
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
    from .train_refs import shared_inputs
    from .training import per_sample_outputs

    method = resolve(method_spec)
    check_method_sections(cfg, (method.name,) if is_plugin(method_spec) else ())
    params = method_params(method, cfg)
    store = Store(store_root)
    check_ready(store)
    store.check_compatible(cfg)
    original = store.load_model(ORIGINAL)
    launch = cfg.launch
    slot = plan_slots(launch.device, workers=1, workers_per_gpu=1, num_jobs=1)[0]
    shared = resolve_shared(shared_inputs(cfg, store.load_split()))
    ctx = context({"config": cfg.to_dict()}, slot.local_device(), shared)
    model, seconds = _run_once(ctx, method, params, original, _method_data(ctx), unlearn_seed(0))
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
        "unlearned": {**accuracies(per_sample_outputs(model, ctx.x, ctx.y, split)),
                      "seconds": seconds},
    }
