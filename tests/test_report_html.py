"""`unlearn score --html / --plots` and the best attack rule per example (issue 13)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest
from typer.testing import CliRunner

from unlearn_cli import metrics
from unlearn_cli.cli import app

runner = CliRunner()


# --- the best rule per example --------------------------------------------------------------------
def _banks(seed: int = 0, num_models: int = 40, num_examples: int = 40):
    """Confidences that exercise every branch: overlap, separation, a peaky bank, data on the
    0.01 grid, a constant bank (degenerate spread), two equal constants."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, 1.0, (num_models, num_examples))
    r = rng.normal(0.4, 1.0, (num_models, num_examples))
    r[:, 1] = rng.normal(9.0, 1.0, num_models)  # perfect separation
    r[:, 2] = rng.normal(0.0, 0.2, num_models)  # a peaky bank: the interval family may win
    u[:, 3], r[:, 3] = np.round(u[:, 3], 2), np.round(r[:, 3], 2)  # ties on the threshold grid
    u[:, 4] = 1.5  # constant: spread ratio 0
    u[:, 5], r[:, 5] = 2.0, 2.0  # both constant and equal: epsilon 0
    u[:, 6], r[:, 6] = rng.normal(0, 1, num_models), rng.normal(0, 1, num_models)
    return u, r


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_rule_epsilon_equals_the_fast_path(seed):
    u, r = _banks(seed)
    fast = metrics.per_example_epsilons(u, r)
    rules = metrics.best_rules(u, r, np.arange(u.shape[1]))
    assert [rule["epsilon"] for rule in rules] == fast.tolist()
    # Given the fast path's epsilons (the report does), the same rules, found faster.
    assert metrics.best_rules(u, r, np.arange(u.shape[1]), fast) == rules
    kinds = {rule["kind"] for rule in rules}
    assert {"threshold", "interval", "degenerate"} <= kinds, kinds
    assert rules[4]["kind"] == "degenerate" and rules[4]["epsilon"] == 50.0
    assert rules[5]["kind"] == "degenerate" and rules[5]["epsilon"] == 0.0


def test_best_rule_thresholds_reproduce_its_rates_and_epsilon():
    """The rule is real: applied to the banks it flags the shares it reports, and those give
    its epsilon by the spec's formula."""
    u, r = _banks(3)
    for s, rule in enumerate(metrics.best_rules(u, r, np.arange(u.shape[1]))):
        if rule["kind"] not in ("threshold", "interval"):
            continue
        flagged, other = (u[:, s], r[:, s]) if rule["flags"] == "unlearned" else (r[:, s], u[:, s])
        t = rule["thresholds"]

        def hit(c, t=t, kind=rule["kind"]):
            return c >= t[0] if kind == "threshold" else (t[0] <= c) & (c <= t[1])

        tpr, fpr = hit(flagged).mean(), hit(other).mean()
        assert (tpr, fpr) == (rule["true_positive_rate"], rule["false_positive_rate"])
        tp, fp = int(hit(flagged).sum()), int(hit(other).sum())
        eps = metrics._rule_epsilons(np.array(tp), np.array(fp), flagged.size, other.size)
        assert min(float(eps), 50.0) == rule["epsilon"]


def test_best_rules_for_chosen_examples_only_and_in_order():
    u, r = _banks(4)
    fast = metrics.per_example_epsilons(u, r)
    picked = [6, 2, 1]
    assert [x["epsilon"] for x in metrics.best_rules(u, r, picked)] == fast[picked].tolist()


def test_count_below_equals_searchsorted_on_the_interval_grid():
    rng = np.random.default_rng(5)
    for trial in range(60):
        bank = np.sort(np.round(rng.normal(0, rng.choice([0.05, 0.5, 3.0]), 50), 2))
        width = bank[-1] - bank[0]
        left = metrics._left_edges(metrics._right_edges(bank, width), width)
        if trial % 2:  # data exactly on left edges
            bank = np.sort(left.ravel()[rng.integers(0, left.size, 50)])
        assert np.array_equal(metrics._count_below(bank, left),
                              np.searchsorted(bank, left, side="left"))


