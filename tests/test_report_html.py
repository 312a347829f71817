"""The HTML report in a real browser: headless Chromium loads it offline, without errors, with every figure decoded.

Chromium is Debian's `chromium` package; the test installs it with apt-get when it is missing (as root), and
skips with the reason only when it cannot be installed.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from circuitlab.patching.models import boot_native_model, save_model
from circuitlab.reports.cli import main
from tests.conftest import TINY_CONFIG

CHROMIUM = "/usr/bin/chromium"


def _ensure_chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and cannot be installed here "
                    "(needs apt-get as root: `apt-get install -y chromium`)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env,
                          timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env,
                              timeout=900)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"headless Chromium could not be installed with apt-get ({tail[0]})")
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


def test_report_loads_in_headless_chromium_with_all_figures(report):
    binary = _ensure_chromium()
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
    for fig in ("baseline", "heads", "mlps", "resid", "circuit", "faithfulness", "agreement"):
        assert f'id="fig-{fig}"' in dom


def test_report_screenshot_is_not_blank(report, tmp_path):
    binary = _ensure_chromium()
    shot = tmp_path / "report.png"
    proc = _chromium(binary, f"--screenshot={shot}", "--window-size=1200,2400", report.resolve().as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and figures, not an empty page
