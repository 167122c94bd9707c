"""`unlearn score --html FILE` and `--plots DIR`: one self-contained HTML page, and the figures as
PNG and SVG files.

The page opens offline in any browser: no script, stylesheet, font or image is fetched (the style
is inline, the figures are base64 PNGs in the page, the fonts are the reader's own). It holds the
score table the terminal shows, the reading line per method, the five figures of
`report_figures.py`, the most distinguishable forget examples with their best attack rule, N, the
config and the versions. Every number in its tables is a `<span class="num">` that names the report
key it shows (`data-key`) and the value as `report.json` holds it (`data-value`), so a test (or a
reader) can check the page against the JSON.

Flow (`cli.py`): `check_options` before scoring (a bad path fails fast), `start_drawing` (processes
that import matplotlib while the scores are computed), `score.run(..., keep_confidences=True)`,
`prepare` (adds `top_examples` to each report and takes the confidences out, before the JSON is
written), then `write_all`: `render_figures` once (in those processes), `write_html` /
`write_plots`, and the processes end.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import html
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .errors import UnlearnError
from .report import Num, Row, json_document, table_rows
from .store import Store, atomic_write_bytes, method_dir_name

DEFAULT_TOP_K = 8  # forget examples shown per method in figure 3

# Figure id -> (file name stem, title). Per-method figures get "-<method>" added to the stem.
FIGURES = {
    "forget_quality": ("fig1-forget-quality", "Forget quality and the calibrated ceiling"),
    "epsilon_histogram": ("fig2-epsilon-histogram", "ε per forget example"),
    "top_examples": ("fig3-top-examples", "The most distinguishable forget examples"),
    "forgetting_vs_utility": ("fig4-forgetting-vs-utility", "Forgetting against utility and time"),
    "seed_metrics": ("fig5-seed-metrics", "The seed variant and the simple MIA"),
}


class ReportPathError(UnlearnError):
    """--html or --plots names a path that cannot be written."""


@dataclasses.dataclass
class Pages:
    """What the page and the figures are drawn from."""

    doc: dict[str, Any]  # the JSON document, exactly as `--out` writes it
    reports: list[dict[str, Any]]  # one JSON-ready report per method (inside `doc`)
    examples: dict[str, list[dict[str, Any]]]  # method -> its top examples, for figure 3
    image_note: str  # why the examples have no images ("" when they have)


@dataclasses.dataclass
class Rendered:
    figure: str  # a key of FIGURES
    method: str | None  # None for the figures that show every method
    files: dict[str, bytes]  # "png" / "svg" -> the file
    alt: str  # what the figure shows, in words (the img's alt text)


# --- paths ----------------------------------------------------------------------------------------
def check_options(html_path: Path | None, plots_dir: Path | None,
                  top_k: int = DEFAULT_TOP_K) -> None:
    """Fail before scoring when --html or --plots cannot be written, or --top-k is negative:
    one clear error line."""
    if top_k < 0:
        raise UnlearnError(f"--top-k {top_k}: expected 0 or more examples, e.g. --top-k 8")
    if html_path is not None:
        html_path = Path(html_path)
        if html_path.is_dir():
            raise ReportPathError(f"--html {html_path} is a folder; give a file path such as "
                                  f"{html_path / 'report.html'}")
        _probe(html_path.parent, f"--html {html_path}", "--html report.html")
    if plots_dir is not None:
        _probe(Path(plots_dir), f"--plots {plots_dir}", "--plots plots")


def _probe(folder: Path, what: str, example: str) -> None:
    """Make `folder` if needed and write a temporary file in it; raise one clear line if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ReportPathError(
            f"{what}: cannot write to the folder {folder} ({reason}); give a folder you can "
            f"write to, e.g. {example}"
        ) from None


