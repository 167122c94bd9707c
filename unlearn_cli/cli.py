"""The `unlearn` command line: parse options, load the config, call `<step>.run()`, render.

Every `UnlearnError` becomes one red line on stderr and exit code 1 (set UNLEARN_TRACEBACK=1 for the
traceback); Ctrl-C stops the workers and exits 130, keeping every finished model.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import UnlearnError

app = typer.Typer(
    name="unlearn",
    help="Does your unlearning method really forget? Train reference models, run the method N "
    "times, and score it per forget example as the NeurIPS 2023 Machine Unlearning Challenge did.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# ---------------------------------------------------------------- shared options
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Experiment YAML. Default: the store's own config if it "
                 "exists, else configs/digits.yaml.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key, value read as YAML: "
                 "--set train.epochs=10 (repeatable).", show_default=False),
]
StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", help="Experiment folder. Default: runs/<config name>, e.g. "
                 "runs/digits.", show_default=False),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="auto | cpu | cuda | cuda:0,1 (default: launch.device, auto).",
                 show_default=False),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", help="CPU worker processes (0 = one per core).", show_default=False),
]
WorkersPerGpuOpt = Annotated[
    Optional[int],
    typer.Option("--workers-per-gpu", help="Long-lived workers per GPU.", show_default=False),
]
BackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", help="local (processes on this machine) | ray (a Ray cluster; "
                 "default: launch.backend, local).", show_default=False),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option("--address", help="Ray: auto (RAY_ADDRESS or a running `ray start`) | local "
                 "(a private instance) | HOST:PORT (default: launch.address, auto).",
                 show_default=False),
]


def _boundary(fn):
    """Turn user errors into one red line and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnlearnError as exc:
            if os.environ.get("UNLEARN_TRACEBACK"):
                raise
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a path the user gave: a folder, no permission, a full disk
            if os.environ.get("UNLEARN_TRACEBACK"):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            err_console.print(f"[bold red]error:[/bold red] {exc.strerror or exc}{where}; check "
                              "the path and its permissions", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted: finished models are stored; rerun the same "
                              "command to resume[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _resolve(config: Path | None, overrides: list[str] | None, store: Path | None,
             launch: dict[str, Any]) -> tuple[Any, Path]:
    """The config (explicit file, else the store's own, else the default) and the store path."""
    from .config import apply_overrides, from_mapping, load_config
    from .store import Store, default_store

    # Launch flags are typed by Typer already: JSON is valid YAML, so `cuda:0,1` stays a string.
    sets = list(overrides or []) + [
        f"launch.{k}={json.dumps(v)}" for k, v in launch.items() if v is not None
    ]
    if config is None:
        candidate = store if store is not None else default_store(load_config(None, sets))
        if Store(candidate).exists():
            raw = Store(candidate).read_experiment().get("config", {})
            source = f"{candidate}/experiment.json" + (" with the command-line options"
                                                        if sets else "")
            cfg = from_mapping(apply_overrides(raw, sets), source=source)
            return cfg, candidate
    cfg = load_config(config, sets)
    return cfg, store if store is not None else default_store(cfg)


class _Bar:
    """A rich progress bar fed by the launcher's events (models done, ETA)."""

    def __init__(self, label: str):
        self.label = label
        self.progress: Progress | None = None
        self.task = None
        self.failed = 0

    def plan(self, to_train: int, reused: int) -> None:
        if reused:
            console.print(f"{reused} model(s) already stored: reused")
        if to_train == 0:
            console.print("nothing to do: every model is stored")
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=to_train)

    def event(self, kind: str, job_id: str, value: Any) -> None:
        if self.progress is None:
            return
        if kind == "progress":
            self.progress.advance(self.task, value)
        elif kind == "cluster":
            self.progress.console.print(value)
        elif kind == "finished" and not value.ok:
            self.failed += 1
            self.progress.console.print(f"[red]job {job_id} failed:[/red] {value.error}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command(
    "train-refs",
    epilog="Examples:\n\n"
    "  unlearn train-refs --num-models 100\n\n"
    "  unlearn train-refs --num-models 8 --store runs/quick --set train.epochs=5\n\n"
    "  unlearn train-refs --config configs/digits.yaml --device cuda:0,1 --workers-per-gpu 4\n\n"
    "  unlearn train-refs --backend ray --address auto --num-models 512",
)
@_boundary
def train_refs_cmd(
    num_models: Annotated[int, typer.Option("--num-models", "-n",
                                            help="Reference models to have in the store.")] = 100,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    workers_per_gpu: WorkersPerGpuOpt = None,
    backend: BackendOpt = None,
    address: AddressOpt = None,
) -> None:
    """Train the original model on the whole training set and N reference models on the retain set.

    Resumable: finished models are kept, and a rerun (or a larger N) trains only what is missing.
    """
    from . import train_refs

    launch = {"device": device, "workers": workers, "workers_per_gpu": workers_per_gpu,
              "backend": backend, "address": address}
    cfg, store_path = _resolve(config, set_, store, launch)
    bar = _Bar("training")
    try:
        result = train_refs.run(cfg, store_path, num_models=num_models, on_event=bar.event,
                                on_plan=bar.plan)
    finally:
        bar.close()
    console.print(
        f"store {result.store}: {len(result.trained)} reference model(s) trained, "
        f"{len(result.reused)} reused" + (", original trained" if result.trained_original else "")
    )


