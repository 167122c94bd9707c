"""The report's figures, drawn with matplotlib's Agg backend (no display, no pyplot state).

Imported only when `unlearn score --html` or `--plots` asks for figures, since matplotlib takes
about a second to import. Every function takes JSON-ready reports (`report.json_document`) plus,
for the per-example figure, the examples `report_html.prepare` picked, and returns a
`matplotlib.figure.Figure`; `render` turns one into PNG or SVG bytes. Figures 2 and 3 keep one
layout per shape and are refilled for each method; their PNGs draw only the changing artists over
a saved background (`_Refill`), since most of matplotlib's cost is in axes, ticks and text that
stay the same from one method to the next.

Colours: Paul Tol's colour-blind-safe pair, blue for the reference (retrained) bank, red for the
unlearned bank; grey for the calibrated ceiling.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import TICKDOWN, TICKLEFT, Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory, offset_copy

RETRAINED, UNLEARNED, CEILING, ALARM = "#4477AA", "#EE6677", "#BBBBBB", "#CC3311"
PNG_DPI = 110  # 8.5 in wide figures -> ~940 px: sharp on a laptop, fine on paper
STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "unlearn",  # stable element ids: the same report gives the same SVG
    "svg.fonttype": "path",  # text as outlines: the SVG needs no font
    # Unhinted glyphs, as matplotlib's own test images: text is most of a figure's drawing time
    # and FreeType's autohinter made each glyph ~1.5x dearer (measured: 0.19 against 0.13 ms per
    # glyph at 6.5 pt, 110 dpi). SVG text (outlines) is unaffected.
    "text.hinting": "none",
}


def _styled(fn):
    """Draw under the report's style without changing the caller's matplotlib settings."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper

TOP_COLUMNS = 4  # examples per row of the top-k figure


def _png(canvas: FigureCanvasAgg) -> bytes:
    """What the canvas holds now, as PNG bytes: RGB (the page is white), zlib level 3 (measured
    on figure 3: about half the time of matplotlib's level 6 for a file ~2% larger)."""
    from PIL import Image  # a matplotlib dependency

    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw",
                             "RGBA", 0, 1).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="png", compress_level=3, dpi=(PNG_DPI, PNG_DPI))
    return buf.getvalue()


class _Refill:
    """Blitting for a figure that is drawn once per method with the same layout: the artists that
    change (`changing`, marked animated, which a screen draw skips) are drawn over a saved copy of
    everything else. Axes, spines, legends and fixed labels are then drawn once per report instead
    of once per method (measured: several times faster per method than a full draw).
    `savefig` (SVG, --plots) still draws every artist: it ignores the animated mark."""

    def __init__(self, fig: Figure, changing: Sequence[Any]):
        self.canvas = FigureCanvasAgg(fig)
        self.changing = sorted(changing, key=lambda a: a.get_zorder())
        for artist in self.changing:
            artist.set_animated(True)
        self.background = None

    def swap(self, old: Any | None, new: Any | None) -> None:
        """`new` (an artist made for this method, e.g. an image) replaces `old` among the
        changing artists. The background is drawn again: a new image can reshape its axes."""
        self.background = None
        if old is not None:
            self.changing.remove(old)
        if new is not None:
            new.set_animated(True)
            self.changing.append(new)
            self.changing.sort(key=lambda a: a.get_zorder())

    @contextlib.contextmanager
    def drawing_all(self):
        """Within: every artist is drawn by a full draw or `savefig` (the figure's suptitle,
        too, which a Figure skips while animated even when saving)."""
        for artist in self.changing:
            artist.set_animated(False)
        try:
            yield
        finally:
            for artist in self.changing:
                artist.set_animated(True)

    def png(self) -> bytes:
        if self.background is None:
            self.canvas.draw()  # everything but the changing artists
            self.background = self.canvas.copy_from_bbox(self.canvas.figure.bbox)
        else:
            self.canvas.restore_region(self.background)
        renderer = self.canvas.get_renderer()
        for artist in self.changing:
            artist.draw(renderer)  # draws nothing when invisible
        return _png(self.canvas)


_REFILLS: weakref.WeakKeyDictionary[Figure, _Refill] = weakref.WeakKeyDictionary()
MAX_TICKS = 7  # tick labels per `_Ticks` at most (MaxNLocator(5) gives up to 7 in range)


