"""Benchmark: the two CIFAR-10 recipes on one GPU: engines, workers per GPU, MPS, lockstep K.

Run: python benchmarks/bench_gpu.py [--budget 320] [--recipes fast,resnet18] [--workers 1,2,4]
                                    [--lockstep 1,4,8,16] [--compile default] [--dry-run]
     (benchmarks/gpu_check.sh runs it after the GPU tests, in 8 minutes at most)

Per recipe and setting it prints training images/s (all workers of the GPU together), seconds per
model (one worker's latency: training + the per-sample output pass), GPU-seconds per model (the
GPU's time divided by the models it finished: what N models cost), TFLOP/s and MFU against the
card's dense bf16 peak (PEAK_TFLOPS; --peak-tflops overrides). Settings, cheapest first:
- solo: one worker process measures, one after another, eager `fit`, `train.cuda_graph`, lockstep
  ensembles of K = 1/4/8/16 (`train.engine: ensemble`), then `torch.compile` (last: it takes tens
  of seconds to compile);
- 2 and 4 workers per GPU without MPS (the processes take turns on the GPU), then with MPS when an
  MPS control daemon can be started here (`nvidia-cuda-mps-control -d` in a private pipe folder;
  stopped afterwards); where it cannot, the rows say why.
At the end: PASS / FAIL / NOT MEASURED against the targets (one H100/H200): seed recipe >= 25%
MFU aggregate per GPU (best setting); fast recipe <= 2.4 s per model (one worker, one model at a
time: latency). The fast recipe's >= 93% accuracy needs the real data: not checked here.

How it measures, with the project's own code (launcher, workers, models, `fit`, `fit_lockstep`):
- Synthetic CIFAR-shaped data made on the GPU: 60,000 random uint8 images and labels (throughput
  does not depend on the pixels), split 1,000 forget / 49,000 retain / 10,000 test.
- Each setting is warmed up untimed first (cuDNN autotuning of every shape, compilation, the
  output pass); a worker of a multi-worker phase then waits until every worker is warm.
- Only training is timed, between two `torch.cuda.synchronize` calls: model building and
  initialisation (0.9 s of CPU for a ResNet-18) and the whitening set-up happen once per setting,
  before any clock starts (chunks go on training the same modules: speed does not depend on the
  weights). A chunk of the fast recipe is a whole model (10 epochs); of the seed recipe, and of
  every lockstep setting, CHUNK_STEPS steps, and seconds per model are extrapolated from the time
  per image. The output pass (with the config's test-time augmentation) is timed once per setting.
- FLOPs: 3 x the forward FLOPs counted from the layer shapes (`models.forward_flops`; ResNet-18
  CIFAR: 1.11 GFLOP forward, 3.33 forward + backward) x images trained.
Results go to $UNLEARN_BENCH_OUT (default benchmarks/out/): bench_gpu.json (rows, verdicts and what
produced them, rewritten after every phase) and bench_gpu.txt (the table). With no GPU it says so
and exits 0. --dry-run runs every phase on the CPU at toy sizes, to check the script; it measures
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # so the script runs without an install
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RECIPES = {"fast": "cifar10-fast.yaml", "resnet18": "cifar10-resnet18.yaml"}
NUM_FORGET, NUM_RETAIN, NUM_TEST = 1_000, 49_000, 10_000  # the CIFAR-10 split, images
CHUNK_STEPS = {"fast": 20, "resnet18": 150}  # steps per timed chunk when not a whole model
TIMED_SECONDS = 3.0  # per setting and worker: chunks are trained until this has passed (>= 1)
BARRIER_SECONDS = 300.0  # how long a warm worker waits for the others of its phase
# Rough cost of a phase, seconds (start-up, warm-up, timing), to skip what the --budget cannot fit.
PHASE_COST = {"solo": 60.0, "compile": 110.0, "workers": 20.0}
TARGETS = {"resnet18": ("mfu", 0.25), "fast": ("seconds_per_model", 2.4)}

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


def _card_name() -> str:
    """GPU 0's name, from nvidia-smi where it can (the parent must not hold a CUDA context of its
    own when an MPS daemon starts), else from torch (which initialises CUDA here)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                               "-i", "0"], capture_output=True, text=True, timeout=20)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    return torch.cuda.get_device_name(0)