# --- the data behind the page ---------------------------------------------------------------------
def prepare(reports: list[dict[str, Any]], store_root: str | Path,
            top_k: int = DEFAULT_TOP_K) -> Pages:
    """Pick each method's top-k forget examples by epsilon, find their best attack rules, and
    load their images; add `top_examples` to each report and remove its `confidences`.

    reports: from `score.run(..., keep_confidences=True)`; changed in place.
    """
    check_options(None, None, top_k)
    split = Store(store_root).load_split()
    examples: dict[str, list[dict[str, Any]]] = {}
    wanted: dict[str, list[dict[str, Any]]] = {}
    for rep in reports:
        conf = rep.pop("confidences", None)
        if conf is None or "per_example" not in rep or top_k == 0:
            continue
        eps = np.asarray(rep["per_example"]["epsilon"], dtype=np.float64)
        u, r = conf["unlearned"], conf["retrained"]  # [N, E] each
        # Largest epsilon first. Ties are common (every perfectly separated example sits at the
        # cap 50): among them, the larger gap between the banks' medians, in units of their
        # spread (standard deviations, summed), i.e. the clearer picture.
        gap = np.abs(np.median(u, axis=0) - np.median(r, axis=0)) / (
            u.std(axis=0) + r.std(axis=0) + 1e-12)
        positions = np.lexsort((-gap, -eps))[:top_k]
        rules = metrics.best_rules(u, r, positions, eps)
        tops, shown = [], []
        for pos, rule in zip(positions.tolist(), rules):
            top = {
                "index": int(rep["per_example"]["index"][pos]),
                "position": pos,
                "label": int(split["forget_labels"][pos]),
                "epsilon": float(eps[pos]),
                "score": float(rep["per_example"]["score"][pos]),
                "rule": dict(rule),
            }
            tops.append(top)
            shown.append({**top, "unlearned": u[:, pos], "retrained": r[:, pos], "image": None})
        rep["top_examples"] = tops
        examples[rep["method"]] = shown
        wanted[rep["method"]] = shown
    note = ""
    indices = sorted({e["index"] for shown in wanted.values() for e in shown})
    if indices:
        config = reports[0].get("config", {})
        images, note = forget_images(config, indices)
        if images is not None:
            by_index = dict(zip(indices, images))
            for shown in wanted.values():
                for e in shown:
                    e["image"] = by_index[e["index"]]
    doc = json_document(reports)
    return Pages(doc=doc, reports=doc.get("methods", [doc]), examples=examples, image_note=note)


def forget_images(config: dict[str, Any], indices: Sequence[int]
                  ) -> tuple[list[np.ndarray] | None, str]:
    """The dataset's examples at `indices` as images, or (None, why not).

    Returns float arrays in [0, 1]: `[H, W]` (grey) or `[H, W, 3]` (colour). Digits and CIFAR-10
    are read with numpy alone (no torch import); another dataset is loaded through `data` and
    shown when its examples are shaped like images ([C, H, W] with C = 1 or 3, or [H, W]).
    A dataset that is not on this machine is not an error: the page says why it has no images.
    """
    data_cfg = config.get("data", {}) if isinstance(config, dict) else {}
    name = data_cfg.get("dataset", "digits")
    idx = np.asarray(indices, dtype=np.int64)
    try:
        if name == "digits":
            from .data import _digits_arrays

            pixels, _ = _digits_arrays()  # [1797, 64], counts 0..16 of an 8x8 grid
            return [p.reshape(8, 8) / 16.0 for p in pixels[idx]], ""
        if name == "cifar10":
            from . import cifar

            images, _, _ = cifar.load(data_cfg.get("root", "data"), allow_download=False)
            return [np.transpose(im, (1, 2, 0)) / 255.0 for im in images[idx]], ""  # CHW->HWC
        from .config import from_mapping
        from .data import load_dataset

        x = load_dataset(from_mapping(config).data).x[idx].float().numpy()
    except (UnlearnError, OSError, ValueError, ImportError, IndexError) as exc:
        return None, f"images not shown: the {name} data could not be read here ({exc})"
    if x.ndim == 4 and x.shape[1] in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        return None, f"images not shown: {name} examples are not images (shape {x.shape[1:]})"
    low, high = float(x.min()), float(x.max())
    scale = high - low if high > low else 1.0
    return [(im - low) / scale for im in x], ""


# --- figures -----------------------------------------------------------------------------------
def figure_jobs(pages: Pages) -> list[tuple[str, str | None]]:
    """(figure, method or None) of every figure the reports allow, in page order."""
    reports = pages.reports
    official = [r for r in reports if "per_example" in r]
    jobs: list[tuple[str, str | None]] = []
    if official:
        jobs.append(("forget_quality", None))
    jobs.append(("forgetting_vs_utility", None))
    if any("seed_metric" in r for r in reports):
        jobs.append(("seed_metrics", None))
    jobs += [("epsilon_histogram", r["method"]) for r in official]
    jobs += [("top_examples", r["method"]) for r in official if pages.examples.get(r["method"])]
    return jobs