class _Ticks:
    """Tick marks and labels along the bottom (x) or left (y) of an axes whose limits change
    from one method to the next: one marker line and a few texts, refilled by `update`. A
    matplotlib Axis does the same, but redrawing one cost ~6x more here (placing its label measures
    every tick label of the figure)."""

    def __init__(self, ax, which: str, nbins: int, *, integer: bool = False,
                 fontsize: float = 7):
        # The steps of matplotlib's default AutoLocator: ticks at 1, 2, 2.5 or 5 x 10^k.
        self.which = which
        self.locator = MaxNLocator(nbins, steps=[1, 2, 2.5, 5, 10], integer=integer)
        fig = ax.get_figure()
        if which == "x":
            ax.set_xticks([])
            along = ax.get_xaxis_transform()  # x in data, y in axes units
            at = offset_copy(along, fig, y=-5.5, units="points")
            marker, align = TICKDOWN, {"ha": "center", "va": "top"}
        else:
            ax.set_yticks([])
            along = ax.get_yaxis_transform()  # x in axes units, y in data
            at = offset_copy(along, fig, x=-5.5, units="points")
            marker, align = TICKLEFT, {"ha": "right", "va": "center"}
        self.marks = ax.add_line(Line2D([], [], transform=along, marker=marker, ls="",
                                        color="black", ms=3.5, mew=0.8, clip_on=False))
        self.labels = [ax.text(0, 0, "", transform=at, fontsize=fontsize, clip_on=False, **align)
                       for _ in range(MAX_TICKS)]

    def artists(self) -> list[Any]:
        return [self.marks, *self.labels]

    def update(self, lo: float, hi: float) -> None:
        """Tick the range [lo, hi] (the axes' new limits) as an Axis with this locator would."""
        ticks = [t for t in self.locator.tick_values(lo, hi) if lo <= t <= hi][:MAX_TICKS]
        zeros = np.zeros(len(ticks))
        self.marks.set_data((ticks, zeros) if self.which == "x" else (zeros, ticks))
        for label, t in zip(self.labels, [*ticks, *[None] * MAX_TICKS]):
            label.set_visible(t is not None)
            if t is not None:
                label.set_position((t, 0) if self.which == "x" else (0, t))
                label.set_text(f"{round(t, 9):g}".replace("-", "\N{MINUS SIGN}"))


@_styled
def render(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes (no date in the metadata, so reruns give equal files).
    A per-method figure's PNG draws only what changed since the last method (`_Refill`)."""
    refill = _REFILLS.get(fig)
    if fmt == "png":
        if refill is not None:
            return refill.png()
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        return _png(canvas)
    buf = io.BytesIO()
    if not isinstance(fig.canvas, FigureCanvasAgg):  # keep a `_Refill`'s canvas
        FigureCanvasAgg(fig)
    with refill.drawing_all() if refill is not None else contextlib.nullcontext():
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata={"Date": None})
    return buf.getvalue()


@_styled
def warm_up(top_k: int = 0) -> None:
    """Load what a first figure loads (the font, the Agg renderer, the PNG writer), and with
    top_k > 0 build figure 3's layout for k examples with 8x8 images and draw its background,
    so that a drawing process started before scoring has them ready
    (`report_html.start_drawing`). A guess that does not fit (no images, another image shape)
    costs a layout or a background later, as without it."""
    fig = Figure(figsize=(1.5, 1), dpi=PNG_DPI)
    ax = fig.add_subplot()
    ax.set_title("ε ≥ 0.5 → U", fontsize=7)
    ax.text(0.5, 0.5, "1/2", fontsize=7)
    render(fig, "png")
    if top_k > 0:
        none = {"kind": "none", "thresholds": [], "flags": "", "epsilon": 0.0,
                "true_positive_rate": math.nan, "false_positive_rate": math.nan}
        examples = [{"index": 0, "label": 0, "epsilon": 0.0, "score": 1.0, "rule": none,
                     "unlearned": np.zeros(2), "retrained": np.ones(2),
                     "image": np.zeros((8, 8))} for _ in range(top_k)]
        render(top_examples({"method": ""}, examples), "png")


