"""The distilled policy: fitted to the set optimum's kept sets, and scoring online exactly as it was fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses import distill
from analyses.tasks.fidelity import Fidelity
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.offline import observation
from kv_compression.policies import Distilled
from kv_compression.policies.learned import FEATURES

from conftest import VOCAB, tiny_model


def test_the_fit_reads_the_optimums_sets_and_the_policy_scores_as_fitted(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "PENALTIES", (0.1, 1.0))
    loaded, task = tiny_model("llama"), Fidelity(prefix=40, continuation=20, far_from=10)
    g = torch.Generator().manual_seed(3)
    documents = [Trace(f"d{i}", torch.randint(0, VOCAB, (60,), generator=g).tolist()) for i in range(3)]
    out = tmp_path / "tiny.json"
    content = distill.fit(loaded, 3, out, tmp_path / "work", progress=False, documents=documents, task=task)
    assert json.loads(out.read_text()) == content and content["features"] == list(FEATURES)
    assert len(content["weights"]) == content["bands"] * len(FEATURES) == len(content["intercepts"]) * len(FEATURES)
    assert set(content["optimal_kl"]) == set(distill.BUDGETS) and 0 <= content["sinks"] <= 40
    for model in ("attention_window", "attention_cumulative", f"bands={content['bands']},C={content['penalty']}"):
        assert 0 < content["cross_validation"][model] <= 1
    # The sets were cached: a second fit searches nothing and gives the same weights.
    monkeypatch.setattr(distill, "search_rows", None)
    assert distill.fit(loaded, 3, out, tmp_path / "work", progress=False, documents=documents, task=task) == content

    policy = Distilled(
        bands=content["bands"], weights=tuple(content["weights"]), intercepts=tuple(content["intercepts"]), sinks=0
    )
    data = distill.entries(
        Tracer(loaded),
        documents[0],
        tmp_path / "work" / "cache" / "tiny-llama" / "distill" / "sets",
        distill.BUDGETS,
        task.prefix,
    )
    weights = np.array(content["weights"]).reshape(content["bands"], len(FEATURES))
    obs = observation(Tracer(loaded), documents[0].token_ids[: task.prefix], [policy])
    for index, layer in enumerate(obs.full_layers):
        which = distill.band(index, len(obs.full_layers), content["bands"])
        expected = data["features"][index] @ weights[which] + content["intercepts"][which]
        scores = policy.score(obs, layer)[0].numpy()
        assert np.allclose(scores[:, : -policy.recent], expected[:, : -policy.recent], atol=1e-4)

    # The ablation: nothing dropped is the chosen fit's own cross-validation; each drop is paired per document.
    _, data = distill.training_data(loaded, documents, tmp_path / "work", progress=False, task=task)
    table = distill.ablation(data, [d.id for d in documents], content["bands"], content["penalty"])
    assert len(table) == (len(FEATURES) + 2) * len(documents) * len(distill.BUDGETS)
    chosen = f"bands={content['bands']},C={content['penalty']}"
    reference = table[table.dropped == distill.ALL_SIGNALS]
    assert reference.agreement.mean() == pytest.approx(content["cross_validation"][chosen])
    drops = distill.paired_drops(table).set_index("dropped")
    per_document = table.groupby(["dropped", "document"]).agreement.mean()
    expected = (per_document[distill.ALL_SIGNALS] - per_document["every entropy"]).mean()
    assert drops.loc["every entropy", "drop"] == pytest.approx(expected) and len(drops) == len(FEATURES) + 1
    assert (drops.drop_ci_low <= drops["drop"]).all() and (drops["drop"] <= drops.drop_ci_high).all()
    written = distill.plot_distilled(content, drops.reset_index(), tmp_path / "fig")
    assert [path.suffix for path in written] == [".png", ".svg"] and all(path.stat().st_size for path in written)


def test_the_ablation_refuses_a_model_without_weights_before_loading_it(capsys):
    with pytest.raises(SystemExit) as raised:
        distill.main(["--model", "no-such-model"])
    assert raised.value.code == 2
    expected = "error: --model: no distilled weights for 'no-such-model'; run `forward-influence distill`"
    assert capsys.readouterr().err.strip() == expected


def test_the_ablation_refuses_fewer_than_two_documents_before_loading(capsys):
    with pytest.raises(SystemExit) as raised:
        distill.main(["--docs", "1"])
    assert raised.value.code == 2
    expected = "error: --docs: leaving one document out needs at least 2, not 1"
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected)