def _draw(pages: Pages, figure: str, method: str | None, formats: Sequence[str]) -> Rendered:
    """Draw one figure and render it in each format."""
    from . import report_figures as rf  # matplotlib: imported only when figures are asked for

    reports = pages.reports
    rep = next((r for r in reports if r["method"] == method), None)
    if figure == "forget_quality":
        fig = rf.forget_quality([r for r in reports if "per_example" in r])
        alt = ("forget quality F per method with its interval, and at N/2 the method's F beside "
               "the calibrated ceiling, with the share")
    elif figure == "forgetting_vs_utility":
        fig, what = rf.forgetting_vs_utility(reports)
        alt = (f"{what} against the test accuracy ratio, coloured by the runtime ratio; runtime "
               "ratios against the 0.2 gate")
    elif figure == "seed_metrics":
        fig = rf.seed_metrics(reports)
        alt = "official F, seed metric score and simple MIA accuracy per method"
    elif figure == "epsilon_histogram":
        fig = rf.epsilon_histogram(rep)
        alt = f"histogram of the per-example ε of {method} with the bucket edges of H"
    else:
        shown = pages.examples[method]
        fig = rf.top_examples(rep, shown)
        alt = (f"the {len(shown)} forget examples of {method} with the largest ε: both banks' "
               "confidences and the best attack rule")
    return Rendered(figure, method, {f: rf.render(fig, f) for f in formats}, alt)


# --- drawing processes ----------------------------------------------------------------------------
_HELPERS: Any = None  # (the drawing host process, the parent's end of its pipe), or None
_HELPER_COUNT = 0  # drawing processes under the host
# CPU seconds of each figure kind, (first one, each further one): the first builds the layout
# that a `_Refill` then reuses (figure 3's is built by `start_drawing` beforehand). Measured at
# N = 100 on digits (12 methods, 2-core machine under load); only their ratios matter here.
_COST = {"forget_quality": (0.45, 0.45), "forgetting_vs_utility": (0.45, 0.45),
         "seed_metrics": (0.35, 0.35), "epsilon_histogram": (0.12, 0.04),
         "top_examples": (0.2, 0.17)}
DRAW_TIMEOUT = 600  # seconds: a drawing process that takes longer is stuck


def start_drawing(top_k: int = DEFAULT_TOP_K, workers: int | None = None) -> None:
    """Start the processes that will draw the figures, before scoring (`unlearn score --html`).

    One host process imports matplotlib (about a second) and builds figure 3's layout for
    `top_k` examples (`report_figures.warm_up`) while this process scores, on a core that
    scoring leaves mostly idle; it then forks `workers` drawing processes, which inherit all of
    that (one import, one layout, however many draw), and `render_figures` hands them the
    figures through it. This process never imports matplotlib. Forked (Linux); elsewhere nothing
    is started and `render_figures` draws here.
    workers: drawing processes (default: one per core, at most 2, the machine this was measured
    on; see `_batches` for how they share the figures).
    """
    global _HELPERS, _HELPER_COUNT
    import multiprocessing

    if _HELPERS is not None or "fork" not in multiprocessing.get_all_start_methods():
        return
    if workers is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else (os.cpu_count() or 1))
        workers = min(cores, 2)
    _HELPER_COUNT = max(1, workers)
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    # Not a daemon: a daemon may not start the drawing processes. `stop_drawing` ends it, at
    # the latest when this process exits (atexit).
    host = context.Process(target=_host, args=(theirs, top_k, _HELPER_COUNT),
                           name="unlearn-figures", daemon=False)
    host.start()
    theirs.close()
    _HELPERS = (host, ours)
    atexit.unregister(stop_drawing)  # once, however often a process starts them
    atexit.register(stop_drawing)


def stop_drawing() -> None:
    """End the drawing processes (idle by then); a later `start_drawing` starts new ones."""
    global _HELPERS
    if _HELPERS is None:
        return
    host, conn = _HELPERS
    _HELPERS = None
    try:
        conn.send(None)  # the host ends its drawing processes, then itself
    except OSError:  # it is gone already
        pass
    host.join(timeout=10)
    if host.is_alive():  # pragma: no cover - a host stuck past its drawing
        host.terminate()  # its drawing processes end when their pipe closes
        host.join(timeout=10)
    conn.close()


