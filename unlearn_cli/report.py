"""Render reports: rich tables in the terminal, JSON on disk.

The HTML page and the figures live in `report_html.py` and `report_figures.py`; the table rows
defined here (`table_rows`) are shared by the terminal and the page, so both show the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape
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


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{100 * value:.1f}%"


class Num(NamedTuple):
    """One number of a table cell: where it lives in the report, and how it is shown."""

    key: tuple[str | int, ...]  # path into one method's report, e.g. ("ceiling", "share")
    style: str  # "f2", "f3", "f4" (fixed digits), "pct" (a share as a percentage), "raw"

    def lookup(self, report: dict[str, Any]) -> Any:
        value: Any = report
        for part in self.key:
            value = value[part]
        return value

    def text(self, report: dict[str, Any]) -> str:
        value = self.lookup(report)
        if self.style == "pct":
            return _pct(value)
        if self.style.startswith("f"):
            return _fmt(value, int(self.style[1:]))
        return _fmt(value)


Cell = list  # the parts of a cell: str (shown as is) and Num, in order


class Row(NamedTuple):
    label: str
    cell: Callable[[dict[str, Any]], Cell]  # a method's report -> its cell (KeyError: "-")
    alarm: Callable[[dict[str, Any]], bool] | None = None  # shown red when true


def _nmodels(r: dict[str, Any]) -> Cell:
    nm = r["num_models"]
    if nm["retrained"] == nm["unlearned"]:
        return [Num(("num_models", "scored"), "raw")]
    return [Num(("num_models", "scored"), "raw"), " (of ", Num(("num_models", "retrained"), "raw"),
            "/", Num(("num_models", "unlearned"), "raw"), ")"]


def _pair(a: tuple, b: tuple, style: str) -> Callable[[dict[str, Any]], Cell]:
    return lambda r: [Num(a, style), " / ", Num(b, style)]


def _gate(r: dict[str, Any]) -> Cell:
    cell: Cell = [Num(("runtime", "ratio"), "f3")]
    if r["runtime"]["over_gate"]:
        cell += [" > ", Num(("runtime", "gate"), "raw")]
    return cell


def table_rows(reports: Sequence[dict[str, Any]]) -> list[Row]:
    """The rows of the score table: the terminal and the HTML page show the same ones."""
    rows = [Row("N models per bank", _nmodels),
            Row("forget examples", lambda r: [Num(("num_forget_examples",), "raw")])]
    if any("forget_quality" in r for r in reports):
        rows += [
            Row("forget quality F", lambda r: [Num(("forget_quality",), "f4")]),
            Row("F 95% interval", lambda r: ["[", Num(("forget_quality_interval", 0), "f4"),
                                             ", ", Num(("forget_quality_interval", 1), "f4"), "]"]),
            # Same N on both sides of the slash: comparable.
            Row("F at N/2 / ceiling at N/2", _pair(("ceiling", "method_forget_quality"),
                                                   ("ceiling", "forget_quality"), "f4")),
            Row("share of the ceiling", lambda r: [Num(("ceiling", "share"), "f2")]),
            Row("final score", lambda r: [Num(("final_score",), "f4")]),
            Row("final score, ratios capped at 1", lambda r: [Num(("final_score_clipped",), "f4")]),
        ]
    for key, name in (("seed_metric", "seed"), ("seed_converged", "seed-converged")):
        if any(key in r for r in reports):
            rows += [
                Row(f"{name} metric score", lambda r, k=key: [Num((k, "score"), "f4")]),
                Row(f"{name}: dropped / above 1", _pair((key, "dropped"), (key, "above_one"),
                                                        "raw")),
                Row(f"{name} attack accuracy",
                    lambda r, k=key: [Num((k, "attack_accuracy"), "pct")]),
            ]
    if any("seed_metric" in r or "seed_converged" in r for r in reports):
        rows.append(Row("simple MIA accuracy", lambda r: [Num(
            ("seed_metric" if "seed_metric" in r else "seed_converged", "simple_mia_accuracy"),
            "pct")]))
    if any("lira" in r for r in reports):
        rows += [
            Row("LiRA held-out accuracy (0.5 ideal)",
                lambda r: [Num(("lira", "balanced_accuracy"), "f3")]),
            Row("LiRA TPR at 1% / 5% FPR", _pair(("lira", "tpr_at_1pct_fpr"),
                                                  ("lira", "tpr_at_5pct_fpr"), "f3")),
            Row("LiRA examples beating chance",
                lambda r: [Num(("lira", "share_beating_chance"), "pct"), " (~",
                           Num(("lira", "alpha"), "pct"), " by chance)"]),
        ]
    if any("klom" in r for r in reports):
        for part in ("forget", "test"):
            rows.append(Row(f"KLOM {part} p95 / mean (0 ideal)",
                            _pair(("klom", part, "p95"), ("klom", part, "mean"), "f3")))
    pairs = [("retain_accuracy", "retain acc"), ("test_accuracy", "test acc"),
             ("forget_accuracy", "forget acc")]
    if any("test_accuracy_forgotten_classes" in r["utility"] for r in reports):
        pairs += [("test_accuracy_remaining_classes", "test acc, remaining classes"),
                  ("test_accuracy_forgotten_classes", "test acc, forgotten classes")]
    for key, label in pairs:
        rows.append(Row(f"{label} unlearned / retrained",
                        _pair(("utility", key, "unlearned"), ("utility", key, "retrained"), "pct")))
    rows.append(Row("s per model unlearn / retrain",
                    _pair(("runtime", "seconds_per_model", "unlearned"),
                          ("runtime", "seconds_per_model", "retrained"), "f3")))
    rows.append(Row("runtime ratio (gate 0.2)", _gate, lambda r: r["runtime"]["over_gate"]))
    return rows


def cell_text(row: Row, report: dict[str, Any]) -> str:
    """A cell as plain text; "-" where the report lacks a value."""
    try:
        return "".join(p.text(report) if isinstance(p, Num) else p for p in row.cell(report))
    except (KeyError, TypeError, IndexError):
        return "-"


def score_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One column per method, one row per quantity, so that methods read side by side."""
    table = Table(title="unlearn score", show_lines=False, title_justify="left")
    table.add_column("", style="bold")
    for rep in reports:
        table.add_column(escape(rep["method"]), justify="right")  # a plugin path is not markup
    for row in table_rows(reports):
        cells = []
        for rep in reports:
            text = cell_text(row, rep)
            if row.alarm is not None and text != "-" and row.alarm(rep):
                text = f"[red]{text}[/red]"
            cells.append(text)
        table.add_row(row.label, *cells)
    return table


def dry_run_table(result: dict[str, Any]) -> Table:
    """The original next to one run of the method (`unlearn apply --dry-run`)."""
    table = Table(title=escape(f"dry run: {result['method']} (seed {result['seed']}, "
                               f"{result['device']})"),
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
            console.print(f"[bold]{escape(rep['method'])}[/bold]: {escape(rep['reading'])}")
        if rep["num_models"]["retrained"] != rep["num_models"]["unlearned"]:
            console.print(
                f"[yellow]{escape(rep['method'])}: banks differ in size; scored the first "
                f"{rep['num_models']['scored']} models of each[/yellow]"
            )


def json_document(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What `--out` writes: one report object when one method was scored, otherwise
    {schema, methods: [...]}; numpy values as plain numbers, NaN and infinities as null."""
    doc = reports[0] if len(reports) == 1 else {"schema": SCHEMA, "methods": list(reports)}
    return _finite(json.loads(json.dumps(doc, default=_jsonable)))


def write_reports(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `json_document(reports)` to `path` (atomically)."""
    path = Path(path)
    atomic_write_json(path, json_document(reports))
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