# --- the page ------------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Collects what the checks need: every tag with its attributes, the number spans, the
    table cells of the number tables, and the text of <style>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.nums: list[dict] = []  # {attrs, text}
        self.cells: list[list] = []  # per <td> of a table.numbers: [(text, in_num_span)]
        self.style = ""
        self._stack: list[tuple[str, dict]] = []
        self._num: dict | None = None
        self._cell: list | None = None
        self._in_numbers = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("img", "meta", "br", "link", "input", "hr"):
            return
        self._stack.append((tag, a))
        if tag == "table" and "numbers" in a.get("class", "").split():
            self._in_numbers += 1
        if tag == "td" and self._in_numbers:
            self._cell = []
        if tag == "span" and a.get("class") == "num":
            self._num = {"attrs": a, "text": ""}

    def handle_endtag(self, tag):
        while self._stack:
            top, _ = self._stack.pop()
            if top == tag:
                break
        if tag == "span" and self._num is not None:
            self.nums.append(self._num)
            self._num = None
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if tag == "table" and self._in_numbers:
            self._in_numbers -= 1

    def handle_data(self, data):
        if self._stack and self._stack[-1][0] == "style":
            self.style += data
        if self._num is not None:
            self._num["text"] += data
        if self._cell is not None:
            self._cell.append((data, self._num is not None))


def _lookup(report: dict, key: str):
    value = report
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _check_shown(text: str, value) -> None:
    """The text shown equals the JSON value at the shown precision."""
    if value is None:
        assert text in ("-", "nan"), (text, value)
        return
    if isinstance(value, str):
        assert text == value
        return
    if text.endswith("%"):
        assert abs(float(text[:-1]) - 100 * value) <= 0.05 + 1e-9, (text, value)
        return
    digits = len(text.split(".")[1]) if "." in text else 0
    assert abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-12, (text, value)


def _decode_png(src: str):
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: a truncated or corrupt PNG raises
        return im.size


@pytest.fixture(scope="module")
def html_run(trained_store, tmp_path_factory):
    """`unlearn score --metric all --html report.html --plots plots --out report.json`, run in
    a fresh folder (the forms the error messages suggest)."""
    work = tmp_path_factory.mktemp("html")
    before = tree_digest(trained_store)
    cwd = Path.cwd()
    os.chdir(work)
    try:
        result = runner.invoke(app, [
            "score", "--store", str(trained_store), "--metric", "all", "--bootstrap", "10",
            "--out", "report.json", "--html", "report.html", "--plots", "plots",
        ])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert tree_digest(trained_store) == before  # the report reads the store, never writes it
    return work, result.output


