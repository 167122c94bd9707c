"""The HTML report in a real browser: headless Chromium opens it offline, every figure renders,
the console stays clean, and it prints (issue 13).

Needs a Chromium binary (Debian: `apt-get install chromium`; `.ci/run` installs it); skipped with
the reason elsewhere. Each check is first run on a deliberately broken copy of the page, to show
that it can fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BROWSER is None, reason="no Chromium binary found (tried "
                       f"{', '.join(BROWSERS)}); on Debian: apt-get install chromium"),
]
TIMEOUT_S = 90  # per browser run; a cold start on a loaded 2-core machine takes ~5-15 s

# Run inside the page after load: what the browser made of every image, and any error events.
PROBE = """<script>
console.log("probe: console is captured");
var probeErrors = [];
window.addEventListener("error", function (e) {
  probeErrors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || e));
}, true);
window.addEventListener("load", function () {
  var out = {errors: probeErrors, images: []};
  document.querySelectorAll("img").forEach(function (im) {
    var box = im.getBoundingClientRect();
    out.images.push({complete: im.complete, natural: [im.naturalWidth, im.naturalHeight],
                     shown: [Math.round(box.width), Math.round(box.height)]});
  });
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per run
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch would fail, visibly
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def _inspect(tmp: Path, page: Path) -> tuple[dict, list[str]]:
    """Open a copy of `page` with the probe; returns the probe's findings and the console lines."""
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    run = _chromium(tmp, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the probe did not run; chromium said: {run.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "net::" in line]
    return result, console


def _problems(result: dict, console: list[str]) -> list[str]:
    """Everything wrong with a page, as seen from inside the browser."""
    bad = [f"error event: {e}" for e in result["errors"]]
    for i, im in enumerate(result["images"]):
        if not im["complete"] or min(im["natural"]) == 0 or min(im["shown"]) < 50:
            bad.append(f"image {i} did not render: {im}")
    bad += [line for line in console if "probe: console is captured" not in line]
    return bad


@pytest.fixture(scope="module")
def report_page(trained_store, tmp_path_factory):
    from unlearn_cli import report_html, score

    out = tmp_path_factory.mktemp("browser")
    reports = score.run(trained_store, metric="all", bootstrap=0, keep_confidences=True)
    pages = report_html.prepare(reports, trained_store)
    rendered = report_html.render_figures(pages)
    path = report_html.write_html(pages, rendered, out / "report.html")
    return path, len(rendered)


def test_every_figure_renders_and_the_console_stays_clean(report_page, tmp_path):
    page, num_figures = report_page
    # The checks can fail: a page with a broken image, a missing file and a script error.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace(
        "</main>", '<img src="data:image/png;base64,iVBORw0KGgo=" alt="x">'
        '<img src="missing.png" alt="y"><script>notAFunction();</script></main>'),
        encoding="utf-8")
    result, console = _inspect(tmp_path, broken)
    problems = _problems(result, console)
    assert any("did not render" in p for p in problems), problems
    assert any("notAFunction" in p for p in problems), problems
    assert any("probe: console is captured" in line for line in console), console

    result, console = _inspect(tmp_path, page)
    assert len(result["images"]) == num_figures
    assert _problems(result, console) == []
    assert any("probe: console is captured" in line for line in console), console


def test_screenshot_shows_the_figures(report_page, tmp_path):
    """Pixels, not the DOM: the screenshot of the page holds the figures' colours."""
    from PIL import Image

    page, _ = report_page
    shot = tmp_path / "page.png"
    run = _chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,3000",
                    f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.std() > 10  # not a blank page

    def share(pixels: np.ndarray, rgb: tuple[int, int, int]) -> float:
        """Share of the pixels within 12 levels of the colour `rgb`."""
        return float((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 12).mean())

    # The unlearned bank's red (solid in figures 1, 2 and 5) and the ceiling's grey (figure 1)
    # appear only in the figures: the page's own style uses neither.
    assert share(pixels, (0xEE, 0x66, 0x77)) > 1e-4
    assert share(pixels, (0xBB, 0xBB, 0xBB)) > 1e-4
    # The same screenshot of the page without its images lacks them: the colours come from the
    # figures, not from anything else on the page.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'<img [^>]*>', "", page.read_text(encoding="utf-8")),
                    encoding="utf-8")
    _chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,3000",
              f"--screenshot={tmp_path / 'bare.png'}", bare.as_uri())
    bare_pixels = np.asarray(Image.open(tmp_path / "bare.png").convert("RGB")).astype(np.int16)
    assert share(bare_pixels, (0xEE, 0x66, 0x77)) == 0.0


def test_prints_to_pdf_one_section_per_page(report_page, tmp_path):
    page, _ = report_page
    pdf = tmp_path / "report.pdf"
    run = _chromium(tmp_path, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri())
    assert pdf.is_file(), run.stderr[-2000:]
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page[^s]", data))
    # Two method sections, each starting a new page, after the summary: at least 3 pages.
    assert pages >= 3, pages
