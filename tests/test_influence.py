"""Per-token scan, influence tables and their statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from forward_influence.errors import InputError
from forward_influence.measure import InfluenceSettings, influence_by_distance, summarize
from forward_influence.scan import fi_summary, naive_token_kl, scan, scan_divergence
from forward_influence.stats import bucket_bounds, by_bucket, mean_ci, parse_edges
from forward_influence.tracer import Tracer
from forward_influence.traces import Trace

from conftest import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llama():
    return Tracer(tiny_model("llama"))


def _ids(n=48, seed=5):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_scan_equals_naive_full_recompute_per_token(kind):
    tracer = Tracer(tiny_model(kind))
    ids = _ids()
    fast = scan_divergence(tracer, ids, start=20, end=30, max_distance=12, batch_size=4).kl
    naive = np.stack([naive_token_kl(tracer, ids, j, 12) for j in range(20, 30)])
    np.testing.assert_allclose(fast, naive, atol=3e-6)
    assert np.nanmax(naive) > 1e-4  # evictions do change the future


def test_scan_rows_summarise_near_far_and_total(llama):
    ids = _ids(80)
    frame = scan(llama, ids, 10, 14, max_distance=40, batch_size=3)
    assert list(frame.columns) == ["position", "token", "fi_near", "fi_far", "fi_total"]
    kl = scan_divergence(llama, ids, 10, 14, 40, batch_size=3).kl
    np.testing.assert_allclose(frame.fi_near, kl[:, :8].mean(1), rtol=1e-6)
    np.testing.assert_allclose(frame.fi_far, kl[:, 32:].mean(1), rtol=1e-6)
    np.testing.assert_allclose(frame.fi_total, kl.sum(1), rtol=1e-6)
    assert fi_summary(kl[:, :20]).fi_far.isna().all()  # D <= 32 has no far distances


def test_scan_rejects_a_range_outside_the_trace(llama):
    with pytest.raises(InputError, match="scan range"):
        scan_divergence(llama, _ids(20), 10, 25, 4)
    last = scan_divergence(llama, _ids(20), 17, 20, 4).kl  # the last token has no future: NaN
    assert not np.isnan(last[:2, 0]).any() and np.isnan(last[2]).all() and np.isnan(last[1, 2:]).all()


def test_influence_table_has_every_selection_and_bucket(llama):
    traces = [Trace(f"doc{i}", _ids(60, seed=i)) for i in range(3)]
    settings = InfluenceSettings(fraction=0.2, evict_at=30, sinks=1)
    per_distance = influence_by_distance(
        llama, traces, ["entropy", "attention", "h2o", "random"], settings, progress=False
    )
    assert set(per_distance.selection) == {"entropy_next", "attention_snapkv", "attention_h2o", "random"}
    assert per_distance.distance.min() == 1 and per_distance.distance.max() == 29
    table = summarize(per_distance, edges=(1, 9, 17))
    assert list(table.columns) == [
        "selection",
        "bucket",
        "distance_lo",
        "distance_hi",
        "kl_mean",
        "kl_ci_low",
        "kl_ci_high",
        "top1_agreement",
        "hidden_cos_mean",
        "hidden_rel_l2_mean",
        "n_documents",
        *[
            f"hidden_cos_{band}_{stat}"
            for band in ("early", "middle", "late")
            for stat in ("mean", "ci_low", "ci_high")
        ],
    ]
    assert len(table) == 4 * 3 and set(table.bucket) == {"1-8", "9-16", "17+"}
    row = table[(table.selection == "random") & (table.bucket == "1-8")].iloc[0]
    doc_means = (
        per_distance[(per_distance.selection == "random") & (per_distance.distance <= 8)].groupby("document").kl.mean()
    )
    assert row.kl_mean == pytest.approx(doc_means.mean())
    interval = stats.bootstrap(
        (doc_means.to_numpy(),), np.mean, n_resamples=9999, method="percentile", random_state=0
    ).confidence_interval  # a KL: the percentile bootstrap
    assert (row.kl_ci_low, row.kl_ci_high) == pytest.approx((interval.low, interval.high))
    assert row.kl_ci_low >= 0
    assert row.n_documents == 3
    # Layer bands of the 4-layer model: layers {0, 1}, {2}, {3}; their mean is the all-layer mean.
    bands = per_distance[["hidden_cos_early", "hidden_cos_middle", "hidden_cos_late"]].to_numpy()
    assert np.allclose(bands @ np.array([2, 1, 1]) / 4, per_distance.hidden_cos)
    late = per_distance[(per_distance.selection == "random") & (per_distance.distance <= 8)]
    assert row.hidden_cos_late_mean == pytest.approx(late.groupby("document").hidden_cos_late.mean().mean())


def test_eviction_time_beyond_the_trace_is_an_input_error(llama):
    with pytest.raises(InputError, match="beyond trace"):
        influence_by_distance(
            llama, [Trace("short", _ids(20))], ["random"], InfluenceSettings(evict_at=19), progress=False
        )


def test_buckets_and_intervals():
    assert bucket_bounds((1, 9, 33)) == [(1, 8), (9, 32), (33, None)]
    assert parse_edges("1,9,33,129,513") == (1, 9, 33, 129, 513)
    with pytest.raises(ValueError):
        parse_edges("0,5")
    mean, low, high = mean_ci([-1.0, 2.0, 3.0, np.nan])
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 2, loc=mean, scale=stats.sem([-1, 2, 3])))
    assert np.isnan(mean_ci([4.0])[1])
    frame = pd.DataFrame({"document": "d", "selection": "s", "distance": [1, 2, 9, 40], "kl": [1.0, 3.0, 5.0, 7.0]})
    buckets = by_bucket(frame, ["kl"], (1, 9, 33))
    assert buckets.kl.tolist() == [2.0, 5.0, 7.0]


def test_caller_selectors_choose_the_evicted_set(llama):
    trace = Trace("doc", _ids(50))
    settings = InfluenceSettings(evict_at=25, max_distance=10)
    chosen = {"none": lambda trace, signals, t: [], "recent": lambda trace, signals, t: range(t - 4, t + 1)}
    frame = influence_by_distance(llama, [trace], ["none", "recent"], settings, selectors=chosen, progress=False)
    kl = frame.pivot(index="distance", columns="selection", values="kl")
    assert kl.none.max() < 1e-5 and (kl.recent > 1e-3).all()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_a_suffix_read_in_pieces_equals_one_pass(kind):
    from forward_influence.eviction import EvictionSpec
    from forward_influence.influence import clean_run, evict

    tracer = Tracer(tiny_model(kind))
    clean = clean_run(tracer, _ids(90))
    specs = [EvictionSpec((5, 9, 20), 30), EvictionSpec((3,), 25), [EvictionSpec((7,), 30, layers=(1,), heads=(0,))]]
    whole = evict(tracer, clean, specs, 59, batch_size=2)
    pieces = evict(tracer, clean, specs, 59, batch_size=2, chunk=7)
    np.testing.assert_allclose(pieces.kl, whole.kl, atol=1e-5)
    np.testing.assert_allclose(pieces.hidden_cos, whole.hidden_cos, atol=1e-5)
    assert np.nanmax(whole.kl) > 1e-3


def test_a_pass_with_a_cache_is_refused_remotely_before_any_request(llama):
    from transformers import DynamicCache

    ids = torch.tensor([_ids(8)])
    for kwargs in (dict(use_cache=True), dict(cache=DynamicCache())):
        with pytest.raises(InputError, match="cannot run remotely on NDIF"):
            llama.run(ids, remote=True, **kwargs)