@_styled
def full_png(fig: Figure) -> bytes:
    """The figure as PNG bytes from a full draw, never blitted (to check `render` against)."""
    refill = _REFILLS.get(fig)
    canvas = FigureCanvasAgg(fig) if refill is None else refill.canvas
    with refill.drawing_all() if refill is not None else contextlib.nullcontext():
        canvas.draw()
    png = _png(canvas)
    if refill is not None:
        refill.background = None  # the canvas now holds every artist: redraw the background
    return png


def _value(report: dict[str, Any], *keys: str | int) -> float:
    """A number of the report, NaN where it is missing or null."""
    value: Any = report
    try:
        for key in keys:
            value = value[key]
    except (KeyError, IndexError, TypeError):
        return math.nan
    return math.nan if value is None else float(value)


def _methods_axis(ax, names: Sequence[str]) -> np.ndarray:
    y = np.arange(len(names))[::-1]  # first method on top
    ax.set_yticks(y, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    return y


# --- (1) forget quality with its interval, beside the calibrated ceiling -------------------------
@_styled
def forget_quality(reports: Sequence[dict[str, Any]]) -> Figure:
    """Left: F at N per method with its bootstrap interval. Right: at N/2 against the same
    reference halves, the method's F on the ceiling's grey bar, and its share of the ceiling."""
    names = [r["method"] for r in reports]
    fig = Figure(figsize=(8.5, 1.3 + 0.32 * len(names)), dpi=PNG_DPI)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.5 / fig.get_figheight() + 0.05,
                        top=1 - 0.65 / fig.get_figheight(), wspace=0.45)
    ax_f, ax_c = fig.subplots(1, 2)
    y = _methods_axis(ax_f, names)
    f = np.array([_value(r, "forget_quality") for r in reports])
    lo = np.array([_value(r, "forget_quality_interval", 0) for r in reports])
    hi = np.array([_value(r, "forget_quality_interval", 1) for r in reports])
    has = np.isfinite(lo) & np.isfinite(hi)
    err = np.vstack([np.where(has, f - lo, 0), np.where(has, hi - f, 0)])
    ax_f.errorbar(f, y, xerr=err, fmt="o", color=UNLEARNED, ecolor="#444444", capsize=3, ms=5)
    n = sorted({r["num_models"]["scored"] for r in reports})
    ax_f.set_title(f"forget quality F at N = {', '.join(map(str, n))}"
                   + ("\nwith its 95% bootstrap interval" if has.any() else ""), loc="left")
    ax_f.set_xlabel("F (higher = forgets better)")
    top = np.nanmax(np.concatenate([f, hi, [0.05]]))
    ax_f.set_xlim(0, top * 1.15)

    _methods_axis(ax_c, names)
    ceiling = np.array([_value(r, "ceiling", "forget_quality") for r in reports])
    method_half = np.array([_value(r, "ceiling", "method_forget_quality") for r in reports])
    ax_c.barh(y, np.nan_to_num(ceiling), height=0.7, color=CEILING)
    ax_c.barh(y, np.nan_to_num(method_half), height=0.35, color=UNLEARNED)
    right = np.nanmax(np.concatenate([ceiling, method_half, [0.05]]))
    for yi, r, c, m in zip(y, reports, ceiling, method_half):
        share = _value(r, "ceiling", "share")
        text = f"share {share:.2f}" if math.isfinite(share) else "no ceiling (N < 6)"
        ax_c.text(max(np.nan_to_num(c), np.nan_to_num(m)) + right * 0.03, yi, text,
                  va="center", fontsize=8)
    ax_c.set_xlim(0, right * 1.45)
    half = sorted({r["ceiling"]["num_models"] for r in reports if "ceiling" in r})
    ax_c.set_title(f"at N/2 = {', '.join(map(str, half))}, same reference halves:\n"
                   "grey = ceiling, red = the method", loc="left")
    ax_c.set_xlabel("F at N/2")
    return fig


# --- (2) per-example epsilon histogram with the score's buckets ---------------------------------
EPSILON_BIN = 0.1  # width of the histogram's bins, in epsilon (five per bucket of H)