def _host(conn: Any, top_k: int, workers: int) -> None:
    """The drawing host (`start_drawing`): warm up, fork the drawing processes, then for each
    request (pages, formats, batches) from the pipe send back the drawn batches or the error."""
    import multiprocessing

    _warm_up(top_k)
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:  # the parent is gone
                return
            if request is None:
                return
            pages, formats, batches = request
            try:
                pending = [pool.apply_async(_draw_batch, (pages, formats, batch))
                           for batch in batches]
                reply: Any = [p.get(timeout=DRAW_TIMEOUT) for p in pending]
            except Exception as exc:  # noqa: BLE001 - raised again in the parent
                reply = exc
            conn.send(reply)
    finally:
        pool.terminate()
        pool.join()


def _warm_up(top_k: int) -> None:
    """The drawing host's start. A problem (matplotlib missing) must not end it here: it shows
    when the first figure is drawn, and reaches `render_figures` as that job's error."""
    try:
        from . import report_figures

        report_figures.warm_up(top_k)
    except Exception:  # noqa: BLE001 - reported by the first drawing job instead
        pass


def _batches(jobs: list[tuple[str, str | None]], count: int) -> list[list[tuple[str, str | None]]]:
    """Share the jobs among `count` processes by estimated cost (`_COST`): longest piece first,
    each to the least loaded process. A per-method kind is one piece or is cut into up to
    `count` pieces, whichever finishes soonest: a cut costs a second layout."""
    kinds: dict[str, list[tuple[str, str | None]]] = {}
    for job in jobs:
        kinds.setdefault(job[0], []).append(job)

    def cost(piece: list[tuple[str, str | None]]) -> float:
        first, more = _COST.get(piece[0][0], (0.45, 0.45))
        return first + more * (len(piece) - 1)

    def share(cuts: Sequence[int]) -> tuple[float, list[list[tuple[str, str | None]]]]:
        pieces = []
        for piece, parts in zip(kinds.values(), cuts):
            size = -(-len(piece) // parts)
            pieces += [piece[i:i + size] for i in range(0, len(piece), size)]
        loads: list[tuple[float, list]] = [(0.0, []) for _ in range(count)]
        for piece in sorted(pieces, key=cost, reverse=True):
            at = min(range(count), key=lambda i: loads[i][0])
            loads[at] = (loads[at][0] + cost(piece), loads[at][1] + piece)
        return max(load for load, _ in loads), [batch for _, batch in loads if batch]

    options = [[]]
    for piece in kinds.values():
        options = [[*o, parts] for o in options for parts in range(1, min(count, len(piece)) + 1)]
    return min((share(cuts) for cuts in options), key=lambda option: option[0])[1]


def _draw_batch(pages: Pages, formats: tuple[str, ...], jobs: list[tuple[str, str | None]]
                ) -> list[Rendered]:
    return [_draw(pages, figure, method, formats) for figure, method in jobs]


def render_figures(pages: Pages, formats: Sequence[str] = ("png",)) -> list[Rendered]:
    """Draw every figure the reports allow, each once, in each format ("png", "svg"), in page
    order: in the processes `start_drawing` started, else here one after another."""
    jobs = figure_jobs(pages)
    if _HELPERS is None or not jobs:
        return _draw_batch(pages, tuple(formats), jobs)
    host, conn = _HELPERS
    conn.send((pages, tuple(formats), _batches(jobs, _HELPER_COUNT)))
    if not conn.poll(DRAW_TIMEOUT + 30):
        raise TimeoutError(f"the figures were not drawn within {DRAW_TIMEOUT} s")
    reply = conn.recv()
    if isinstance(reply, Exception):
        raise reply
    drawn = {(r.figure, r.method): r for batch in reply for r in batch}
    return [drawn[job] for job in jobs]


def plot_name(rendered: Rendered, fmt: str, taken: set[str]) -> str:
    """File name of a figure: its stem, then the method (as a safe file name), then the format."""
    stem = FIGURES[rendered.figure][0]
    if rendered.method is not None:
        stem += "-" + method_dir_name(rendered.method)
    name, extra = f"{stem}.{fmt}", 2
    while name in taken:  # two methods whose safe names coincide
        name, extra = f"{stem}-{extra}.{fmt}", extra + 1
    taken.add(name)
    return name


def write_plots(rendered: Sequence[Rendered], folder: str | Path) -> list[Path]:
    """Write every figure in every format it was rendered in; returns the paths."""
    folder = Path(folder)
    paths, taken = [], set()
    for fig in rendered:
        for fmt, data in fig.files.items():
            path = folder / plot_name(fig, fmt, taken)
            try:
                atomic_write_bytes(path, data)
            except OSError as exc:
                raise ReportPathError(f"--plots {folder}: cannot write {path.name} "
                                      f"({exc.strerror or exc}); give a folder you can write "
                                      "to, e.g. --plots plots") from None
            paths.append(path)
    return paths


# --- the page ----------------------------------------------------------------------------------
CSS = """
:root { color-scheme: light; --fg: #1d1d1f; --muted: #5b5b60; --rule: #d8d8dc; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
  Arial, sans-serif; color: var(--fg); background: #fff; }
main { max-width: 60rem; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 .6rem; border-bottom: 1px solid var(--rule);
  padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p, li { max-width: 48rem; }
.meta, figcaption, .note { color: var(--muted); font-size: .9rem; }
nav ol { columns: 2; font-size: .92rem; }
a { color: #2255aa; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .88rem; margin: .4rem 0 1rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid var(--rule); text-align: right;
  white-space: nowrap; vertical-align: top; }
th:first-child, th[scope="row"] { text-align: left; }
thead th { border-bottom: 2px solid var(--fg); }
tbody th { font-weight: 600; }
td.text { text-align: left; white-space: normal; }
.alarm { color: var(--bad); font-weight: 600; }
.num { font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 1.6rem; break-inside: avoid; page-break-inside: avoid; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f8; padding: .6rem .8rem; overflow-x: auto; font-size: .8rem; }
.reading { font-size: 1rem; border-left: 3px solid #4477AA; padding: .2rem .7rem; }
@media print {
  body { font-size: 10.5pt; }
  main { max-width: none; padding: 0; }
  nav { display: none; }
  section.method { break-before: page; page-break-before: always; }
  a { color: inherit; text-decoration: none; }
  pre { white-space: pre-wrap; }
  th, td { white-space: normal; }
}
@page { margin: 14mm; }
"""

HOW_TO_READ = """
<ul>
<li><b>ε per forget example.</b> For each forget example, every model of both banks (N unlearned
runs, N models retrained without the forget set) gives one number, the logit-scaled confidence of
the true class, c = log p<sub>y</sub> &minus; log(1 &minus; p<sub>y</sub>). About 160,000 threshold
and interval rules on c try to tell the banks apart; ε is the best rule's privacy loss
(δ = 10<sup>&minus;5</sup>), 0 when they cannot, capped at 50.</li>
<li><b>F</b> is the mean over forget examples of H = 2<sup>&minus;k</sup> for ε in bucket k
(width 0.5); past the last bucket, ceil(ln(N &minus; 1)), an example is worth 0.</li>
<li><b>The ceiling.</b> Even retraining from scratch does not score 1: with many rules some sampling
noise always looks like a difference. The ceiling is the F that half of the reference models score
against the other half, at N/2. The method is scored at N/2 against the same halves, and
<b>share</b> is its F over the ceiling: 1 means as good as retraining. The reading line says it in
words.</li>
<li><b>F depends on N</b> (the number of buckets grows with ln N, the threshold grid is fixed in
units of c), so compare F only between runs with equal N; the share is the comparable number.</li>
<li><b>The interval</b> is a bootstrap over the models of each bank (not over forget examples).</li>
<li><b>Final score</b> = F &times; retain accuracy ratio &times; test accuracy ratio (unlearned over
retrained), as the challenge computed it. The challenge rejected methods whose runtime ratio
(seconds per unlearning run over seconds per retrained model) exceeds 0.2: those are marked
red.</li>
</ul>
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num_span(num: Num, report: dict[str, Any]) -> str:
    value = num.lookup(report)
    key = ".".join(str(k) for k in num.key)
    return (f'<span class="num" data-method="{_esc(report["method"])}" data-key="{_esc(key)}" '
            f'data-value="{_esc(json.dumps(value))}">{_esc(num.text(report))}</span>')


def _cell_html(row: Row, report: dict[str, Any]) -> str:
    try:
        parts = row.cell(report)
        inner = "".join(_num_span(p, report) if isinstance(p, Num) else _esc(p) for p in parts)
    except (KeyError, TypeError, IndexError):
        return "<td>-</td>"
    alarm = row.alarm is not None and row.alarm(report)
    return f'<td class="alarm">{inner}</td>' if alarm else f"<td>{inner}</td>"


def _score_table(reports: Sequence[dict[str, Any]]) -> str:
    head = "".join(f'<th scope="col">{_esc(r["method"])}</th>' for r in reports)
    body = []
    for row in table_rows(reports):
        cells = "".join(_cell_html(row, r) for r in reports)
        body.append(f'<tr><th scope="row">{_esc(row.label)}</th>{cells}</tr>')
    return (f'<div class="tablewrap"><table class="numbers" id="score-table"><thead><tr><th></th>'
            f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _top_table(report: dict[str, Any]) -> str:
    rows = []
    for i, top in enumerate(report.get("top_examples", [])):
        def num(*key: str | int, style: str = "raw", i: int = i) -> str:
            return _num_span(Num(("top_examples", i, *key), style), report)

        rule = top["rule"]
        t = rule["thresholds"]
        if rule["kind"] == "threshold":
            where = f"c &ge; {num('rule', 'thresholds', 0, style='f3')}"
        elif rule["kind"] == "interval":
            where = (f"{num('rule', 'thresholds', 0, style='f3')} &le; c &le; "
                     f"{num('rule', 'thresholds', 1, style='f3')}")
        else:
            where = "-"
        rates = "-"
        if t:
            rates = (f"{num('rule', 'true_positive_rate', style='pct')} / "
                     f"{num('rule', 'false_positive_rate', style='pct')}")
        rows.append(
            f'<tr><th scope="row">{i + 1}</th><td>{num("index")}</td><td>{num("label")}</td>'
            f"<td>{num('epsilon', style='f3')}</td><td>{num('score')}</td>"
            f'<td class="text">{_esc(rule["kind"])}</td><td>{where}</td>'
            f'<td class="text">{_esc(rule["flags"] or "-")}</td><td>{rates}</td></tr>'
        )
    if not rows:
        return ""
    return ('<div class="tablewrap"><table class="numbers top-examples"><thead><tr><th>rank</th>'
            "<th>dataset index</th><th>label</th><th>ε</th><th>H</th><th>best rule</th>"
            "<th>flags models when</th><th>as</th><th>flagged: of that bank / of the other</th>"
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height in pixels, from the PNG's IHDR chunk."""
    return struct.unpack(">II", data[16:24])


def _figure_html(fig: Rendered, number: int) -> str:
    png = fig.files["png"]
    width, height = _png_size(png)
    title = FIGURES[fig.figure][1] + (f": {fig.method}" if fig.method else "")
    ident = f"fig-{fig.figure}" + (f"-{method_dir_name(fig.method)}" if fig.method else "")
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure id="{_esc(ident)}"><img src="{src}" width="{width}" height="{height}" '
            f'alt="{_esc(fig.alt)}"><figcaption>Figure {number}. {_esc(title)}.'
            "</figcaption></figure>")