@pytest.mark.slow
def test_html_parses_and_every_table_number_is_the_json_one(html_run):
    work, output = html_run
    assert "HTML report written to report.html" in output
    doc = json.loads((work / "report.json").read_text())
    reports = {r["method"]: r for r in doc["methods"]}
    assert set(reports) == {"finetune", "none"}
    page = _Page()
    page.feed((work / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert page.nums, "no numbers in the tables"
    checked_keys = set()
    for num in page.nums:
        a = num["attrs"]
        value = _lookup(reports[a["data-method"]], a["data-key"])
        assert json.loads(a["data-value"]) == value, a  # the page's value is the JSON's, exactly
        _check_shown(num["text"], value)
        checked_keys.add(a["data-key"])
    for key in ("forget_quality", "ceiling.share", "final_score", "runtime.ratio",
                "seed_metric.score", "utility.test_accuracy.unlearned", "top_examples.0.epsilon",
                "top_examples.0.rule.thresholds.0", "forget_quality_interval.1"):
        assert key in checked_keys, key
    # No number in a table cell comes from anywhere else than a checked span.
    for cell in page.cells:
        for text, in_span in cell:
            if not in_span:
                assert not re.search(r"\d", text), (text, cell)
    # The reading line of each method, and the config, are on the page.
    text = (work / "report.html").read_text(encoding="utf-8")
    import html as html_mod

    for rep in reports.values():
        assert html_mod.escape(rep["reading"]) in text
    assert html_mod.escape(json.dumps(doc["methods"][0]["config"], indent=2)) in text


@pytest.mark.slow
def test_html_is_self_contained_and_every_image_decodes(html_run):
    work, _ = html_run
    raw = (work / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(raw)
    tags = [t for t, _ in page.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    imgs = [a for t, a in page.tags if t == "img"]
    # fig 1, 4, 5 once; fig 2 and 3 once per method.
    assert len(imgs) == 3 + 2 * 2
    for a in imgs:
        width, height = _decode_png(a["src"])
        assert (str(width), str(height)) == (a["width"], a["height"])
        assert a.get("alt")
    for tag, a in page.tags:
        for attr in ("src", "href", "srcset", "poster", "data", "action"):
            if attr in a:
                assert a[attr].startswith(("data:image/png;base64,", "#")), (tag, attr, a[attr])
    assert "url(" not in page.style and "@import" not in page.style
    assert not re.search(r"https?://", raw)


@pytest.mark.slow
def test_top_examples_in_the_json_agree_with_the_scores(html_run):
    work, _ = html_run
    doc = json.loads((work / "report.json").read_text())
    for rep in doc["methods"]:
        eps = rep["per_example"]["epsilon"]
        tops = rep["top_examples"]
        assert len(tops) == 8
        assert [t["epsilon"] for t in tops] == sorted(eps, reverse=True)[:8]
        for t in tops:
            assert t["epsilon"] == eps[t["position"]] == t["rule"]["epsilon"]
            assert t["index"] == rep["per_example"]["index"][t["position"]]
        assert "confidences" not in rep


@pytest.mark.slow
def test_plots_writes_every_figure_in_both_formats(html_run):
    work, output = html_run
    files = sorted(p.name for p in (work / "plots").iterdir())
    stems = ["fig1-forget-quality", "fig4-forgetting-vs-utility", "fig5-seed-metrics"] + [
        f"fig{n}-{name}-{m}" for n, name in ((2, "epsilon-histogram"), (3, "top-examples"))
        for m in ("finetune", "none")]
    assert files == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    assert "14 figure files written to plots" in output
    for name in files:
        path = work / "plots" / name
        if name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                assert im.size[0] > 500
        else:
            root = ET.parse(path).getroot()
            assert root.tag.endswith("svg")
            # Self-contained: text as outlines, images inline, links only within the file (the
            # namespace and metadata URIs are names, never fetched).
            for element in root.iter():
                assert not element.tag.endswith(("}text", "}script", "}style")) or (
                    element.tag.endswith("}style") and "url(" not in (element.text or ""))
                for attr, value in element.attrib.items():
                    if attr.endswith("href"):
                        assert value.startswith(("#", "data:image/png;base64,")), value


def _under_a_file(tmp: Path, *parts: str) -> Path:
    """A path below a regular file: no one, not even root, can make a folder there."""
    (tmp / "afile").write_text("x")
    return tmp.joinpath("afile", *parts)


@pytest.mark.parametrize("flag,make,expected", [
    ("--plots", lambda t: _under_a_file(t, "plots"), "--plots {p}: cannot write to the folder"),
    ("--plots", lambda t: _under_a_file(t), "--plots {p}: cannot write to the folder"),
    ("--html", lambda t: t, "--html {p} is a folder"),
    ("--html", lambda t: _under_a_file(t, "r.html"), "--html {p}: cannot write to the folder"),
])
def test_unwritable_targets_are_one_clear_line(trained_store, tmp_path, flag, make, expected):
    target = make(tmp_path)
    before = tree_digest(trained_store)
    result = runner.invoke(app, ["score", "--store", str(trained_store), flag, str(target)])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(" ".join(lines)) < 400 and lines[0].startswith("error:"), result.output
    assert expected.format(p=target) in " ".join(lines)
    # The fix it gives: `html_run` follows it (--html report.html --plots plots).
    assert "e.g. " in result.output or "such as" in result.output
    assert tree_digest(trained_store) == before


def test_negative_top_k_is_refused(trained_store, tmp_path):
    result = runner.invoke(app, ["score", "--store", str(trained_store), "--top-k", "-1",
                                 "--bootstrap", "0", "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "--top-k -1" in result.output


def test_figures_are_not_imported_without_html_or_plots(trained_store):
    """matplotlib costs about a second to import: plain `score` must not pay it."""
    import subprocess
    import sys

    code = ("import sys; from unlearn_cli import score, report; "
            f"score.run({str(trained_store)!r}, bootstrap=0); "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_images_of_the_forget_examples():
    from unlearn_cli.report_html import forget_images

    images, note = forget_images({"data": {"dataset": "digits"}}, [0, 5])
    assert note == "" and [im.shape for im in images] == [(8, 8), (8, 8)]
    assert all(0.0 <= im.min() and im.max() <= 1.0 for im in images)
    images, note = forget_images({"data": {"dataset": "cifar10", "root": "/nonexistent"}}, [0])
    assert images is None and "images not shown" in note and "CIFAR-10" in note


# --- the figures' fast paths ---------------------------------------------------------------------
def _drawn_report(method: str, seed: int, num_models: int = 20, k: int = 4,
                  image_shape: tuple[int, ...] = (8, 8)):
    """A report and its top examples as `report_html.prepare` gives them, drawn at random."""
    rng = np.random.default_rng(seed)
    eps = np.concatenate([rng.uniform(0, 3, 30), [3.2, 50.0]])
    rep = {"method": method, "num_models": {"scored": num_models},
           "forget_quality": float(rng.uniform()), "per_example": {"epsilon": eps.tolist()}}
    rules = [{"kind": "threshold", "thresholds": [0.5], "flags": "unlearned",
              "true_positive_rate": 0.9, "false_positive_rate": 0.1, "epsilon": 1.0},
             {"kind": "interval", "thresholds": [-0.5, 0.7], "flags": "retrained",
              "true_positive_rate": 0.8, "false_positive_rate": 0.05, "epsilon": 1.2},
             {"kind": "degenerate", "thresholds": [], "flags": "", "epsilon": 50.0,
              "true_positive_rate": math.nan, "false_positive_rate": math.nan}]
    examples = [{"index": int(rng.integers(0, 1797)), "label": i, "epsilon": float(eps[i]),
                 "score": 2.0 ** -i, "rule": rules[(i + seed) % 3],
                 "unlearned": rng.normal(seed, 1 + i, num_models),
                 "retrained": rng.normal(0, 1, num_models),
                 "image": rng.uniform(0, 1, image_shape)}
                for i in range(k)]
    return rep, examples


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_refilled_figures_equal_a_full_draw():
    """The per-method figures are drawn over a saved background (`report_figures._Refill`):
    every method's picture equals a full draw of it, up to the anti-aliased pixels where a
    changing artist crosses a fixed one (measured: ~0.2% of the pixels)."""
    import matplotlib.text

    from unlearn_cli import report_figures as rf

    rf.warm_up(4)  # what a drawing process does first: this layout, with 8x8 images
    drawn = []
    # The last: colour images of another shape (new images, which reshape their axes).
    for seed, (method, shape) in enumerate([("a", (8, 8)), ("b", (8, 8)), ("a", (8, 8)),
                                            ("c", (6, 9, 3))]):
        rep, examples = _drawn_report(method, seed, image_shape=shape)
        for fig in (rf.epsilon_histogram(rep), rf.top_examples(rep, examples)):
            fast, full = _pixels(rf.render(fig, "png")), _pixels(rf.full_png(fig))
            assert fast.shape == full.shape
            assert (np.abs(fast - full).max(axis=2) > 32).mean() < 0.005
            assert (np.abs(fast - full).max(axis=2) > 0).mean() < 0.01
            drawn.append(fast)
            # SVG draws every artist, the figure's title too (a Figure skips animated ones).
            plain = io.BytesIO()
            fig.savefig(plain, format="svg")
            count = [len(re.findall(r'<g id="text_\d+"', svg))
                     for svg in (rf.render(fig, "svg").decode(), plain.getvalue().decode())]
            assert count[0] > count[1], count
            assert any(isinstance(t, matplotlib.text.Text) and t.get_text().startswith(method)
                       for t in fig.texts)
    # Each method's picture is its own: nothing of the previous one is left over.
    assert all(not np.array_equal(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1:])


def test_score_fraction_labels():
    from unlearn_cli.report_figures import _fraction

    assert [_fraction(h) for h in (1.0, 0.5, 2.0 ** -9, 0.0, 0.3)] == [
        "1", "1/2", "1/512", "0", "0.3"]


def test_drawing_jobs_are_shared_once_each_and_balanced():
    from unlearn_cli.report_html import _batches

    methods = [f"m{i}" for i in range(12)]
    jobs = [("forget_quality", None), ("forgetting_vs_utility", None)] + [
        (kind, m) for kind in ("epsilon_histogram", "top_examples") for m in methods]
    for count in (1, 2, 3):
        batches = _batches(jobs, count)
        assert sorted(j for b in batches for j in b) == sorted(jobs)
        assert len(batches) == min(count, len(jobs))
    # Twelve methods: figure 3 (the costliest kind) outweighs the rest, both processes draw
    # some of it, and one of the figures that show every method.
    batches = _batches(jobs, 2)
    assert all(any(j[0] == "top_examples" for j in b) for b in batches)
    assert all(sum(j[1] is None for j in b) == 1 for b in batches)  # one shared figure each


def test_a_drawing_process_start_never_raises(monkeypatch):
    """The drawing host's warm-up swallows its errors: the first figure reports them."""
    from unlearn_cli import report_figures, report_html

    def broken(top_k):
        raise ImportError("no matplotlib here")

    monkeypatch.setattr(report_figures, "warm_up", broken)
    assert report_html._warm_up(8) is None


@pytest.mark.slow
def test_drawing_processes_end_with_the_command(html_run):
    import multiprocessing

    from unlearn_cli import report_html

    assert report_html._HELPERS is None
    assert not [p for p in multiprocessing.active_children() if p.name == "unlearn-figures"]


def test_a_figure_that_fails_in_a_drawing_process_raises_here():
    """An error while drawing reaches the caller (no hang), and the processes end."""
    import multiprocessing

    from unlearn_cli import report_html

    report_html.start_drawing(top_k=0, workers=1)
    try:
        assert report_html._HELPERS is not None
        bad = report_html.Pages(doc={}, reports=[{"method": "x", "runtime": {}}], examples={},
                                image_note="")
        with pytest.raises(KeyError):
            report_html.render_figures(bad)
    finally:
        report_html.stop_drawing()
    assert not [p for p in multiprocessing.active_children() if p.name == "unlearn-figures"]