class _EpsilonPanels:
    """The epsilon histogram's axes and artists for one N, refilled for each method (see
    `_TopPanels` for why)."""

    def __init__(self, num_models: int):
        self.last = last = math.ceil(math.log(num_models - 1))  # right end of H's last bucket
        self.fig = fig = Figure(figsize=(8.5, 2.6), dpi=PNG_DPI)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.8, wspace=0.08)
        ax, ax_out = fig.subplots(1, 2, gridspec_kw={"width_ratios": [6, 1]}, sharey=True)
        self.edges = np.linspace(0.0, float(last), int(round(last / EPSILON_BIN)) + 1)
        self.hist = ax.stairs(np.zeros(self.edges.size - 1), self.edges, fill=True,
                              color=UNLEARNED, alpha=0.75)
        for k in range(int(last / 0.5) + 1):
            ax.axvline(0.5 * k, color="#777777", lw=0.6, ls=":")
        for k in range(int(last / 0.5)):
            weight = "1" if k == 0 else f"1/{2 ** k}"
            ax.text(0.5 * k + 0.25, 1.01, weight, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color="#555555")
        ax.set_xlim(0, last)
        ax.set_xlabel("ε of the best attack on the example (bucket edges every 0.5; H per "
                      "bucket above)")
        ax.set_ylabel("forget examples", labelpad=20)  # room for the `_Ticks` labels
        self.counts = _Ticks(ax, "y", 5, integer=True)
        ax_out.tick_params(axis="y", left=False)
        self.bars = ax_out.bar([0, 1], [0, 0], color=[UNLEARNED, ALARM], width=0.7)
        ax_out.set_xticks([0, 1], [f"[{last}, 50)", "50 (cap)"])
        ax_out.set_xlim(-0.6, 1.6)
        ax_out.set_title("H = 0", fontsize=8)
        self.axes = ax
        self.title = fig.suptitle("", x=0.08, ha="left", fontsize=9)
        _REFILLS[fig] = _Refill(fig, [self.hist, *self.bars, self.title,
                                      *self.counts.artists()])

    def fill(self, report: dict[str, Any]) -> Figure:
        eps = np.asarray(report["per_example"]["epsilon"], dtype=np.float64)
        counts, _ = np.histogram(eps[eps < self.last], bins=self.edges)
        self.hist.set_data(counts, self.edges)
        beyond = int(((eps >= self.last) & (eps < 50)).sum())
        capped = int((eps >= 50).sum())
        for bar, height in zip(self.bars, (beyond, capped)):
            bar.set_height(height)
        top = max(1, int(counts.max(initial=0)), beyond, capped) * 1.05
        self.axes.set_ylim(0, top)
        self.counts.update(0, top)
        n = report["num_models"]["scored"]
        f = _value(report, "forget_quality")
        self.title.set_text(f"{report['method']}: ε per forget example ({eps.size} examples, "
                            f"N = {n}); F = mean H = {f:.4f}")
        return self.fig


_EPSILON_LAYOUTS: dict[int, _EpsilonPanels] = {}


@_styled
def epsilon_histogram(report: dict[str, Any]) -> Figure:
    """Histogram of the per-example epsilons of one method, the buckets of H marked; epsilons
    past the last bucket (worth 0) and at the cap 50 get their own bars on the right.

    The figure is reused by the next call with the same N: render it before that call.
    """
    n = report["num_models"]["scored"]
    if n not in _EPSILON_LAYOUTS:
        _EPSILON_LAYOUTS.clear()
        _EPSILON_LAYOUTS[n] = _EpsilonPanels(n)
    return _EPSILON_LAYOUTS[n].fill(report)


# --- (3) the most distinguishable forget examples -----------------------------------------------
def _rule_text(rule: dict[str, Any]) -> str:
    kind, t = rule["kind"], rule["thresholds"]
    bank = {"unlearned": "U", "retrained": "R"}.get(rule["flags"], "")
    rates = (f"TPR {rule['true_positive_rate']:.2f}, FPR {rule['false_positive_rate']:.2f}"
             if kind in ("threshold", "interval") else "")
    if kind == "threshold":
        return f"c ≥ {t[0]:.2f} → {bank}\n{rates}"
    if kind == "interval":
        return f"{t[0]:.2f} ≤ c ≤ {t[1]:.2f} → {bank}\n{rates}"
    if kind == "degenerate":
        return "spread ratio < 1%:\nno attack needed"
    return "no rule scores above 0\n"


