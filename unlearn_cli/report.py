"""Render reports: rich tables in the terminal, JSON on disk."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .score import SCHEMA
from .store import atomic_write_json


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def score_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One column per method, one row per quantity, so that methods read side by side."""
    table = Table(title="unlearn score", show_lines=False, title_justify="left")
    table.add_column("", style="bold")
    for rep in reports:
        table.add_column(rep["method"], justify="right")

    def row(label: str, fn) -> None:
        cells = []
        for rep in reports:
            try:
                cells.append(fn(rep))
            except (KeyError, TypeError):
                cells.append("-")
        table.add_row(label, *cells)

    def nmodels(r: dict) -> str:
        nm = r["num_models"]
        same = nm["retrained"] == nm["unlearned"]
        note = "" if same else f" (of {nm['retrained']}/{nm['unlearned']})"
        return f"{nm['scored']}{note}"

    row("N models per bank", nmodels)
    row("forget examples", lambda r: str(r["num_forget_examples"]))
    if any("forget_quality" in r for r in reports):
        row("forget quality F", lambda r: _fmt(r["forget_quality"], 4))
        row("F 95% interval", lambda r: "[{}, {}]".format(
            *(_fmt(v, 4) for v in r["forget_quality_interval"])))
        row("F at N/2 / ceiling at N/2", lambda r: "{} / {}".format(  # same N: comparable
            _fmt(r["ceiling"]["method_forget_quality"], 4),
            _fmt(r["ceiling"]["forget_quality"], 4)))
        row("share of the ceiling", lambda r: _fmt(r["ceiling"]["share"], 2))
        row("final score", lambda r: _fmt(r["final_score"], 4))
        row("final score, ratios capped at 1", lambda r: _fmt(r["final_score_clipped"], 4))
    for key, name in (("seed_metric", "seed"), ("seed_converged", "seed-converged")):
        if any(key in r for r in reports):
            row(f"{name} metric score", lambda r, k=key: _fmt(r[k]["score"], 4))
            row(f"{name}: dropped / above 1", lambda r, k=key: "{} / {}".format(
                r[k]["dropped"], r[k]["above_one"]))
            row(f"{name} attack accuracy", lambda r, k=key: _pct(r[k]["attack_accuracy"]))
    if any("seed_metric" in r or "seed_converged" in r for r in reports):
        row("simple MIA accuracy", lambda r: _pct(
            (r.get("seed_metric") or r["seed_converged"])["simple_mia_accuracy"]))
    if any("lira" in r for r in reports):
        row("LiRA held-out accuracy (0.5 ideal)", lambda r: _fmt(r["lira"]["balanced_accuracy"]))
        row("LiRA TPR at 1% / 5% FPR", lambda r: "{} / {}".format(
            _fmt(r["lira"]["tpr_at_1pct_fpr"]), _fmt(r["lira"]["tpr_at_5pct_fpr"])))
        row("LiRA examples beating chance", lambda r: "{} (~{} by chance)".format(
            _pct(r["lira"]["share_beating_chance"]), _pct(r["lira"]["alpha"])))
    if any("klom" in r for r in reports):
        for part in ("forget", "test"):
            row(f"KLOM {part} p95 / mean (0 ideal)", lambda r, p=part: "{} / {}".format(
                _fmt(r["klom"][p]["p95"]), _fmt(r["klom"][p]["mean"])))
    pairs = [("retain_accuracy", "retain acc"), ("test_accuracy", "test acc"),
             ("forget_accuracy", "forget acc")]
    if any("test_accuracy_forgotten_classes" in r["utility"] for r in reports):
        pairs += [("test_accuracy_remaining_classes", "test acc, remaining classes"),
                  ("test_accuracy_forgotten_classes", "test acc, forgotten classes")]
    for key, label in pairs:
        row(f"{label} unlearned / retrained", lambda r, k=key: "{} / {}".format(
            _pct(r["utility"][k]["unlearned"]), _pct(r["utility"][k]["retrained"])))
    row("s per model unlearn / retrain", lambda r: "{} / {}".format(
        _fmt(r["runtime"]["seconds_per_model"]["unlearned"]),
        _fmt(r["runtime"]["seconds_per_model"]["retrained"])))

    def gate(r: dict) -> str:
        rt = r["runtime"]
        text = _fmt(rt["ratio"], 3)
        return f"[red]{text} > {rt['gate']}[/red]" if rt["over_gate"] else text

    row("runtime ratio (gate 0.2)", gate)
    return table


def dry_run_table(result: dict[str, Any]) -> Table:
    """The original next to one run of the method (`unlearn apply --dry-run`)."""
    table = Table(title=f"dry run: {result['method']} (seed {result['seed']}, {result['device']})",
                  title_justify="left")
    table.add_column("")
    for col in ("forget acc", "retain acc", "test acc", "seconds"):
        table.add_column(col, justify="right")
    for name in ("original", "unlearned"):
        r = result[name]
        table.add_row(name, _pct(r["forget"]), _pct(r["retain"]), _pct(r["test"]),
                      _fmt(r["seconds"]))
    return table


def print_reports(reports: Sequence[dict[str, Any]], console: Console) -> None:
    console.print(score_table(reports))
    for rep in reports:
        if "reading" in rep:
            console.print(f"[bold]{rep['method']}[/bold]: {rep['reading']}")
        if rep["num_models"]["retrained"] != rep["num_models"]["unlearned"]:
            console.print(
                f"[yellow]{rep['method']}: banks differ in size; scored the first "
                f"{rep['num_models']['scored']} models of each[/yellow]"
            )


def write_reports(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One report object when one method was scored; otherwise {schema, methods: [...]}."""
    doc = reports[0] if len(reports) == 1 else {"schema": SCHEMA, "methods": list(reports)}
    path = Path(path)
    atomic_write_json(path, _finite(json.loads(json.dumps(doc, default=_jsonable))))
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