@app.command(
    "apply",
    epilog="Examples:\n\n"
    "  unlearn apply --method finetune\n\n"
    "  unlearn apply --method reset-head --num-models 50 --set method.reset-head.epochs=3\n\n"
    "  unlearn apply --method finetune --dry-run\n\n"
    "  unlearn apply --method my_methods.py:forget_it --store runs/digits",
)
@_boundary
def apply_cmd(
    method: Annotated[str, typer.Option("--method", "-m", help="A built-in method (list: "
                                        "`unlearn methods`) or a plugin: pkg.module:fn or "
                                        "path/to/file.py:fn.")],
    num_models: Annotated[Optional[int], typer.Option(
        "--num-models", "-n", help="Unlearning runs (default: the number of reference models).",
        show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    workers_per_gpu: WorkersPerGpuOpt = None,
    backend: BackendOpt = None,
    address: AddressOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Run the method once, print accuracies and time next to the "
        "original's, store nothing.")] = False,
) -> None:
    """Run an unlearning method N times from the original checkpoint, each with its own seed."""
    from . import apply

    launch = {"device": device, "workers": workers, "workers_per_gpu": workers_per_gpu,
              "backend": backend, "address": address}
    cfg, store_path = _resolve(config, set_, store, launch)
    if dry_run:
        from .report import dry_run_table

        console.print(dry_run_table(apply.dry_run(cfg, store_path, method_spec=method)))
        console.print("dry run: nothing was stored")
        return
    bar = _Bar(f"unlearning ({method})")
    try:
        result = apply.run(cfg, store_path, method_spec=method, num_models=num_models,
                           on_event=bar.event, on_plan=bar.plan)
    finally:
        bar.close()
    console.print(f"store {result.store}: {len(result.trained)} run(s) of {result.method} done, "
                  f"{len(result.reused)} reused")


@app.command(
    "score",
    epilog="Examples:\n\n"
    "  unlearn score --out report.json\n\n"
    "  unlearn score --method finetune --metric all --store runs/digits\n\n"
    "  unlearn score --method finetune --method reset-head",
)
@_boundary
def score_cmd(
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", "-m", help="Method(s) to score (repeatable). Default: every stored method.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the JSON report here.",
                                                show_default=False)] = None,
    metric: Annotated[str, typer.Option("--metric", help="official | seed | all")] = "official",
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", help="Bootstrap resamples for F's interval (0 = none).")] = 100,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """Score stored unlearning runs against the reference models. Reads stored outputs only."""
    from . import score
    from .report import print_reports, write_reports

    _, store_path = _resolve(config, set_, store, {})
    if out is not None and out.is_dir():
        raise UnlearnError(f"--out {out} is a folder; give a file path such as {out}/report.json")
    reports = score.run(store_path, methods=method, metric=metric, bootstrap=bootstrap)
    print_reports(reports, console)
    if out is not None:
        write_reports(reports, out)
        console.print(f"report written to {out}")


@app.command("methods")
def methods_cmd() -> None:
    """List the built-in unlearning methods."""
    from .methods import REGISTRY

    for name, m in REGISTRY.items():
        console.print(f"[bold]{name:<12}[/bold] {m.summary}")


def main() -> None:
    app(prog_name="unlearn")


if __name__ == "__main__":
    sys.exit(main())
