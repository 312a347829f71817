"""The HTML report: its structure checked in Python on every run, and in a real browser where one is installed.

`test_report_structure` always runs: it parses report.html with the standard library, decodes every embedded
figure with Pillow and checks captions, tables and the absence of error text. The two Chromium tests load the
page offline in headless Chromium (figures decoded by the browser, a non-blank screenshot); they need the
`chromium` binary, which `make browser` installs (tests never install system packages).
"""

import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from circuitlab.patching.models import boot_native_model, save_model
from circuitlab.reports.cli import main
from tests.conftest import TINY_CONFIG

CHROMIUM = "/usr/bin/chromium"
FIGURES = ("baseline", "heads", "mlps", "resid", "circuit", "faithfulness", "agreement")


def _chromium_binary() -> str:
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if not found:
        pytest.skip("headless Chromium is not installed (`make browser` installs it); test_report_structure "
                    "checked the page without a browser")
    return found


def _chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="circuitlab-chromium-")
    try:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
                               "--virtual-time-budget=5000", *args],
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    save_model(boot_native_model(TINY_CONFIG), root / "model")
    out = root / "run"
    assert main(["run", "--task", "repeated_tokens", "--model", str(root / "model"), "--out", str(out), "--n", "6",
                 "--task-option", "seq_len=5", "--n-boot", "50", "--percents", "1,10,50,100", "--oracle-edges", "30",
                 "--quiet"]) == 0
    return out / "report.html"


class _Page(HTMLParser):
    """Collects figures (img src, alt, id, caption), table shapes and the open-tag stack of a page."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.figures: list[dict] = []
        self.tables: list[list[int]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.figures.append({"src": attrs.get("src", ""), "alt": attrs.get("alt", ""), "id": attrs.get("id", "")})
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append(0)
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self.tables[-1][-1] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "figcaption" and self.figures:
            self.figures[-1]["caption"] = self.figures[-1].get("caption", "") + data
        if not self.stack or self.stack[-1] not in ("script", "style"):
            self.text.append(data)


def test_report_structure(report):
    from PIL import Image

    page = _Page()
    page.feed(report.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and page.stack == [], (page.errors[:3], page.stack)
    assert {f["id"] for f in page.figures} >= {f"fig-{name}" for name in FIGURES}
    for fig in page.figures:
        assert fig["src"].startswith("data:image/png;base64,"), fig["id"]
        image = Image.open(io.BytesIO(base64.b64decode(fig["src"].split(",", 1)[1])))
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100, fig["id"]
        caption = fig.get("caption", "").strip()
        assert len(caption) > 30 and caption == fig["alt"], (fig["id"], caption)  # says what was measured
    assert page.tables and all(len(set(rows)) == 1 for rows in page.tables)  # rectangular tables
    text = " ".join(page.text)
    for bad in ("Traceback", "Error:", "undefined", "{{", "{%"):
        assert bad not in text, bad
    assert not re.search(r"\bnan\b", text, re.I), "NaN printed in the report (use n/a)"


def test_report_loads_in_headless_chromium_with_all_figures(report):
    binary = _chromium_binary()
    html = report.read_text()
    n_figures = html.count("<img ")
    assert n_figures >= 6
    proc = _chromium(binary, "--dump-dom", report.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<h1>circuitlab: repeated_tokens" in dom
    match = re.search(r'data-figures-loaded="(\d+)/(\d+)"', dom)
    assert match, "the page's load handler did not run"
    assert match.group(1) == match.group(2) == str(n_figures), f"only {match.group(1)} of {match.group(2)} figures decoded"
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", dom)  # base64 may spell anything
    for bad in ("Traceback", "Error:", "NaN", "undefined"):
        assert bad not in text, bad
    for fig in FIGURES:
        assert f'id="fig-{fig}"' in dom


def test_report_screenshot_is_not_blank(report, tmp_path):
    binary = _chromium_binary()
    shot = tmp_path / "report.png"
    proc = _chromium(binary, f"--screenshot={shot}", "--window-size=1200,2400", report.resolve().as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and figures, not an empty page
