"""Calibration: the grid setting with the lowest far-distance influence is written, and infokv-calibrated reads it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analyses.calibrate import calibrate, option_effects, settings_grid
from forward_influence.errors import InputError
from kv_compression.names import parse, policy_names
from kv_compression.policies import InfoKV
from kv_compression.tuned import user_folder

from conftest import VOCAB, tiny_model


def test_calibration_chooses_the_lowest_far_influence_and_infokv_calibrated_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))
    loaded = tiny_model("llama")
    g = torch.Generator().manual_seed(8)
    docs = {f"doc{i}": torch.randint(0, VOCAB, (80,), generator=g).tolist() for i in range(2)}
    grid = {
        f"alpha={a},combination={c}": InfoKV(alpha=a, combination=c, window=4, top_k=5)
        for a in (0.5, 1.0)
        for c in ("softmax", "rank")
    }
    result = calibrate(loaded, ["0.5"], grid=grid, prefix=40, continuation=40, token_ids=docs)
    path = tmp_path / "calibration" / "tiny-llama.json"
    assert path.parent == user_folder() and json.loads(path.read_text())["settings"] == result["settings"]
    ranking = result["ranking"]
    assert len(ranking) == 4 and ranking[0]["kl_far"] == min(r["kl_far"] for r in ranking)
    assert len(result["measurements"]) == 4 * 2  # every setting on every document
    assert result["settings"] == {**InfoKV().__dict__, **grid[ranking[0]["setting"]].__dict__}
    policy = parse("infokv-calibrated", "tiny-llama")
    assert policy == grid[ranking[0]["setting"]]
    assert f"from the user file {path}" in capsys.readouterr().err
    assert parse("infokv", "tiny-llama") == InfoKV()  # the published rule despite the file
    with pytest.raises(InputError, match="no calibration file for model 'another-model'"):
        parse("infokv-calibrated", "another-model")
    assert "infokv-calibrated" in policy_names()
    effects = option_effects(result).set_index(["option", "value"])
    ranking = pd.DataFrame(result["ranking"])
    for alpha in (0.5, 1.0):  # the marginal mean of an option value over the settings that use it
        expected = ranking[ranking.setting.str.contains(f"alpha={alpha}")].kl_far.mean()
        assert effects.loc[("alpha", alpha), "kl_far"] == pytest.approx(expected)


def test_the_grid_surrounds_the_published_point():
    grid = settings_grid()
    assert InfoKV() in grid.values() and InfoKV(alpha=1.0) in grid.values()
    published_axes = {
        (p.top_k, p.alpha, p.tau)
        for p in grid.values()
        if p.combination == "softmax" and p.alignment == "generated" and p.evolution == "to_final" and p.alpha < 1
    }
    assert published_axes == {(k, a, t) for k in (10, 64, 256) for a in (0.8, 0.9, 0.95) for t in (0.5, 1.0, 2.0)}
    changed = [
        p for p in grid.values() if (p.combination, p.alignment, p.evolution) != ("softmax", "generated", "to_final")
    ]
    assert all((p.top_k, p.tau) == (256, 1.0) for p in changed) and len(changed) == 5 * 3  # one option at a time
    assert {p.combination for p in grid.values()} == {"softmax", "zscore", "rank"}
    assert {p.evolution for p in grid.values()} == {"to_final", "across_layers", "none"}
    assert sum(p.alpha == 1.0 for p in grid.values()) == 1 and len(grid) == 43  # pure attention once