def _fraction(h: float) -> str:
    """An example's score H = 2^-k as "1/2^k" (as figure 2 labels its buckets), 0 as "0"."""
    if h > 0:
        k = round(-math.log2(h))
        if 2.0 ** -k == h:
            return "1" if k == 0 else f"1/{2 ** k}"
    return f"{h:g}"


HIST_BINS = 30  # bins per example histogram, over the range of both banks


class _TopPanels:
    """The top-k figure's axes and artists, made once per layout and refilled for each method:
    making axes costs matplotlib more than drawing them, and a report draws this figure once per
    method (measured: about 2x faster per method than a fresh figure)."""

    def __init__(self, k: int, with_images: bool):
        cols = min(TOP_COLUMNS, max(k, 1))
        rows = max(1, math.ceil(k / cols))
        self.fig = fig = Figure(figsize=(8.5, 1.0 + 2.05 * rows), dpi=PNG_DPI)
        span = 2 if with_images else 1
        ratios = [1, 2.6] * cols if with_images else [1] * cols
        grid = fig.add_gridspec(rows, len(ratios), width_ratios=ratios, left=0.02, right=0.985,
                                bottom=0.55 / fig.get_figheight(),
                                top=1 - 0.95 / fig.get_figheight(),
                                wspace=0.12 if with_images else 0.25, hspace=1.15)
        self.panels = []
        zeros, unit = np.zeros(HIST_BINS), np.linspace(0, 1, HIST_BINS + 1)
        for at in range(k):
            row, col = divmod(at, cols)
            panel: dict[str, Any] = {"image": None}
            if with_images:
                ax_img = fig.add_subplot(grid[row, span * col])
                ax_img.set_axis_off()
                panel["image_axes"] = ax_img
            ax = fig.add_subplot(grid[row, span * col + span - 1])
            panel["axes"] = ax
            panel["retrained"] = ax.stairs(zeros, unit, fill=True, color=RETRAINED, alpha=0.45,
                                           label="retrained (R)")
            panel["unlearned"] = ax.stairs(zeros, unit, fill=True, color=UNLEARNED, alpha=0.45,
                                           label="unlearned (U)")
            # What the best rule flags: a grey span between two lines, in data x, axes y.
            panel["span"] = ax.add_patch(Rectangle((0, 0), 0, 1, transform=ax.get_xaxis_transform(),
                                                   color="#999999", alpha=0.2, lw=0))
            panel["lines"] = [ax.axvline(0, color="black", lw=1) for _ in range(2)]
            ax.set_yticks([])
            ax.spines["left"].set_visible(False)
            panel["ticks"] = _Ticks(ax, "x", 4)  # ticks change with every example
            # The example's heading, 3 points above the histogram, from the left of its image
            # (the last column's would not fit from the histogram's left).
            left = panel["image_axes"].transAxes if with_images else ax.transAxes
            panel["heading"] = ax.text(0, 1, "", fontsize=6.5, ha="left", va="bottom",
                                       transform=offset_copy(
                                           blended_transform_factory(left, ax.transAxes), fig,
                                           y=3, units="points"))
            self.panels.append(panel)
        if k:
            handles, labels = self.panels[0]["axes"].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, fontsize=7.5,
                       bbox_to_anchor=(0.5, 0.0))
        # The method's name changes; what the figure shows does not: drawn once (`_Refill`).
        self.title = fig.text(0.02, 1, "", fontsize=9, fontweight="bold", ha="left", va="top",
                              transform=offset_copy(fig.transFigure, fig, y=-5, units="points"))
        fig.text(0.02, 1, f"the {k} forget examples an attacker singles out best (x: logit-scaled "
                 "confidence c; grey: what the best rule flags)", fontsize=8, ha="left", va="top",
                 transform=offset_copy(fig.transFigure, fig, y=-18, units="points"))
        # Each method's images are new artists: `fill` swaps them in.
        changing = [self.title]
        for panel in self.panels:
            ax = panel["axes"]
            changing += [panel["retrained"], panel["unlearned"], panel["span"], *panel["lines"],
                         panel["heading"], *panel["ticks"].artists()]
        _REFILLS[fig] = self.refill = _Refill(fig, changing)

    def fill(self, report: dict[str, Any], examples: Sequence[dict[str, Any]]) -> Figure:
        for panel, ex in zip(self.panels, examples):
            ax = panel["axes"]
            u = np.asarray(ex["unlearned"], dtype=np.float64)
            r = np.asarray(ex["retrained"], dtype=np.float64)
            lo, hi = min(u.min(), r.min()), max(u.max(), r.max())
            pad = max(0.05 * (hi - lo), 0.05)
            edges = np.linspace(lo - pad, hi + pad, HIST_BINS + 1)
            top = 1
            for key, values in (("retrained", r), ("unlearned", u)):
                counts, _ = np.histogram(values, bins=edges)
                panel[key].set_data(counts, edges)
                top = max(top, int(counts.max()))
            ax.set_xlim(edges[0], edges[-1])
            ax.set_ylim(0, top * 1.05)
            panel["ticks"].update(edges[0], edges[-1])
            rule = ex["rule"]
            t = list(rule["thresholds"])
            if rule["kind"] == "threshold":
                t = [t[0], edges[-1]]  # flags c >= t: everything to the right
            shown = [x for x in t if edges[0] <= x <= edges[-1]]
            span = panel["span"]
            span.set_visible(len(t) == 2)
            if len(t) == 2:
                x0, x1 = max(t[0], edges[0]), min(t[1], edges[-1])
                span.set_x(x0)
                span.set_width(max(x1 - x0, 0.0))
            for line, x in zip(panel["lines"], [*shown[: len(rule["thresholds"])], None, None]):
                line.set_visible(x is not None)
                if x is not None:
                    line.set_xdata([x, x])
            panel["heading"].set_text(f"#{ex['index']} (label {ex['label']})  ε = "
                                      f"{ex['epsilon']:.2f}  H = {_fraction(ex['score'])}\n"
                                      f"{_rule_text(rule)}")
            if "image_axes" in panel:
                image = ex.get("image")
                old = panel["image"]
                img = None if image is None else np.asarray(image)
                if old is not None and img is not None and old.get_array().shape == img.shape:
                    old.set_data(img)  # cheaper than a new image (its colormap, its extent)
                    old.set_visible(True)
                elif img is not None:
                    if old is not None:
                        old.remove()
                    panel["image"] = panel["image_axes"].imshow(
                        img, cmap="gray_r" if img.ndim == 2 else None, vmin=0, vmax=1,
                        interpolation="nearest")
                    self.refill.swap(old, panel["image"])
                elif old is not None:
                    old.set_visible(False)
        self.title.set_text(report["method"])
        return self.fig


