"""The `unlearn` command line: parse options, load the config, call `<step>.run()`, render.

Every `UnlearnError` becomes one red line on stderr and exit code 1 (set UNLEARN_TRACEBACK=1 for the
traceback); Ctrl-C stops the workers and exits 130, keeping every finished model.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .errors import UnlearnError

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    name="unlearn",
    help="Does your unlearning method really forget? Train reference models, run the method N "
    "times, and score it per forget example as the NeurIPS 2023 Machine Unlearning Challenge did.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help, formatted by click: rich's help formatter costs a third of a second of imports
    # and shows flags as `--dry-run <bool>`.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

# Heavy modules (rich, numpy, torch) are imported where they are needed, never at start-up:
# `unlearn --help`, `unlearn methods` and every argument error answer without them.


@functools.cache
def _console() -> Console:
    """The terminal console for tables and progress, made on first use. emoji=False: a plugin
    spec such as `file.py:m` next to a colon would become a :m: emoji. User text printed inside
    markup goes through `escape` (a path with [brackets] is not a style)."""
    from rich.console import Console

    return Console(emoji=False)


def escape(text: str) -> str:
    """Text to show literally inside rich markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _say(text: str) -> None:
    """One plain line on stdout (no markup, no highlighting)."""
    _console().print(text, markup=False, highlight=False, soft_wrap=True)


def _error(text: str) -> None:
    """The one red `error:` line on stderr (click's styling: no markup to escape)."""
    typer.secho("error:", fg="red", bold=True, err=True, nl=False)
    typer.echo(f" {text}", err=True)

# ---------------------------------------------------------------- shared options
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", metavar="PATH", help="Experiment YAML. Default: the store's "
                 "own config if it exists, else the bundled digits config. A bare name picks a "
                 "bundled config (`unlearn configs`).", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key, value read as "
                 "YAML: --set train.epochs=10 (repeatable).", show_default=False),
]
StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", metavar="DIR", help="Experiment folder. Default: runs/<config "
                 "name>, e.g. runs/digits.", show_default=False),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", metavar="DEVICE", help="auto | cpu | cuda | cuda:0,1 (default: "
                 "launch.device, auto).", show_default=False),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", metavar="K",
                 help="CPU worker processes (0 = cores / launch.threads).", show_default=False),
]
WorkersPerGpuOpt = Annotated[
    Optional[int],
    typer.Option("--workers-per-gpu", metavar="K", help="Long-lived workers per GPU.",
                 show_default=False),
]
BackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", metavar="NAME", help="local (processes on this machine) | ray (a "
                 "Ray cluster; default: launch.backend, local).", show_default=False),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option("--address", metavar="ADDR", help="Ray: auto (RAY_ADDRESS or a running `ray "
                 "start`) | local (a private instance) | HOST:PORT (default: launch.address, "
                 "auto).", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"unlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Does your unlearning method really forget? Train reference models, run the method N times,
    and score it per forget example as the NeurIPS 2023 Machine Unlearning Challenge did."""


def _boundary(fn):
    """Turn user errors into one red line and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnlearnError as exc:
            if os.environ.get("UNLEARN_TRACEBACK"):
                raise
            _error(str(exc))
            raise typer.Exit(1) from None
        except OSError as exc:  # a path the user gave: a folder, no permission, a full disk
            if os.environ.get("UNLEARN_TRACEBACK"):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _error(f"{exc.strerror or exc}{where}; check the path and its permissions")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted: finished models are stored; rerun the same command to "
                        "resume", fg="yellow", err=True)
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


def _print_redone(redone: dict[str, str]) -> None:
    """Name the damaged models a command found and made again (they were not reused)."""
    for who, problem in redone.items():
        _console().print(f"[yellow]{escape(who)} was damaged ({escape(problem)}): made "
                         "again[/yellow]", highlight=False)