def _provenance(pages: Pages) -> str:
    rep = pages.reports[0]
    versions = rep.get("versions", {})
    rows = []
    for group in ("scored_with", "store"):
        for name in versions.get(group) or {}:
            rows.append(f'<tr><th scope="row">{_esc(group.replace("_", " "))}</th>'
                        f'<td class="text">{_esc(name)}</td><td class="text">'
                        f'{_num_span(Num(("versions", group, name), "raw"), rep)}</td></tr>')
    config = json.dumps(rep.get("config", {}), indent=2)
    return (f'<h3>Config</h3><pre id="config">{_esc(config)}</pre>'
            '<h3>Versions</h3><div class="tablewrap"><table class="provenance"><thead><tr>'
            f'<th>of</th><th>package</th><th>version</th></tr></thead><tbody>{"".join(rows)}'
            "</tbody></table></div>")


def page(pages: Pages, rendered: Sequence[Rendered]) -> str:
    """The whole HTML page, as text."""
    reports = pages.reports
    first = reports[0]
    by_key = {(f.figure, f.method): f for f in rendered}
    counter = iter(range(1, len(rendered) + 1))
    names = ", ".join(r["method"] for r in reports)
    n = sorted({r["num_models"]["scored"] for r in reports})
    meta = (f"store {_esc(first.get('store', '?'))} &middot; metric {_esc(first.get('metric'))}"
            f" &middot; N = {_esc(', '.join(map(str, n)))} models per bank &middot; "
            f"{_esc(first.get('num_forget_examples'))} forget examples &middot; "
            f"scored {_esc(first.get('created', ''))}")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>unlearn score: {_esc(names)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>unlearn score: {_esc(names)}</h1><p class=\"meta\">{meta}</p></header>",
        '<nav><ol><li><a href="#how-to-read">How to read this</a></li>'
        '<li><a href="#scores">Scores</a></li><li><a href="#figures">Methods side by side</a>'
        "</li>"
        + "".join(f'<li><a href="#m-{_esc(method_dir_name(r["method"]))}">{_esc(r["method"])}'
                  "</a></li>" for r in reports)
        + '<li><a href="#provenance">Config and versions</a></li></ol></nav>',
        f'<section id="how-to-read"><h2>How to read this</h2>{HOW_TO_READ}</section>',
        '<section id="scores"><h2>Scores</h2>', _score_table(reports),
    ]
    for r in reports:
        if r.get("reading"):
            parts.append(f'<p class="reading"><b>{_esc(r["method"])}</b>: '
                         f'{_esc(r["reading"])}</p>')
        nm = r["num_models"]
        if nm["retrained"] != nm["unlearned"]:
            parts.append(f'<p class="note">{_esc(r["method"])}: banks differ in size '
                         f'({nm["retrained"]} reference models, {nm["unlearned"]} runs); the '
                         f'first {nm["scored"]} of each were scored.</p>')
    parts.append('</section><section id="figures"><h2>Methods side by side</h2>')
    for figure in ("forget_quality", "forgetting_vs_utility", "seed_metrics"):
        if (figure, None) in by_key:
            parts.append(_figure_html(by_key[figure, None], next(counter)))
    parts.append("</section>")
    for r in reports:
        method = r["method"]
        parts.append(f'<section class="method" id="m-{_esc(method_dir_name(method))}">'
                     f"<h2>{_esc(method)}</h2>")
        if r.get("reading"):
            parts.append(f'<p class="reading">{_esc(r["reading"])}</p>')
        if ("epsilon_histogram", method) in by_key:
            parts.append(_figure_html(by_key["epsilon_histogram", method], next(counter)))
        if r.get("top_examples"):
            parts.append(f"<h3>The {len(r['top_examples'])} forget examples with the largest ε"
                         "</h3>" + _top_table(r))
            if pages.image_note:
                parts.append(f'<p class="note">{_esc(pages.image_note)}</p>')
        if ("top_examples", method) in by_key:
            parts.append(_figure_html(by_key["top_examples", method], next(counter)))
        record = r.get("method_record")
        if record:
            parts.append(f"<h3>Method record</h3><pre>{_esc(json.dumps(record, indent=2))}</pre>")
        parts.append("</section>")
    parts.append(f'<section id="provenance"><h2>Config and versions</h2>{_provenance(pages)}'
                 "</section></main></body></html>")
    return "\n".join(parts) + "\n"


def write_html(pages: Pages, rendered: Sequence[Rendered], path: str | Path) -> Path:
    """Write the page to `path` atomically."""
    path = Path(path)
    try:
        atomic_write_bytes(path, page(pages, rendered).encode("utf-8"))
    except OSError as exc:
        raise ReportPathError(f"--html {path}: cannot write it ({exc.strerror or exc}); give a "
                              "path you can write to, e.g. --html report.html") from None
    return path


def write_all(pages: Pages, *, html: Path | None, plots: Path | None, console: Any) -> None:
    """Render the figures once and write the page and/or the plot files (`unlearn score`)."""
    try:
        rendered = render_figures(pages, ("png", "svg") if plots is not None else ("png",))
    finally:
        stop_drawing()
    if html is not None:
        write_html(pages, rendered, html)
        console.print(f"HTML report written to {html} (open it in a browser; it works offline)")
    if plots is not None:
        paths = write_plots(rendered, plots)
        console.print(f"{len(paths)} figure files written to {plots}")