_TOP_LAYOUTS: dict[tuple[int, bool], _TopPanels] = {}


@_styled
def top_examples(report: dict[str, Any], examples: Sequence[dict[str, Any]]) -> Figure:
    """One panel per example: both banks' logit-scaled confidences overlaid (histograms), the
    best attack's threshold(s) marked, and the example's image to its left where there is one.

    examples: dicts with "index", "epsilon", "score", "label", "rule" (a `metrics.BestRule`),
    "unlearned" and "retrained" (`[N]` confidences) and "image" (`[H, W]` or `[H, W, 3]` floats in
    [0, 1], or None).
    The figure is reused by the next call with as many examples: render it before that call.
    """
    key = (len(examples), any(e.get("image") is not None for e in examples))
    if key not in _TOP_LAYOUTS:
        _TOP_LAYOUTS.clear()  # one layout kept: a report's methods nearly always share it
        _TOP_LAYOUTS[key] = _TopPanels(*key)
    return _TOP_LAYOUTS[key].fill(report, examples)


# --- (4) forgetting against utility -------------------------------------------------------------
@_styled
def forgetting_vs_utility(reports: Sequence[dict[str, Any]]) -> tuple[Figure, str]:
    """Left: forgetting (share of the ceiling, else F, else the seed score) against the test
    accuracy ratio, coloured by the runtime ratio, methods over the 0.2 gate ringed. Right: the
    runtime ratios against the gate. Returns the figure and the name of the forgetting axis."""
    names = [r["method"] for r in reports]
    share = np.array([_value(r, "ceiling", "share") for r in reports])
    f = np.array([_value(r, "forget_quality") for r in reports])
    seed = np.array([_value(r, "seed_metric", "score") for r in reports])
    if np.isfinite(share).all():
        y, what = share, "share of the ceiling (1 = as good as retraining)"
    elif np.isfinite(f).all():
        y, what = f, "forget quality F (compare at equal N only)"
    else:
        y, what = seed, "seed metric score"
    x = np.array([_value(r, "utility", "test_accuracy", "ratio") for r in reports])
    runtime = np.array([_value(r, "runtime", "ratio") for r in reports])
    gate = next((r["runtime"]["gate"] for r in reports), 0.2)
    over = np.array([bool(r["runtime"]["over_gate"]) for r in reports])

    fig = Figure(figsize=(8.5, 3.2 + 0.1 * len(names)), dpi=PNG_DPI)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.88, wspace=0.55)
    ax, ax_t = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    vmax = max(2 * gate, float(np.nanmax(np.append(runtime, 0.0))))
    dots = ax.scatter(x, y, c=runtime, cmap="viridis", vmin=0, vmax=vmax, s=40, zorder=3,
                      edgecolors=np.where(over, ALARM, "white"), linewidths=1.8)
    for xi, yi, name in zip(x, y, names):
        if math.isfinite(xi) and math.isfinite(yi):
            ax.annotate(name, (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.margins(x=0.25, y=0.12)  # room for the method names
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.axvline(1.0, color="#777777", lw=0.6, ls=":")
    if y is share:
        ax.axhline(1.0, color="#777777", lw=0.6, ls=":")
    ax.set_xlabel("test accuracy, unlearned / retrained")
    ax.set_ylabel(what.split(" (")[0])
    ax.set_title(f"forgetting vs utility; y: {what}", loc="left", fontsize=8)
    bar = fig.colorbar(dots, ax=ax, pad=0.02, fraction=0.05)
    bar.set_label("runtime ratio", fontsize=7)
    bar.ax.axhline(gate, color=ALARM, lw=1.5)

    yy = _methods_axis(ax_t, names)
    ax_t.barh(yy, np.nan_to_num(runtime), color=np.where(over, ALARM, "#777777"), height=0.6)
    ax_t.axvline(gate, color=ALARM, lw=1, ls="--")
    ax_t.text(gate, 1.0, f" gate {gate}", transform=ax_t.get_xaxis_transform(), color=ALARM,
              fontsize=7, va="bottom")
    ax_t.set_xlabel("runtime ratio (unlearn / retrain, per model)")
    ax_t.set_xlim(0, max(1.3 * vmax / 2, 1.1 * float(np.nanmax(np.append(runtime, gate)))))
    return fig, what


# --- (5) the seed variant and the simple MIA beside the official score ---------------------------
@_styled
def seed_metrics(reports: Sequence[dict[str, Any]]) -> Figure:
    """Per method: the official F (when scored), the seed's learned-attack score and the simple
    MIA accuracy (0.5 = chance), side by side."""
    names = [r["method"] for r in reports]
    panels = []
    if any("forget_quality" in r for r in reports):
        panels.append(("official F", [_value(r, "forget_quality") for r in reports], None))
    panels.append(("seed metric score", [_value(r, "seed_metric", "score") for r in reports],
                   None))
    panels.append(("simple MIA accuracy (0.5 = chance)",
                   [_value(r, "seed_metric", "simple_mia_accuracy") for r in reports], 0.5))
    fig = Figure(figsize=(8.5, 1.2 + 0.3 * len(names)), dpi=PNG_DPI)
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.45 / fig.get_figheight() + 0.04,
                        top=1 - 0.35 / fig.get_figheight(), wspace=0.15)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (title, values, chance) in zip(axes, panels):
        y = _methods_axis(ax, names)
        v = np.array(values, dtype=np.float64)
        ax.barh(y, np.nan_to_num(v), color=UNLEARNED if chance is None else RETRAINED, height=0.6)
        for yi, vi in zip(y, v):
            ax.text(np.nan_to_num(vi), yi, f" {vi:.3f}" if math.isfinite(vi) else " n/a",
                    va="center", fontsize=7)
        if chance is not None:
            ax.axvline(chance, color="#555555", lw=0.8, ls="--")
            ax.set_xlim(0, 1.08)
        else:
            ax.set_xlim(0, max(0.05, float(np.nanmax(np.append(v, 0.0)))) * 1.3)
        ax.set_title(title, loc="left")
    return fig
