"""Soft eviction gates, gradient influence and the set optimum, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from analyses.gradient_influence import per_document_comparison, summary
from analyses.heatmap import heat
from analyses.set_level import describe_sets, optimal_rows, paired, search_rows, sets_file
from analyses.tasks.fidelity import Fidelity
from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec
from forward_influence.gates import full_gates, gated_kl, hard_gates
from forward_influence.gradient import gradient_influence
from forward_influence.influence import clean_run, evict
from forward_influence.scan import fi_summary, scan_at
from forward_influence.set_optimum import SetSearch, hard_keep, initial_theta, optimise_gates
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace
from kv_compression.budget import Budget
from kv_compression.kept import eviction_specs, kept_indices
from kv_compression.offline import observation
from kv_compression.policies import H2O, Optimal
from kv_compression.policies.learned import FEATURES
from kv_compression.tuned import file_name

from conftest import VOCAB, tiny_model

TIME, DISTANCE = 25, 12


def _clean(tracer, n: int = 40, seed: int = 1):
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    return clean_run(tracer, ids, hidden=False)


def test_hard_gates_equal_evict_all_layers_per_layer_per_head(tiny):
    clean = _clean(tiny)
    rows = [
        [EvictionSpec((3, 9, 17), TIME)],
        [EvictionSpec((3, 9, 17), TIME, layers=(1,))],
        [EvictionSpec((0, 3, 9, 20), TIME, layers=(1, 3), heads=(0,)), EvictionSpec((5,), TIME, heads=(1,))],
    ]
    exact = evict(tiny, clean, rows, DISTANCE, hidden=False).kl
    with torch.no_grad():
        gated = gated_kl(tiny, clean, hard_gates(tiny, rows, TIME), DISTANCE).numpy()
    assert np.abs(exact - gated).max() < 1e-5
    assert exact.max() > 1e-3  # the evictions move the future far beyond the tolerance
    with torch.no_grad():
        assert gated_kl(tiny, clean, full_gates(tiny, TIME), DISTANCE).abs().max() < 1e-5


def test_gate_gradient_matches_finite_differences(tiny):
    clean = _clean(tiny)
    gates = (full_gates(tiny, TIME) * 0.6).requires_grad_(True)
    (gradient,) = torch.autograd.grad(gated_kl(tiny, clean, gates, DISTANCE).mean(), gates)
    direction = torch.rand(gates.shape, generator=torch.Generator().manual_seed(0)) - 0.5
    step = 1e-2
    with torch.no_grad():
        up = gated_kl(tiny, clean, gates + step * direction, DISTANCE).mean()
        down = gated_kl(tiny, clean, gates - step * direction, DISTANCE).mean()
    finite = ((up - down) / (2 * step)).item()
    analytic = (gradient * direction).sum().item()
    assert abs(finite) > 1e-3
    assert analytic == pytest.approx(finite, rel=1e-2)


def test_gates_refuse_a_spec_at_another_time_and_a_distance_past_the_trace(tiny):
    with pytest.raises(InputError, match="one eviction time"):
        hard_gates(tiny, [[EvictionSpec((3,), TIME - 1)]], TIME)
    with pytest.raises(InputError, match="runs past the trace"):
        gated_kl(tiny, _clean(tiny), full_gates(tiny, TIME), 40 - TIME)


def test_gradient_influence_ranks_the_exact_single_token_influence():
    tracer = Tracer(tiny_model("llama"))
    clean = _clean(tracer, 80)
    time = 39
    estimate = gradient_influence(tracer, clean, time, 40, samples=32).per_token()
    exact = fi_summary(scan_at(tracer, clean, time, range(time + 1), 40).kl)
    assert estimate.shape == (time + 1, 3)
    assert (estimate[["fi_near", "fi_far"]] >= 0).all().all()
    for bucket in ("fi_near", "fi_far"):
        assert stats.spearmanr(estimate[bucket], exact[bucket]).statistic > 0.6
    again = gradient_influence(tracer, clean, time, 40, samples=32).per_token()
    assert again.equals(estimate)  # the sampled continuations are seeded


def test_hard_keep_breaks_ties_towards_the_most_recent_tokens():
    theta = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]])
    assert hard_keep(theta, 3).tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0]]
    assert initial_theta(torch.tensor([[3.0, float("inf"), -1.0]])).tolist() == [[0.0, 1.0, -1.0]]


def test_set_search_never_ends_worse_than_its_starts(tiny):
    clean = _clean(tiny)
    layers = [layer for layer, window in enumerate(tiny.layout.windows) if window is None]
    starts = torch.randn(2, len(layers), tiny.layout.num_kv_heads, TIME + 1, generator=torch.Generator().manual_seed(0))
    search = SetSearch(budget=0.25, distance=DISTANCE, steps=6, starts=("a", "b"))
    optimum = optimise_gates(tiny, clean, search, starts, layers, keep=7)
    assert all(end <= start for end, start in zip(optimum.exact_kl, optimum.start_kl))
    assert optimum.exact_kl[optimum.best] == min(optimum.exact_kl)
    assert optimum.theta.shape == (len(layers), tiny.layout.num_kv_heads, TIME + 1)


def test_optimal_reports_the_exact_measurement_of_its_hard_set(tiny):
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    prefix = TIME + 1
    policy = Optimal(budget=0.25, distance=DISTANCE, steps=6, starts="uniform+h2o")
    obs = observation(tiny, ids[:prefix], [policy, H2O()], future=ids[prefix:])
    optimum = obs.set_optimum[policy.search()]
    clean = clean_run(tiny, ids[: prefix + DISTANCE], hidden=False)
    measured = {}
    for name, chosen in (("optimal", policy), ("h2o", H2O())):
        kept = kept_indices(chosen, obs, Budget.parse("0.25"))
        specs = [EvictionSpec((), TIME)] + eviction_specs(kept, obs, TIME)
        measured[name] = float(np.nanmean(evict(tiny, clean, [specs], DISTANCE, hidden=False).kl[0]))
    assert measured["optimal"] == pytest.approx(optimum.exact_kl[optimum.best], abs=1e-5)
    assert measured["h2o"] == pytest.approx(optimum.start_kl[1], abs=1e-5)  # the start is H2O's own set
    assert measured["optimal"] <= measured["h2o"] + 1e-6
    assert measured["optimal"] != pytest.approx(optimum.relaxed_kl[optimum.best], abs=1e-7)


def test_optimal_refuses_unknown_starts_and_bad_budgets():
    with pytest.raises(InputError, match="starts must be uniform or online policies"):
        Optimal(starts="uniform+oracle")
    with pytest.raises(InputError, match="budget must lie in"):
        Optimal(budget=1.5)


def test_heatmap_of_optimal_compresses_up_to_the_future_it_reads(tiny):
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    shown = heat(tiny, Trace("t", ids), "policy:optimal:distance=8:steps=2:starts=h2o", budget="0.5")
    assert np.isnan(shown.values[-8:]).all() and np.isfinite(shown.values[:-8]).all()
    assert shown.kept[-8:].all() and 0 < shown.kept[:-8].sum() < 32  # the budget evicts among the compressed


def test_gradient_comparison_tables_from_known_ranks():
    tokens = pd.DataFrame(
        {
            "document": ["a"] * 10 + ["b"] * 10,
            "exact_fi_near": np.r_[np.arange(10.0), np.arange(10.0)],
            "gradient_fi_near": np.r_[np.arange(10.0), -np.arange(10.0)],
            "exact_fi_far": np.r_[0.0, 1e-6, np.arange(2.0, 10.0), np.arange(10.0)],
            "gradient_fi_far": np.r_[np.arange(10.0) ** 2, np.arange(10.0)],
            "exact_seconds": np.r_[[30.0] * 10, [50.0] * 10],
            "gradient_seconds": [1.0] * 20,
        }
    )
    per_document = per_document_comparison(tokens).set_index("document")
    assert per_document.loc["a", "spearman_fi_near"] == pytest.approx(1)
    assert per_document.loc["b", "spearman_fi_near"] == pytest.approx(-1)
    assert per_document.top10_overlap_fi_far.tolist() == [1.0, 1.0]
    assert per_document.loc["b", "top10_overlap_fi_near"] == 0.0
    assert per_document.loc["a", "resolved_share_fi_far"] == 0.8  # 0 and 1e-6 are below RESOLVED_KL
    assert per_document.loc["a", "spearman_resolved_fi_far"] == pytest.approx(1)
    table = summary(per_document.reset_index()).iloc[0]
    assert table.n_documents == 2 and table.speed_ratio == pytest.approx(40.0)
    assert table.spearman_fi_far_mean == pytest.approx(1)


def test_search_rows_measure_optimal_exactly_beside_its_search(tiny, tmp_path):
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    task = Fidelity(prefix=TIME + 1, continuation=DISTANCE)
    rows = search_rows(tiny, "doc", ids, ["0.25", "0.5"], task, sets=tmp_path)
    assert list(rows.budget) == ["0.25", "0.5"] and (rows.policy == "optimal").all()
    assert (rows.set_kl == rows.kl).all() and (rows.summed_single_kl > 0).all()
    best = rows.apply(lambda r: r[f"kl_{r.start}"], axis=1)
    assert np.allclose(best, rows.kl, atol=1e-5)  # the reported number is the exact replay of the best start
    assert (rows[[f"kl_{s}" for s in Optimal().start_names]].min(axis=1) <= rows.kl + 1e-6).all()
    kept = load_file(sets_file(tmp_path, "doc", "0.25"))["kept"]  # [searched layers, kv_heads, tokens]
    assert kept.shape[1:] == (2, TIME + 1) and (kept.sum(dim=-1) == 7).all()  # 25% of 26, rounded up


def test_the_kept_sets_are_described_beside_h2o_infokv_and_a_fitted_distilled_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path / "home"))  # no distilled file yet
    loaded = tiny_model("llama")
    rows = optimal_rows(loaded, 1, ["0.5"], tmp_path, progress=False)
    described = describe_sets(loaded, 1, ["0.5"], tmp_path).set_index("policy")
    assert list(described.index) == ["optimal", "h2o", "infokv"] and described.document.nunique() == 1
    assert described.loc["optimal", "jaccard"] == 1.0 and (described.jaccard <= 1).all()
    assert 0 < described.loc["optimal", "position"] < 1
    deciles = described[[f"entropy_next_d{k}" for k in range(1, 11)]]
    assert ((deciles >= 0) & (deciles <= 1) | deciles.isna()).all().all()
    assert rows.kl.iloc[0] == pytest.approx(rows[f"kl_{rows.start.iloc[0]}"].iloc[0])

    # A model with a distilled weights file has its sets described too: here a score of window attention alone.
    weights = [float(name == "attention_window") for name in FEATURES]
    content = dict(bands=1, features=list(FEATURES), weights=weights, intercepts=[0.0], sinks=0)
    (tmp_path / "home" / "distilled").mkdir(parents=True)
    (tmp_path / "home" / "distilled" / file_name(loaded.name)).write_text(json.dumps(content))
    with_distilled = describe_sets(loaded, 1, ["0.5"], tmp_path).set_index("policy")
    assert list(with_distilled.index) == ["optimal", "h2o", "infokv", "distilled"]
    assert with_distilled.drop("distilled").equals(described)


def test_paired_differences_against_the_optimum():
    results = pd.DataFrame(
        [
            dict(task="fidelity", item=f"d{i}", policy=p, budget="0.1", kl=k + i)
            for i in range(3)
            for p, k in (("h2o", 0.3), ("random", 0.5))
        ]
    )
    optimal = pd.DataFrame([dict(item=f"d{i}", policy="optimal", budget="0.1", kl=0.1 + i) for i in range(3)])
    table = paired(results, optimal).set_index("policy")
    assert table.loc["h2o", "difference"] == pytest.approx(-0.2) and table.loc["random", "difference"] == pytest.approx(
        -0.4
    )
    assert (table.n_documents == 3).all() and (table.ci_high < 0).all()


def test_ranking_agreement_correlates_the_places_and_names_who_moves():
    from analyses.set_level import ranking_agreement

    on_kl = pd.DataFrame(dict(budget=0.1, policy=["optimal", "a", "b", "c"], place=[1.0, 0.6, 0.4, 0.2]))
    on_nll = pd.DataFrame(dict(budget=0.1, policy=["optimal", "a", "b", "c"], place=[1.0, 0.3, 0.5, 0.1]))
    (row,) = ranking_agreement(on_kl, on_nll).to_dict("records")
    assert row["policies"] == 4 and row["spearman"] == pytest.approx(0.8)  # one swap among four: 1 - 6*2/60
    assert row["most_moved"] == "a (2 -> 3), b (3 -> 2)"