class _Bar:
    """A rich progress bar fed by the launcher's events (models done, ETA)."""

    def __init__(self, label: str, noun: str):
        self.label = label
        self.noun = noun  # what `reused` counts: "reference model(s)", "run(s) of finetune"
        self.progress: Any = None  # a rich Progress while models are being made
        self.task = None
        self.failed = 0

    def plan(self, to_train: int, reused: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if reused:
            _say(f"{reused} {self.noun} already stored: reused")
        if to_train == 0:
            _say("nothing to do: every model is stored")
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=_console(),
        )
        self.progress.start()
        self.task = self.progress.add_task(escape(self.label), total=to_train)

    def event(self, kind: str, job_id: str, value: Any) -> None:
        if kind == "plan":  # what is about to run, before the first model: models, jobs, slots
            _say(value)
            return
        if self.progress is None:
            return
        if kind == "progress":
            self.progress.advance(self.task, value)
        elif kind == "cluster":
            self.progress.console.print(value)
        elif kind == "finished" and not value.ok:
            self.failed += 1
            self.progress.console.print(f"[red]job {escape(job_id)} failed:[/red] "
                                        f"{escape(value.error)}", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command(
    "train-refs",
    epilog="\b\nExamples:\n"
    "  unlearn train-refs --num-models 100\n"
    "  unlearn train-refs --num-models 8 --store runs/quick --set train.epochs=5\n"
    "  unlearn train-refs --config configs/digits.yaml --device cuda:0,1 --workers-per-gpu 4\n"
    "  unlearn train-refs --backend ray --address auto --num-models 512",
)
@_boundary
def train_refs_cmd(
    num_models: Annotated[int, typer.Option("--num-models", "-n", metavar="N",
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
    bar = _Bar("training", "reference model(s)")
    try:
        result = train_refs.run(cfg, store_path, num_models=num_models, on_event=bar.event,
                                on_plan=bar.plan)
    finally:
        bar.close()
    _print_redone(result.redone)
    if result.rebuilt:
        _say(f"experiment.json was missing: rebuilt from this config, which the provenance of "
             f"all {result.rebuilt} stored model(s) matches")
    _say(
        f"store {result.store}: {len(result.trained)} reference model(s) trained, "
        f"{len(result.reused)} reused" + (", original trained" if result.trained_original else "")
    )


@app.command(
    "apply",
    epilog="\b\nExamples:\n"
    "  unlearn apply --method finetune\n"
    "  unlearn apply --method reset-head --num-models 50 --set method.reset-head.epochs=3\n"
    "  unlearn apply --method finetune --dry-run\n"
    "  unlearn apply --method my_methods.py:forget_it --store runs/digits",
)
@_boundary
def apply_cmd(
    method: Annotated[str, typer.Option("--method", "-m", metavar="METHOD", help="A built-in "
                                        "method (list: `unlearn methods`) or a plugin: "
                                        "pkg.module:fn or path/to/file.py:fn.")],
    num_models: Annotated[Optional[int], typer.Option(
        "--num-models", "-n", metavar="N",
        help="Unlearning runs (default: the number of reference models).",
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

        result = apply.dry_run(cfg, store_path, method_spec=method)
        _console().print(dry_run_table(result))
        for who, how in result["timing"].items():
            _say(f"seconds, {who}: {how}")
        _say("dry run: nothing was stored")
        return
    bar = _Bar(f"unlearning ({method})", f"run(s) of {method}")
    try:
        result = apply.run(cfg, store_path, method_spec=method, num_models=num_models,
                           on_event=bar.event, on_plan=bar.plan)
    finally:
        bar.close()
    _print_redone(result.redone)
    _say(f"store {result.store}: {len(result.trained)} run(s) of {result.method} done, "
         f"{len(result.reused)} reused")


@app.command(
    "score",
    epilog="\b\nExamples:\n"
    "  unlearn score --out report.json\n"
    "  unlearn score --method finetune --metric all --store runs/digits\n"
    "  unlearn score --method finetune --method reset-head\n"
    "  unlearn score --html report.html --plots figures",
)
@_boundary
def score_cmd(
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", "-m", metavar="METHOD",
        help="Method(s) to score (repeatable). Default: every stored method.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE",
                                                help="Write the JSON report here.",
                                                show_default=False)] = None,
    metric: Annotated[str, typer.Option(
        "--metric", metavar="NAME",
        help="official | seed | seed-converged | lira | klom | all")] = "official",
    # 50: metrics.DEFAULT_RESAMPLES (not imported here: numpy would slow every command's start)
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", metavar="N", help="Bootstrap resamples for F's interval (0 = none).")] = 50,
    html: Annotated[Optional[Path], typer.Option(
        "--html", metavar="FILE", help="Write a self-contained HTML report (tables, figures) here.",
        show_default=False)] = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", metavar="DIR", help="Write every figure as PNG and SVG into this folder.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option(
        "--top-k", metavar="K", help="Forget examples shown per method (--html, --plots).")] = 8,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """Score stored unlearning runs against the reference models. Reads stored outputs only."""
    from . import score

    _, store_path = _resolve(config, set_, store, {})
    if out is not None and out.is_dir():
        raise UnlearnError(f"--out {out} is a folder; give a file path such as {out}/report.json")
    figures = html is not None or plots is not None
    if figures:
        from . import report_html

        report_html.check_options(html, plots, top_k)  # before scoring: fail fast
        report_html.start_drawing(top_k)  # its processes import matplotlib while we score
    reports = score.run(store_path, methods=method, metric=metric, bootstrap=bootstrap,
                        keep_confidences=figures)
    pages = report_html.prepare(reports, store_path, top_k=top_k) if figures else None
    from .report import print_reports, write_reports  # rich tables: only once there is a report

    print_reports(reports, _console())
    if any("seed_metric" in r for r in reports):
        _say("seed: dropped / above 1 = forget examples the seed's attack could not score (both "
             "folds NaN: left out of its score, which they bias upward) / examples scoring above "
             "1 (the attack did worse than chance; kept, as the seed does)")
    if out is not None:
        write_reports(reports, out)
        _say(f"report written to {out}")
    if pages is not None:
        report_html.write_all(pages, html=html, plots=plots, console=_console())


@app.command("methods")
def methods_cmd() -> None:
    """List the built-in unlearning methods: baselines, then the challenge's entries."""
    from .methods import GROUPS, REGISTRY  # names and summaries only: no method is imported

    for group, title in GROUPS.items():
        members = {name: m for name, m in REGISTRY.items() if m.group == group}
        width = max(len(name) for name in members)
        typer.echo(typer.style(title, bold=True))
        for name, m in members.items():
            typer.echo(f"{name:<{width}} {m.summary}")


configs_app = typer.Typer(help="The configs that ship with unlearn: list them, or print one to "
                          "copy and edit.", add_completion=False)
app.add_typer(configs_app, name="configs")


@configs_app.callback(invoke_without_command=True)
def configs_cmd(ctx: typer.Context) -> None:
    """List the bundled configs (use one with --config NAME)."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import CONFIG_DIR, bundled_configs

    for name in bundled_configs():
        lines = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
        # The first comment after the "# Used by:" line says what the experiment is.
        about = next((ln.lstrip("# ").strip() for ln in lines[1:]
                      if ln.startswith("#") and ln.lstrip("# ").strip()), "")
        about = re.split(r" \(|: ", about)[0]  # its first clause
        typer.echo(f"{typer.style(f'{name:<18}', bold=True)} {about}")
    _say(f"(in {CONFIG_DIR}) print one with `unlearn configs show NAME`, copy it with "
         "`unlearn configs show NAME > my.yaml`")


@configs_app.command("show")
@_boundary
def configs_show_cmd(name: Annotated[str, typer.Argument(help="A bundled config, e.g. digits.")]
                     ) -> None:
    """Print a bundled config as it is, to read or to copy and edit."""
    from .config import bundled_config, bundled_configs

    path = bundled_config(name)
    if path is None:
        raise UnlearnError(f"no bundled config {name!r}; bundled: {', '.join(bundled_configs())} "
                           "(`unlearn configs` lists them)")
    typer.echo(path.read_text(encoding="utf-8"), nl=False)


def main() -> None:
    try:
        app(prog_name="unlearn")
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


EXIT_JOIN_SECONDS = 10.0  # the longest a command waits for a thread of its own at exit


def _exit(code: Any) -> None:
    """Leave the process. Once torch is imported, Python's own shutdown (tearing down torch's
    modules and objects) takes about 1 s on this project's 2-core machine, for nothing: every
    file is written and closed by then. So run the exit handlers (multiprocessing's, Ray's, the
    launcher's), wait for any non-daemon thread (bounded), flush the output and end at once."""
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else code
    if "torch" not in sys.modules or not isinstance(code, int):
        raise SystemExit(code)
    import atexit
    import threading

    atexit._run_exitfuncs()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(timeout=EXIT_JOIN_SECONDS)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
