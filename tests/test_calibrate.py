"""Calibration: the grid setting with the lowest far-distance influence is written and then used."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from analyses.calibrate import calibrate, option_effects, settings_grid
from kv_compression.policies import InfoKV
from kv_compression.policies import calibration as calibration_module

from conftest import VOCAB, tiny_model


def test_calibration_chooses_the_lowest_far_influence_and_infokv_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(calibration_module, "CALIBRATION_DIR", tmp_path)
    loaded = tiny_model("llama")
    g = torch.Generator().manual_seed(8)
    docs = {f"doc{i}": torch.randint(0, VOCAB, (80,), generator=g).tolist() for i in range(2)}
    grid = dict(weight=(0.0, 2.0), normalisation=("zscore", "rank"), window=(4,))
    result = calibrate(loaded, ["0.5"], grid=grid, prefix=40, continuation=40, token_ids=docs)
    path = tmp_path / "tiny-llama.json"
    assert json.loads(path.read_text())["settings"] == result["settings"]
    ranking = result["ranking"]
    assert len(ranking) == 4 and ranking[0]["kl_far"] == min(r["kl_far"] for r in ranking)
    assert len(result["measurements"]) == 4 * 2  # every setting on every document
    chosen = settings_grid(grid)[ranking[0]["setting"]]
    assert result["settings"]["weight"] == chosen.weight and result["settings"]["window"] == 4
    policy = calibration_module.make("infokv", "tiny-llama")
    assert policy == InfoKV(**{k: v for k, v in result["settings"].items()})
    assert "calibrated settings from tiny-llama.json" in capsys.readouterr().err
    assert calibration_module.make("infokv", "another-model") == InfoKV()  # no file: the defaults
    assert calibration_module.make("infokv-default", "tiny-llama") == InfoKV()  # the defaults despite the file
    assert "infokv-default" in calibration_module.policy_names()
    effects = option_effects(result).set_index(["option", "value"])
    ranking = pd.DataFrame(result["ranking"])
    for weight in (0.0, 2.0):  # the marginal mean of an option value over the settings that use it
        expected = ranking[ranking.setting.str.contains(f"weight={weight}")].kl_far.mean()
        assert effects.loc[("weight", weight), "kl_far"] == pytest.approx(expected)
