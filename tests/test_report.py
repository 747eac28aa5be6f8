"""hermes report: a self-contained page that renders in headless Chromium without errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from hermes import api
from tests.conftest import invoke

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,2000", "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def page(e2e, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mixes = []
    for name, rule in (("uniform", "uniform"), ("natural", "natural")):
        api.mix(e2e["db"], root / name, rule=rule, to_level=2, eligible="top:0.3")
        mixes.append(root / name)
    out = root / "report.html"
    r = invoke("report", "--db", e2e["db"], "--mixture", mixes[0], "--mixture", mixes[1], "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_page_is_self_contained(page):
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r"(src|href)=[\"']https?:", text)
    assert '"hierarchy"' in text and '"mixtures"' in text
    assert page.stat().st_size < 5_000_000


def test_bad_mixture_folder_is_an_error(e2e, tmp_path):
    r = invoke("report", "--db", e2e["db"], "--mixture", tmp_path, "--out", tmp_path / "r.html")
    assert r.exit_code == 1 and "not a mixture folder" in r.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
def test_page_renders_in_headless_chromium(page, tmp_path):
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="render-ok"' in dom, "the page's script did not finish"
    errors = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1) if errors else dom[:500]
    assert dom.count('class="tile') >= 2                        # the treemap drew its cells
    assert 'class="levelstats"' in dom and 'id="comparison"' in dom and 'class="mixture"' in dom
    png = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={png}",
                    page.as_uri()], capture_output=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000   # a real, non-blank picture
