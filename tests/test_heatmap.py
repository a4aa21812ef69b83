"""Token heatmap: HTML rendered in a real headless browser, PNG via matplotlib, and the CLI's errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image

from analyses import heatmap
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from forward_influence_cli.main import main

from conftest import tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def shown():
    tracer = Tracer(tiny_model("llama"))
    trace = Trace("doc", [int(i) for i in np.random.default_rng(0).integers(1, 96, 120)])
    return heatmap.heat(tracer, trace, "policy:streaming", "0.5")


def _browser(*args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "the heatmap test needs Debian's chromium; `make setup` installs it"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_policy_heat_marks_what_the_policy_keeps(shown):
    assert len(shown.tokens) == len(shown.values) == len(shown.kept) == 120
    # StreamingLLM at half the budget: the 4 sinks and the 56 most recent tokens, in every layer and head.
    assert np.flatnonzero(shown.kept).tolist() == [0, 1, 2, 3, *range(64, 120)]
    assert np.isfinite(shown.values).all()


def test_html_heatmap_renders_one_span_per_token_in_a_browser(shown, tmp_path):
    path = heatmap.write(shown, "tiny model, policy:streaming", tmp_path / "heat.html")
    dom = _browser("--dump-dom", path.resolve().as_uri()).stdout
    spans = re.findall(r'<span class="tok( kept| evicted)?" data-position="(\d+)"', dom)
    assert [int(p) for _, p in spans] == list(range(120))
    assert sum(state == " evicted" for state, _ in spans) == int((~shown.kept).sum())
    shot = tmp_path / "shot.png"
    _browser("--window-size=1000,800", f"--screenshot={shot}", path.resolve().as_uri())
    pixels = image.imread(shot)[..., :3]
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(int), axis=0)
    assert (pixels < 0.95).any(axis=-1).mean() > 0.01 and len(colours) > 20  # text on shaded tokens, not a blank page


def test_png_heatmap_is_drawn(shown, tmp_path):
    path = heatmap.write(shown, "tiny model", tmp_path / "heat.png")
    pixels = image.imread(path)[..., :3]
    assert pixels.shape[0] > 200 and (pixels < 0.95).any(axis=-1).mean() > 0.05
    assert not (tmp_path / "heat.svg").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--signal", "loudness", "--out", "x.html"], "unknown signal 'loudness'"),
        (["--signal", "policy:nope", "--out", "x.html"], "unknown signal 'policy:nope'"),
        (["--out", "x.pdf"], "--out must end in .html or .png"),
        (["--signal", "policy:snapkv", "--budget", "2.5", "--out", "x.html"], "budget"),
    ],
)
def test_heatmap_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["heatmap", "essay:gap", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_fi_heat_is_the_scan_total_and_unknown_for_the_last_token():
    from forward_influence.scan import scan

    tracer = Tracer(tiny_model("qwen2"))
    trace = Trace("doc", [int(i) for i in np.random.default_rng(1).integers(1, 96, 50)])
    shown = heatmap.heat(tracer, trace, "fi")
    expected = scan(tracer, trace.token_ids, 0, 50, 32).fi_total.to_numpy()
    assert np.isnan(shown.values[-1]) and np.allclose(shown.values[:-1], expected[:-1])
    assert shown.kept is None and shown.label == heatmap.UNITS["fi"]
