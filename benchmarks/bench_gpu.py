"""Benchmark: the two CIFAR-10 recipes on a GPU, with 1, 2 and 4 workers per GPU.

Run: python benchmarks/bench_gpu.py [--budget 300] [--workers 1,2,4] [--recipes fast,resnet18]
     (benchmarks/gpu_check.sh runs it with the GPU tests, in 8 minutes at most)

Prints the card's name and, per recipe and workers-per-GPU: training images/s (all workers
together), seconds per model (training + per-sample outputs, per worker) and MFU against the card's
dense bf16 peak (PEAK_TFLOPS; --peak-tflops overrides). Targets on one H100 SXM: fast recipe
<= 2.4 s per model; seed recipe (resnet18) >= 35% MFU.

How it measures, with the project's own code (launcher, workers, models, `fit`):
- Synthetic CIFAR-shaped data, made on the GPU: 60,000 random uint8 images and labels (throughput
  does not depend on the pixels), split 1,000 forget / 49,000 retain / 10,000 test.
- Each worker is a long-lived GPU worker from `launch.run_jobs` (spawn, CUDA_VISIBLE_DEVICES). It
  warms up untimed (cuDNN autotuning, compilation when --compile is given), waits until every
  worker of the phase is warm, then trains timed chunks until the phase's time is up, then times
  `per_sample_outputs` on all 60,000 images once.
- A chunk of the fast recipe is a whole model (its init, whitening and 10 epochs on retain); a
  chunk of the seed recipe is CHUNK_STEPS steps of one epoch (its 100 epochs would take minutes),
  and seconds per model are extrapolated: time per image x images per model + the output pass.
- FLOPs: 3 x the forward FLOPs counted from the layer shapes (`models.forward_flops`; ResNet-18
  CIFAR: 1.11 GFLOP forward, 3.33 forward + backward) x images trained.
Results go to $UNLEARN_BENCH_OUT (default benchmarks/out/): bench_gpu.json (rows and what
produced them, rewritten after every phase) and bench_gpu.txt (the table). With no GPU it says so
and exits 0.
--dry-run runs everything on the CPU at toy sizes, to check the script; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # so the script runs without an install
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RECIPES = {"fast": "cifar10-fast.yaml", "resnet18": "cifar10-resnet18.yaml"}
NUM_FORGET, NUM_RETAIN, NUM_TEST = 1_000, 49_000, 10_000  # the CIFAR-10 split, images
CHUNK_STEPS = 200  # seed recipe: steps per timed chunk (one epoch would be 766 steps of 64)
TIMED_SECONDS = 10.0  # per phase: each worker trains chunks until this has passed (at least one)
BARRIER_SECONDS = 600.0  # how long a warm worker waits for the others (compiles can be slow)
# Rough cost of a phase, seconds, to skip phases the --budget cannot fit: start-up, warm-up, timing.
PHASE_COST = {"eager": 35.0, "compiled": 120.0}

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched on the
# words of torch.cuda.get_device_name (first match wins, so the specific names come first).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("L4",), 121.0),
)


def peak_tflops(name: str) -> float | None:
    words = set(name.upper().replace("-", " ").replace("_", " ").split())
    for needed, peak in PEAK_TFLOPS:
        if all(w in words for w in needed):
            return peak
    return None


# ---------------------------------------------------------------- worker side


def bench_job(payload: dict[str, Any], *, device: str, progress: Any) -> None:
    """One worker of a phase: warm up, meet the others, train timed chunks, write its record."""
    out = Path(payload["record"])
    barrier = Path(payload["barrier"])
    try:
        record = _measure(payload, device, barrier)
    except BaseException:
        (barrier / f"failed-{payload['index']}").touch()
        raise
    out.write_text(json.dumps(record))
    progress(1)


def _measure(payload: dict[str, Any], device: str, barrier: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from unlearn_cli import cifar
    from unlearn_cli.config import from_mapping
    from unlearn_cli.models import fresh_model, init_from_data, model_spec
    from unlearn_cli.training import fit, per_sample_outputs, recipe, warm_up

    cfg = from_mapping(payload["config"])
    options = recipe(cfg.train)
    dev = torch.device(device)
    sizes = payload["sizes"]
    n_all = sizes["forget"] + sizes["retain"] + sizes["test"]
    gen = torch.Generator(device=dev).manual_seed(payload["index"])
    x = torch.randint(0, 256, (n_all, *cifar.IMAGE_SHAPE), dtype=torch.uint8, device=dev,
                      generator=gen)
    y = torch.randint(0, cifar.NUM_CLASSES, (n_all,), device=dev, generator=gen)
    f, r = sizes["forget"], sizes["forget"] + sizes["retain"]
    split = {"forget": np.arange(f), "retain": np.arange(f, r), "test": np.arange(r, n_all)}
    spec = model_spec(cfg.model, cifar.IMAGE_SHAPE, cifar.NUM_CLASSES, mean=cifar.MEAN,
                      std=cifar.STD)
    chunk = payload["chunk"]
    xc, yc = x[f : f + chunk["examples"]], y[f : f + chunk["examples"]]
    chunk_options = {**options, "epochs": chunk["epochs"]}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # Warm-up, untimed, of everything a chunk does: compilation (warm_up), else cuDNN autotuning
    # on a couple of batches; the whitening set-up; the output pass.
    model = fresh_model(spec, 0, dev)
    init_from_data(model, xc)
    if not warm_up(model, xc, yc, **chunk_options):
        size = min(len(yc), 2 * options["batch_size"])
        fit(model, xc[:size], yc[:size], seed=0, **{**options, "epochs": 1})
    per_sample_outputs(model, x, y, split)
    sync()

    (barrier / f"ready-{payload['index']}").touch()
    waited = time.time()
    while len(list(barrier.glob("ready-*"))) < payload["workers"]:
        if list(barrier.glob("failed-*")):
            raise RuntimeError("another worker of this phase failed; see its error")
        if time.time() - waited > BARRIER_SECONDS:
            raise RuntimeError(f"the other workers were not ready after {BARRIER_SECONDS:.0f} s")
        time.sleep(0.05)

    chunks = []
    deadline = time.time() + payload["seconds"]
    seed = 0
    while True:
        start = time.time()
        model = fresh_model(spec, seed, dev)
        init_from_data(model, xc)
        fit(model, xc, yc, seed=seed, **chunk_options)
        sync()
        chunks.append({"start": start, "end": time.time()})
        seed += 1
        if time.time() >= deadline:
            break
    start = time.time()
    per_sample_outputs(model, x, y, split)
    sync()
    outputs_seconds = time.time() - start
    memory = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return {"chunks": chunks, "outputs_seconds": outputs_seconds, "peak_memory_bytes": memory}


# ---------------------------------------------------------------- parent side


def images_per_pass(n: int, batch_size: int, drop_last: bool) -> int:
    """Images trained in one epoch over n examples (the last partial batch dropped or not)."""
    return (n // batch_size) * batch_size if drop_last and n >= batch_size else n


def run_phase(name: str, cfg: Any, workers: int, args: argparse.Namespace, out: Path,
              device: str, sizes: dict[str, int]) -> dict[str, Any]:
    import shutil
    import tempfile

    from unlearn_cli import cifar
    from unlearn_cli.launch import Job, plan_slots, run_jobs
    from unlearn_cli.models import forward_flops, model_spec

    t = cfg.train
    if name == "fast":
        chunk = {"examples": sizes["retain"], "epochs": t.epochs}  # a whole model
    else:
        chunk = {"examples": min(sizes["retain"], CHUNK_STEPS * t.batch_size), "epochs": 1}
    chunk_images = chunk["epochs"] * images_per_pass(chunk["examples"], t.batch_size, t.drop_last)
    model_images = t.epochs * images_per_pass(sizes["retain"], t.batch_size, t.drop_last)
    spec = model_spec(cfg.model, cifar.IMAGE_SHAPE, cifar.NUM_CLASSES, mean=cifar.MEAN,
                      std=cifar.STD)
    flops_per_image = 3 * forward_flops(spec)  # forward + backward

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        base = {"config": cfg.to_dict(), "sizes": sizes, "chunk": chunk, "workers": workers,
                "barrier": str(work), "seconds": args.seconds}
        jobs = [Job(f"{name}-{k}", "bench_gpu:bench_job",
                    {**base, "index": k, "record": str(work / f"record-{k}.json")})
                for k in range(workers)]
        if device == "cpu":
            slots = plan_slots("cpu", workers=workers, workers_per_gpu=1, num_jobs=workers)
        else:
            slots = plan_slots(device, workers=0, workers_per_gpu=workers, num_jobs=workers)
        started = time.perf_counter()
        outcomes = run_jobs(jobs, slots, inline=False)
        wall = time.perf_counter() - started
        failed = [o for o in outcomes if not o.ok]
        if failed:
            return {"error": "; ".join(f"{o.id}: {o.error}" for o in failed[:2]),
                    "phase_seconds": wall}
        records = [json.loads((work / f"record-{k}.json").read_text()) for k in range(workers)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    all_chunks = [c for r in records for c in r["chunks"]]
    window = max(c["end"] for c in all_chunks) - min(c["start"] for c in all_chunks)
    images_per_s = len(all_chunks) * chunk_images / window
    per_worker = []
    for r in records:
        seconds_per_image = sum(c["end"] - c["start"] for c in r["chunks"]) / (
            len(r["chunks"]) * chunk_images)
        per_worker.append(seconds_per_image * model_images + r["outputs_seconds"])
    row = {
        "images_per_s": images_per_s,
        "seconds_per_model": sum(per_worker) / len(per_worker),
        "train_seconds_per_model": model_images * workers / images_per_s,
        "outputs_seconds": sum(r["outputs_seconds"] for r in records) / len(records),
        "extrapolated": chunk_images != model_images,
        "chunks": len(all_chunks),
        "tflops": images_per_s * flops_per_image / 1e12,
        "flops_per_image": flops_per_image,
        "peak_memory_gib": max(r["peak_memory_bytes"] for r in records) / 2**30,
        "phase_seconds": wall,
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("UNLEARN_BENCH_OUT", "benchmarks/out"))
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds for all phases; phases that do not fit are skipped")
    parser.add_argument("--workers", default="1,2,4", help="workers per GPU to measure")
    parser.add_argument("--recipes", default="fast,resnet18")
    parser.add_argument("--compile", default="reduce-overhead",
                        help="torch.compile mode for the compiled phases after the eager ones "
                             "(1 worker each, budget permitting); none to skip them")
    parser.add_argument("--seconds", type=float, default=TIMED_SECONDS,
                        help="timed seconds per phase and worker")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, if the table does not know it")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU at toy sizes to check the script (measures nothing)")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    from unlearn_cli.config import CONFIG_DIR, load_config

    out = Path(args.out)
    if args.dry_run:
        device, card, sizes = "cpu", "CPU (dry run: toy sizes, nothing measured)", {
            "forget": 8, "retain": 96, "test": 16}
        args.seconds = min(args.seconds, 1.0)
        overrides = ["train.epochs=1", "train.batch_size=32"]
        tiny = {"fast": ["model.widths=[8,16,16]"], "resnet18": ["model.widths=[8,8,8,8]"]}
    elif not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU is visible to torch {torch.__version__} "
              f"(built for CUDA {torch.version.cuda}): nothing to measure. Run this on a machine "
              "with a GPU (benchmarks/gpu_check.sh).")
        return 0
    else:
        # The parent touches CUDA only for the name; workers are spawned, so this is safe.
        device, card = "cuda:0", torch.cuda.get_device_name(0)
        sizes = {"forget": NUM_FORGET, "retain": NUM_RETAIN, "test": NUM_TEST}
        overrides, tiny = [], {}
    peak = args.peak_tflops or (None if args.dry_run else peak_tflops(card))
    print(f"card: {card}; dense bf16 peak: "
          + (f"{peak:.0f} TFLOP/s" if peak else "unknown (MFU not computed; see --peak-tflops)"))
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, budget {args.budget:.0f} s")

    phases = [(r, int(w), "none") for r in args.recipes.split(",") for w in
              args.workers.split(",")]
    if args.compile != "none":
        phases += [(r, 1, args.compile) for r in args.recipes.split(",")]
    result: dict[str, Any] = {
        "card": card, "peak_tflops": peak, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run,
        "sizes": sizes, "rows": [],
    }
    header = (f"{'recipe':<9} {'compile':<15} {'workers':>7} {'images/s':>10} {'s/model':>8} "
              f"{'outputs s':>9} {'TFLOP/s':>8} {'MFU':>6}  notes")
    lines = [header]
    print(header, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, workers, mode in phases:
        left = args.budget - (time.perf_counter() - start)
        kind = "eager" if mode == "none" else "compiled"
        cfg = load_config(CONFIG_DIR / RECIPES[name],
                          [*overrides, *tiny.get(name, []), f"train.compile={mode}"])
        if left < PHASE_COST[kind] and not args.dry_run:
            row = {"skipped": f"budget: {left:.0f} s left"}
        else:
            try:
                row = run_phase(name, cfg, workers, args, out, device, sizes)
            except Exception as exc:  # noqa: BLE001 - report the phase, go on with the next
                row = {"error": f"{type(exc).__name__}: {exc}"}
        row = {"recipe": name, "workers_per_gpu": workers, "compile": mode,
               "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
               "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, **row}
        if "tflops" in row and peak:
            row["mfu"] = row["tflops"] / peak
        result["rows"].append(row)
        lines.append(_format(row))
        print(lines[-1], flush=True)
        (out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_gpu.txt").write_text(
        f"card: {card}; peak {peak} TFLOP/s; torch {torch.__version__}\n" + "\n".join(lines) + "\n")
    print(f"written: {out / 'bench_gpu.json'}, {out / 'bench_gpu.txt'}")
    return 0


def _format(row: dict[str, Any]) -> str:
    head = f"{row['recipe']:<9} {row['compile']:<15} {row['workers_per_gpu']:>7}"
    if "images_per_s" not in row:
        return f"{head}  {row.get('error') or row.get('skipped')}"
    mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "   n/a"
    note = "s/model extrapolated from timed steps" if row["extrapolated"] else "whole models"
    return (f"{head} {row['images_per_s']:>10.0f} {row['seconds_per_model']:>8.2f} "
            f"{row['outputs_seconds']:>9.2f} {row['tflops']:>8.1f} {mfu}  {note}, "
            f"{row['chunks']} chunks, {row['peak_memory_gib']:.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())