def peak_tflops(name: str) -> float | None:
    words = set(name.upper().replace("-", " ").replace("_", " ").split())
    for needed, peak in PEAK_TFLOPS:
        if all(w in words for w in needed):
            return peak
    return None


# ---------------------------------------------------------------- worker side


def bench_job(payload: dict[str, Any], *, device: str, progress: Any) -> None:
    """One worker of a phase: for each setting, warm up, (meet the others), time, record."""
    out = Path(payload["record"])
    barrier = Path(payload["barrier"])
    try:
        records = _measure_all(payload, device, barrier)
    except BaseException:
        (barrier / f"failed-{payload['index']}").touch()
        raise
    out.write_text(json.dumps(records))
    progress(1)


def _measure_all(payload: dict[str, Any], device: str, barrier: Path) -> list[dict[str, Any]]:
    import torch

    from unlearn_cli import cifar

    dev = torch.device(device)
    sizes = payload["sizes"]
    n_all = sizes["forget"] + sizes["retain"] + sizes["test"]
    gen = torch.Generator(device=dev).manual_seed(payload["index"])
    x = torch.randint(0, 256, (n_all, *cifar.IMAGE_SHAPE), dtype=torch.uint8, device=dev,
                      generator=gen)
    y = torch.randint(0, cifar.NUM_CLASSES, (n_all,), device=dev, generator=gen)
    records = []
    for setting in payload["settings"]:
        if time.time() > payload["deadline"]:
            records.append({**setting["label"], "skipped": "phase time used up"})
            continue
        try:
            row = _measure(setting, payload, dev, x, y, barrier)
        except Exception as exc:  # noqa: BLE001 - report the setting, go on with the next
            if payload["workers"] > 1:
                raise
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        records.append({**setting["label"], **row})
    return records


def _measure(setting: dict[str, Any], payload: dict[str, Any], dev: Any, x: Any, y: Any,
             barrier: Path) -> dict[str, Any]:
    import copy

    import numpy as np
    import torch

    from unlearn_cli import cifar, training
    from unlearn_cli.config import from_mapping
    from unlearn_cli.lockstep import fit_lockstep
    from unlearn_cli.models import fresh_model, init_from_data, model_spec

    cfg = from_mapping(setting["config"])
    options = training.recipe(cfg.train)
    sizes = payload["sizes"]
    f, r = sizes["forget"], sizes["forget"] + sizes["retain"]
    split = {"forget": np.arange(f), "retain": np.arange(f, r), "test": np.arange(r, len(y))}
    spec = model_spec(cfg.model, cifar.IMAGE_SHAPE, cifar.NUM_CLASSES, mean=cifar.MEAN,
                      std=cifar.STD)
    chunk = setting["chunk"]
    xc, yc = x[f : f + chunk["examples"]], y[f : f + chunk["examples"]]
    chunk_options = {**options, "epochs": chunk["epochs"]}
    k = setting["lockstep"]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # The models are built and initialised once per setting, untimed: a ResNet-18 costs 0.9 s of
    # CPU to initialise (16 of them 14 s), and the weights a chunk starts from do not change its
    # speed. Lockstep members are copies of one model (each chunk trains them on their own seeds).
    base = fresh_model(spec, 0, dev)
    init_from_data(base, xc)
    models = [base] if not k else [copy.deepcopy(base) for _ in range(k)]

    def train(seed: int) -> None:
        if k:
            fit_lockstep(models, xc, yc, seeds=[seed * 100 + i for i in range(k)],
                         **chunk_options)
        else:
            training.fit(models[0], xc, yc, seed=seed, **chunk_options)

    # Warm-up, untimed: every shape of a chunk (autotuning, compilation), and the output pass.
    with training.warming():
        train(0)
    training.per_sample_outputs(models[0], x, y, split, tta=cfg.train.tta)
    sync()
    if payload["workers"] > 1:
        tag = f"{setting['label']['setting']}-{payload['index']}"
        (barrier / f"ready-{tag}").touch()
        waited = time.time()
        while len(list(barrier.glob(f"ready-{setting['label']['setting']}-*"))) < payload[
                "workers"]:
            if list(barrier.glob("failed-*")):
                raise RuntimeError("another worker of this phase failed; see its error")
            if time.time() - waited > BARRIER_SECONDS:
                raise RuntimeError(f"the other workers were not warm after {BARRIER_SECONDS} s")
            time.sleep(0.05)

    chunks = []
    deadline = time.time() + payload["seconds"]
    seed = 1
    while True:
        sync()
        start = time.time()
        train(seed)
        sync()
        chunks.append({"start": start, "end": time.time()})
        seed += 1
        if time.time() >= deadline:
            break
    sync()
    start = time.time()
    training.per_sample_outputs(models[0], x, y, split, tta=cfg.train.tta)
    sync()
    outputs_seconds = time.time() - start
    memory = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return {"chunks": chunks, "outputs_seconds": outputs_seconds, "peak_memory_bytes": memory,
            "graph": dict(training.last_run)}


