"""The learned policy: fitted to measured far influence, read back by its CLI name, ranked on documents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from analyses import learned
from forward_influence.traces import Trace
from kv_compression.names import parse
from kv_compression.policies.learned import FEATURES

from conftest import VOCAB, tiny_model


@pytest.fixture(scope="module")
def documents():
    g = torch.Generator().manual_seed(0)
    return [Trace(f"d{i}", torch.randint(0, VOCAB, (140,), generator=g).tolist()) for i in range(3)]


def test_rows_pair_each_tokens_ranked_signals_with_its_far_influence(documents, tmp_path):
    tracer = learned.Tracer(tiny_model("llama"))
    rows = learned.document_rows(tracer, documents[0], tmp_path, prefix=100, distance=40)
    columns = [f"{name}@{layer}" for layer in range(4) for name in FEATURES]
    assert len(rows) == 100 - learned.WINDOW and set(columns) <= set(rows.columns)
    assert rows[columns].min().min() >= 0 and rows[columns].max().max() <= 1
    scan = learned.influence_scan(tracer, documents[0].token_ids, tmp_path / "essay_d0.parquet", 100, 40)
    far = scan[[f"kl_{d}" for d in range(33, 41)]].mean(axis=1).to_numpy()  # fi_far: distances 33-40 here
    kept = 100 - learned.WINDOW
    assert np.allclose(rows.fi_far, far[:kept])
    assert np.allclose(rows.target, (stats.rankdata(far[:kept]) - 1) / (kept - 1))
    banded = learned.design(rows, 2)  # two bands of two layers: each signal's mean over its band
    first = FEATURES.index("key_norm")
    assert np.allclose(banded[:, first], rows[["key_norm@0", "key_norm@1"]].mean(axis=1))
    assert np.allclose(banded[:, len(FEATURES) + first], rows[["key_norm@2", "key_norm@3"]].mean(axis=1))


def test_training_writes_weights_the_cli_name_reads(documents, tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))
    out = tmp_path / "learned" / "tiny-llama.json"
    content = learned.train(tiny_model("llama"), 3, out, tmp_path, False, documents, prefix=100, distance=40)
    assert json.loads(out.read_text()) == content and content["features"] == list(FEATURES)
    assert content["bands"] in (1, 3, 4) and len(content["weights"]) == content["bands"] * len(FEATURES)
    chosen = f"bands={content['bands']},alpha={content['alpha']}"
    assert content["cross_validation"][chosen] == max(
        v for k, v in content["cross_validation"].items() if k.startswith("bands=")
    )
    assert {"attention_cumulative", "attention_window"} <= set(content["cross_validation"])
    policy = parse("learned", "tiny-llama", quiet=True)
    assert policy.weights == tuple(content["weights"]) and policy.bands == content["bands"]
    scans = list((tmp_path / "cache" / "tiny-llama" / "scans" / "calibration").glob("*.parquet"))
    assert len(scans) == 3  # one cached measurement per document: a rerun resumes


def test_weights_only_draws_the_packaged_weights_without_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))  # no user file: the packaged one is drawn
    learned.main(["--model", "gemma-3-270m", "--weights-only", "--out", str(tmp_path)])
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "learned_weights.png"),
        str(tmp_path / "learned_weights.svg"),
    ]
    assert (tmp_path / "learned_weights.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_:
        learned.main(["--model", "no-such-model", "--weights-only", "--out", str(tmp_path / "none")])
    assert exit_.value.code == 2 and not (tmp_path / "none").exists()
    assert "--model: no learned weights for 'no-such-model'" in capsys.readouterr().err


def test_ranking_reads_the_scans_shards_filled_and_pairs_every_policy_with_learned(documents, tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path))
    loaded = tiny_model("llama")
    learned.train(
        loaded, 3, tmp_path / "learned" / "tiny-llama.json", tmp_path, False, documents, prefix=100, distance=40
    )
    out = tmp_path / "eval"
    folder = learned.fill_scans(loaded, documents, out, (0, 2), progress=False, prefix=100, distance=40)
    assert sorted(p.name for p in folder.iterdir()) == ["d0.parquet", "d2.parquet"] and not list(out.glob("*.csv"))
    learned.fill_scans(loaded, documents, out, (1, 2), progress=False, prefix=100, distance=40)

    def no_scan(*args, **kwargs):
        raise AssertionError("ranking measured a scan the shards had cached")

    monkeypatch.setattr(learned, "scan_at", no_scan)
    policies = ("learned", "h2o", "snapkv")
    tables = learned.ranking(loaded, documents, out, policies, progress=False, prefix=100, distance=40)
    frame = tables["per_document"]
    assert len(frame) == 9 and frame.spearman.between(-1, 1).all()
    assert set(tables["summary"].policy) == set(policies) and (tables["summary"].n_documents == 3).all()
    wide = frame.pivot(index="document", columns="policy", values="spearman")
    paired = tables["paired"].set_index("against")
    assert sorted(paired.index) == ["h2o", "snapkv"] and (paired.n_documents == 3).all()
    for other in ("h2o", "snapkv"):
        assert paired.loc[other, "difference_mean"] == pytest.approx((wide["learned"] - wide[other]).mean())
    assert {"learned_spearman.csv", "learned_spearman_paired.csv", "learned_spearman_per_document.csv"} <= {
        p.name for p in out.iterdir()
    }