# ---------------------------------------------------------------- parent side


def images_per_pass(n: int, batch_size: int, drop_last: bool) -> int:
    """Images trained in one epoch over n examples (the last partial batch dropped or not)."""
    return (n // batch_size) * batch_size if drop_last and n >= batch_size else n


def _setting(name: str, cfg: Any, label: str, lockstep: int, sizes: dict[str, int],
             dry_run: bool) -> dict[str, Any]:
    t = cfg.train
    whole = name == "fast" and not lockstep
    if whole:
        chunk = {"examples": sizes["retain"], "epochs": t.epochs}
    else:
        # Lockstep groups train K models a step: fewer steps keep a chunk near a second.
        steps = 2 if dry_run else max(10, CHUNK_STEPS[name] // max(1, lockstep))
        chunk = {"examples": min(sizes["retain"], steps * t.batch_size), "epochs": 1}
    return {"config": cfg.to_dict(), "chunk": chunk, "lockstep": lockstep,
            "label": {"recipe": name, "setting": label, "lockstep": lockstep,
                      "compile": t.compile, "cuda_graph": t.cuda_graph}}


def _rows(records: list[list[dict[str, Any]]], settings: list[dict[str, Any]], workers: int,
          sizes: dict[str, int], flops: dict[str, int]) -> list[dict[str, Any]]:
    """Per setting: the workers' records -> one row of throughput figures."""
    rows = []
    for i, setting in enumerate(settings):
        per_worker = [r[i] for r in records]
        base = {**setting["label"], "workers_per_gpu": workers}
        failed = [r for r in per_worker if "chunks" not in r]
        if failed:
            rows.append({**base, **{k: v for k, v in failed[0].items()
                                    if k in ("error", "skipped")}})
            continue
        cfg_train = setting["config"]["train"]
        chunk, k = setting["chunk"], max(1, setting["lockstep"])
        chunk_images = k * chunk["epochs"] * images_per_pass(
            chunk["examples"], cfg_train["batch_size"], cfg_train["drop_last"])
        model_images = cfg_train["epochs"] * images_per_pass(
            sizes["retain"], cfg_train["batch_size"], cfg_train["drop_last"])
        all_chunks = [c for r in per_worker for c in r["chunks"]]
        window = max(c["end"] for c in all_chunks) - min(c["start"] for c in all_chunks)
        images_per_s = len(all_chunks) * chunk_images / window
        latency = []
        for r in per_worker:
            per_image = sum(c["end"] - c["start"] for c in r["chunks"]) / (
                len(r["chunks"]) * chunk_images)
            # One worker's seconds per model: its members train together, so a lockstep model
            # takes the whole group's time per image times the images of one model, times K.
            latency.append(per_image * model_images * k + r["outputs_seconds"])
        outputs = sum(r["outputs_seconds"] for r in per_worker) / len(per_worker)
        rows.append({
            **base,
            "images_per_s": images_per_s,
            "seconds_per_model": sum(latency) / len(latency),
            # What a model costs the GPU: its training at the measured aggregate rate, plus its
            # output pass (outputs are computed by each worker for its own models).
            "gpu_seconds_per_model": model_images / images_per_s + outputs / workers,
            "outputs_seconds": outputs,
            "extrapolated": chunk_images != model_images,
            "chunks": len(all_chunks),
            "tflops": images_per_s * flops[setting["label"]["recipe"]] / 1e12,
            "peak_memory_gib": max(r["peak_memory_bytes"] for r in per_worker) / 2**30,
            "graph_fallback": per_worker[0]["graph"].get("graph_fallback"),
        })
    return rows


def run_phase(settings: list[dict[str, Any]], workers: int, args: argparse.Namespace,
              device: str, sizes: dict[str, int], flops: dict[str, int], seconds_left: float
              ) -> list[dict[str, Any]]:
    from unlearn_cli.launch import Job, plan_slots, run_jobs

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        base = {"sizes": sizes, "settings": settings, "workers": workers,
                "barrier": str(work), "seconds": args.seconds,
                "deadline": time.time() + seconds_left}
        jobs = [Job(f"bench-{k}", "bench_gpu:bench_job",
                    {**base, "index": k, "record": str(work / f"record-{k}.json")})
                for k in range(workers)]
        if device == "cpu":
            slots = plan_slots("cpu", workers=workers, workers_per_gpu=1, num_jobs=workers)
        else:
            slots = plan_slots(device, workers=0, workers_per_gpu=workers, num_jobs=workers)
        outcomes = run_jobs(jobs, slots, inline=False)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            error = "; ".join(f"{o.id}: {o.error}" for o in failed[:2])
            return [{**s["label"], "workers_per_gpu": workers, "error": error} for s in settings]
        records = [json.loads((work / f"record-{k}.json").read_text()) for k in range(workers)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _rows(records, settings, workers, sizes, flops)


class MPS:
    """An MPS control daemon in a private pipe folder, for the phases that ask for it."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-mps-"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}
        self.error = ""

    def start(self) -> bool:
        binary = shutil.which("nvidia-cuda-mps-control")
        if binary is None:
            self.error = "nvidia-cuda-mps-control is not installed here"
            return False
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([binary, "-d"], env={**os.environ, **self.env},
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.error = f"starting it failed: {exc}"
            return False
        control = Path(self.env["CUDA_MPS_PIPE_DIRECTORY"]) / "control"
        for _ in range(50):
            if control.exists():
                os.environ.update(self.env)  # spawned workers inherit it and connect
                return True
            time.sleep(0.1)
        self.error = (f"the daemon did not come up (exit {done.returncode}: "
                      f"{(done.stderr or done.stdout).strip()[:120]})")
        return False

    def stop(self) -> None:
        binary = shutil.which("nvidia-cuda-mps-control")
        if binary:
            try:
                subprocess.run([binary], input="quit\n", env={**os.environ, **self.env},
                               capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for key in self.env:
            os.environ.pop(key, None)
        shutil.rmtree(self.folder, ignore_errors=True)


def verdicts(rows: list[dict[str, Any]], recipes: list[str]) -> list[dict[str, Any]]:
    """PASS / FAIL / NOT MEASURED per target, from the rows of this run."""
    out = []
    for recipe in recipes:
        metric, bound = TARGETS[recipe]
        measured = [r for r in rows if r.get("recipe") == recipe and metric in r]
        if metric == "seconds_per_model":  # latency: one worker, one model at a time
            measured = [r for r in measured if r["workers_per_gpu"] == 1 and not r["lockstep"]]
        want = f">= {100 * bound:.0f}% MFU" if metric == "mfu" else f"<= {bound} s per model"
        if not measured:
            out.append({"recipe": recipe, "target": want, "verdict": "NOT MEASURED"})
            continue
        best = (max if metric == "mfu" else min)(measured, key=lambda r: r[metric])
        ok = best[metric] >= bound if metric == "mfu" else best[metric] <= bound
        got = (f"{100 * best[metric]:.1f}% MFU" if metric == "mfu"
               else f"{best[metric]:.2f} s per model")
        out.append({"recipe": recipe, "target": want, "best": got,
                    "setting": f"{best['setting']}, {best['workers_per_gpu']} worker(s)",
                    "verdict": "PASS" if ok else "FAIL"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("UNLEARN_BENCH_OUT", "benchmarks/out"))
    parser.add_argument("--budget", type=float, default=340.0,
                        help="seconds for all phases; phases that do not fit are skipped")
    parser.add_argument("--workers", default="1,2,4", help="workers per GPU to measure")
    parser.add_argument("--lockstep", default=None,
                        help="lockstep ensemble sizes K (default 1,4,8,16; dry run 1,2)")
    parser.add_argument("--recipes", default="resnet18,fast")
    parser.add_argument("--compile", default="default",
                        help="torch.compile mode of the compiled setting (last of each recipe's "
                             "solo phase); none to skip it")
    parser.add_argument("--no-mps", action="store_true", help="skip the MPS phases")
    parser.add_argument("--seconds", type=float, default=TIMED_SECONDS,
                        help="timed seconds per setting and worker")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak, if the table does not know it")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU at toy sizes to check the script (measures nothing)")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    from unlearn_cli import cifar
    from unlearn_cli.config import CONFIG_DIR, load_config
    from unlearn_cli.models import forward_flops, model_spec

    out = Path(args.out)
    if args.dry_run:
        device, card, sizes = "cpu", "CPU (dry run: toy sizes, nothing measured)", {
            "forget": 8, "retain": 96, "test": 16}
        args.seconds = min(args.seconds, 0.5)
        args.lockstep = args.lockstep or "1,2"  # K = 16 toy ResNets under vmap: minutes here
        overrides = ["train.epochs=1", "train.batch_size=32"]
        tiny = {"fast": ["model.widths=[4,8,8]"], "resnet18": ["model.widths=[4,4,4,4]"]}
    elif not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA GPU is visible to torch {torch.__version__} "
              f"(built for CUDA {torch.version.cuda}): nothing to measure. Run this on a machine "
              "with a GPU (benchmarks/gpu_check.sh).")
        return 0
    else:
        device, card = "cuda:0", _card_name()
        sizes = {"forget": NUM_FORGET, "retain": NUM_RETAIN, "test": NUM_TEST}
        overrides, tiny = [], {}
    peak = args.peak_tflops or (None if args.dry_run else peak_tflops(card))
    print(f"card: {card}; dense bf16 peak: "
          + (f"{peak:.0f} TFLOP/s" if peak else "unknown (MFU not computed; see --peak-tflops)"))
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, budget {args.budget:.0f} s")
    recipes = [r for r in args.recipes.split(",") if r]
    workers_list = [int(w) for w in args.workers.split(",") if w and int(w) > 1]
    lockstep = [int(k) for k in (args.lockstep or "1,4,8,16").split(",") if k]

    def config(name: str, *extra: str) -> Any:
        return load_config(CONFIG_DIR / RECIPES[name], [*overrides, *tiny.get(name, []), *extra])

    flops = {}
    for name in recipes:
        cfg = config(name)
        spec = model_spec(cfg.model, cifar.IMAGE_SHAPE, cifar.NUM_CLASSES, mean=cifar.MEAN,
                          std=cifar.STD)
        flops[name] = 3 * forward_flops(spec)  # forward + backward, per image

    # Phases, most telling first (the budget skips what does not fit): each recipe's solo phase,
    # the fast recipe's compiled setting, several workers without then with MPS, the seed
    # recipe's compiled setting. (kind, recipe, workers per GPU, settings, with MPS)
    phases: list[tuple[str, str, int, list[dict[str, Any]], bool]] = []

    def compiled(name: str) -> tuple[str, str, int, list[dict[str, Any]], bool]:
        return ("compile", name, 1, [_setting(
            name, config(name, f"train.compile={args.compile}"), f"compile {args.compile}", 0,
            sizes, args.dry_run)], False)

    for name in recipes:
        solo = [_setting(name, config(name, "train.compile=none"), "eager", 0, sizes,
                         args.dry_run),
                _setting(name, config(name, "train.compile=none", "train.cuda_graph=true"),
                         "cuda-graph", 0, sizes, args.dry_run)]
        solo += [_setting(name, config(name, "train.compile=none"), f"lockstep K={k}", k,
                          sizes, args.dry_run) for k in lockstep]
        phases.append(("solo", name, 1, solo, False))
    if args.compile != "none" and "fast" in recipes:
        phases.append(compiled("fast"))
    for mps in ((False,) if args.no_mps or device == "cpu" else (False, True)):
        for name in recipes:
            for w in workers_list:
                label = f"eager{' + MPS' if mps else ''}"
                phases.append(("workers", name, w, [_setting(
                    name, config(name, "train.compile=none"), label, 0, sizes, args.dry_run)],
                    mps))
    if args.compile != "none":
        phases += [compiled(name) for name in recipes if name != "fast"]

    result: dict[str, Any] = {
        "card": card, "peak_tflops": peak, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": args.dry_run,
        "sizes": sizes, "flops_per_image": flops, "rows": [],
    }
    header = (f"{'recipe':<9} {'setting':<22} {'wk':>2} {'images/s':>9} {'s/model':>8} "
              f"{'GPU s/mdl':>9} {'out s':>6} {'TFLOP/s':>8} {'MFU':>6}  notes")
    lines = [header]
    print(header, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mps = MPS()
    mps_state: bool | None = None  # None: not tried; True: running; False: cannot start
    try:
        for kind, _recipe, workers, settings, with_mps in phases:
            left = args.budget - (time.perf_counter() - start)
            if with_mps and mps_state is None:
                mps_state = mps.start()
            if left < PHASE_COST[kind] and not args.dry_run:
                rows = [{**s["label"], "workers_per_gpu": workers,
                         "skipped": f"budget: {left:.0f} s left"} for s in settings]
            elif with_mps and not mps_state:
                rows = [{**s["label"], "workers_per_gpu": workers,
                         "skipped": f"MPS: {mps.error}"} for s in settings]
            else:
                try:
                    rows = run_phase(settings, workers, args, device, sizes, flops,
                                     max(1.0, left - 5.0))
                except Exception as exc:  # noqa: BLE001 - report the phase, go on
                    rows = [{**s["label"], "workers_per_gpu": workers,
                             "error": f"{type(exc).__name__}: {exc}"} for s in settings]
            for row in rows:
                if "tflops" in row and peak:
                    row["mfu"] = row["tflops"] / peak
                result["rows"].append(row)
                lines.append(_format(row))
                print(lines[-1], flush=True)
            (out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if mps_state:
            mps.stop()
    result["verdicts"] = verdicts(result["rows"], recipes)
    lines.append("")
    for v in result["verdicts"]:
        if args.dry_run:
            v["verdict"] = "NOT MEASURED (dry run)"
        line = (f"{v['verdict']:<12} {v['recipe']:<9} target {v['target']}"
                + (f"; best {v['best']} ({v['setting']})" if "best" in v else ""))
        lines.append(line)
        print(line)
    lines.append("fast recipe >= 93% test accuracy: NOT MEASURED (synthetic data; needs CIFAR-10)")
    print(lines[-1])
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_gpu.txt").write_text(
        f"card: {card}; peak {peak} TFLOP/s; torch {torch.__version__}; {result['created']}\n"
        + "\n".join(lines) + "\n")
    print(f"written: {out / 'bench_gpu.json'}, {out / 'bench_gpu.txt'}")
    return 0


def _format(row: dict[str, Any]) -> str:
    head = f"{row['recipe']:<9} {row['setting']:<22} {row['workers_per_gpu']:>2}"
    if "images_per_s" not in row:
        return f"{head}  {row.get('error') or row.get('skipped')}"
    mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "   n/a"
    note = "extrapolated from timed steps" if row["extrapolated"] else "whole models"
    if row.get("graph_fallback"):
        note += f"; graph fell back: {row['graph_fallback']}"
    return (f"{head} {row['images_per_s']:>9.0f} {row['seconds_per_model']:>8.2f} "
            f"{row['gpu_seconds_per_model']:>9.2f} {row['outputs_seconds']:>6.2f} "
            f"{row['tflops']:>8.1f} {mfu}  {note}, {row['chunks']} chunks, "
            f"{row['peak_memory_gib']:.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())
