"""The analyses: POS mapping, selections, attention vs entropy, influence by distance, compare."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analyses import attention_vs_entropy as ave
from analyses import cache, compare, influence_by_distance, pos, selections
from analyses.documents import per_document
from forward_influence.errors import InputError
from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.observation import observe
from forward_influence.stats import mean_ci
from forward_influence.traces import Trace
from kv_compression.budget import Budget
from kv_compression.policies import InfoKV

from conftest import tiny_model


def _trace(n: int, seed: int = 0, name: str = "doc") -> Trace:
    g = torch.Generator().manual_seed(seed)
    return Trace(name, torch.randint(1, 96, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def llama():
    from forward_influence.tracer import Tracer

    return Tracer(tiny_model("llama"))


@pytest.mark.slow
def test_subword_tokens_take_the_tag_of_their_word(embedded):
    tok = embedded.tokenizer
    ids = tok("The quick foxes jumped over the unbelievably lazy dogs.")["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    tags = dict(zip(pieces, pos.token_pos(tok, ids)))
    assert tags["The"] == "DET" and tags[" foxes"] == "NOUN" and tags[" jumped"] == "VERB" and tags[" over"] == "ADP"
    word = [p for p in pieces if p.strip() and p.strip() in "unbelievably" and p != " the"]
    assert len(word) > 1 and {tags[p] for p in word} == {"ADV"}  # one word, several tokens, one tag
    assert [pos.word_class(t) for t in ("NOUN", "AUX", "PUNCT")] == ["content", "function", "other"]


def test_kept_sets_keep_sinks_and_window_then_the_best_ranked():
    ranking = {"up": np.arange(100.0), "down": -np.arange(100.0), "random": None}
    kept = selections.kept_sets(ranking, Budget(0.5), 99, sinks=4, window=10)
    protected = set(range(4)) | set(range(90, 100))
    assert all(len(k) == 50 and protected <= set(k) for k in kept.values())
    assert set(kept["up"]) - protected == set(range(54, 90))
    assert set(kept["down"]) - protected == set(range(4, 40))
    assert kept["random"] == selections.kept_sets({"random": None}, Budget(0.5), 99, sinks=4, window=10)["random"]
    assert selections.jaccard(kept["up"], kept["down"]) == pytest.approx(14 / 86)
    counted = selections.kept_sets(ranking, Budget(30, "count"), 99, sinks=4, window=10)
    assert set(counted["up"]) - protected == set(range(74, 90))  # a count keeps 30: 14 protected + 16 best
    with pytest.raises(InputError, match="larger than the sequence"):
        selections.kept_sets(ranking, Budget(101, "count"), 99)


def test_policy_scores_average_layers_and_heads_and_leave_protected_tokens_unranked(llama):
    ids = _trace(60).token_ids
    policy = InfoKV(window=8, sinks=2)
    got = selections.policy_scores(llama, ids, policy)
    obs = observe(llama, ids, policy.reads())
    expected = torch.stack([policy.score(obs, l)[0] for l in range(4)]).mean(dim=(0, 1)).numpy()
    assert np.isnan(got[:2]).all() and np.isnan(got[-8:]).all()
    assert np.allclose(got[2:-8], expected[2:-8], atol=1e-6)


def test_attention_vs_entropy_numbers_are_the_definitions(llama):
    trace = _trace(80, name="d0")
    names = ["entropy_next", "attention_snapkv", "evolution", "random"]
    frame = ave.document_frame(llama, trace, names, [0.1, 0.25])
    ranking = selections.scores(llama, trace.token_ids, names)
    sets = selections.top_sets(ranking, 0.25, 79)
    value = frame.set_index(["kind", "a", "b", "fraction"]).value
    assert value[("jaccard", "entropy_next", "evolution", 0.25)] == pytest.approx(
        selections.jaccard(sets["entropy_next"], sets["evolution"])
    )
    assert value[("age", "attention_snapkv", "", 0.25)] == pytest.approx(
        np.mean([79 - p for p in sets["attention_snapkv"]])
    )
    rho = stats.spearmanr(ranking["entropy_next"][4:], ranking["evolution"][4:]).statistic
    spearman = frame[(frame.kind == "spearman") & (frame.a == "entropy_next") & (frame.b == "evolution")]
    assert spearman.value.item() == pytest.approx(rho)
    whole = frame[frame.a == ave.WHOLE].set_index("kind").value
    assert whole[["content", "function", "other"]].sum() == pytest.approx(1.0)
    assert not (frame.kind == "spearman").any() or "random" not in set(frame[frame.kind == "spearman"].a)

    second = ave.document_frame(llama, _trace(80, seed=1, name="d1"), names, [0.1, 0.25])
    table = ave.summarize(pd.concat([frame, second]))
    row = table[(table.kind == "age") & (table.a == "evolution") & (table.fraction == 0.1)].iloc[0]
    both = [f[(f.kind == "age") & (f.a == "evolution") & (f.fraction == 0.1)].value.item() for f in (frame, second)]
    assert (row.value_mean, row.value_ci_low, row.value_ci_high) == pytest.approx(mean_ci(both))
    assert table[table.kind == "spearman"].fraction.isna().all() and (table.n_documents == 2).all()


def test_per_document_cache_resumes_and_recomputes_on_new_settings(tmp_path):
    calls = []

    def compute(trace):
        calls.append(trace.id)
        return pd.DataFrame({"document": [trace.id], "value": [np.random.default_rng(len(calls)).random()]})

    docs = [_trace(5, seed=i, name=f"essay:d{i}") for i in range(2)]
    first = per_document(docs, compute, tmp_path, {"a": 1}, progress=False)
    again = per_document(docs, compute, tmp_path, {"a": 1}, progress=False)
    assert calls == ["essay:d0", "essay:d1"] and first.equals(again)  # read back bit for bit
    per_document(docs, compute, tmp_path, {"a": 2}, progress=False)
    per_document([Trace("essay:d0", [1, 2, 3])], compute, tmp_path, {"a": 2}, progress=False)  # other tokens
    assert calls == ["essay:d0", "essay:d1", "essay:d0", "essay:d1", "essay:d0"]


def test_a_cache_in_the_way_or_with_a_foreign_schema_is_refused_by_name(tmp_path):
    key = {"a": 1}
    (tmp_path / "folder.parquet").mkdir()
    with pytest.raises(InputError, match="folder.parquet is in the way of a cache file"):
        cache.read(tmp_path / "folder.parquet", key)
    cache.write(tmp_path / "item.parquet", key, pd.DataFrame({"policy": ["snapkv"], "budget": ["0.5"]}))
    assert cache.read(tmp_path / "item.parquet", key, columns=("policy",)).policy.tolist() == ["snapkv"]
    with pytest.raises(InputError, match="item.parquet lacks the columns settings of this cache"):
        cache.read(tmp_path / "item.parquet", key, columns=("policy", "budget", "settings"))
    assert cache.read(tmp_path / "item.parquet", {"a": 2}, columns=("settings",)) is None  # other settings


def test_token_tables_rank_a_signal_that_orders_far_influence():
    rows = []
    for d in range(3):
        x = np.random.default_rng(d).random(50)
        rows.append(
            pd.DataFrame(
                {"document": f"d{d}", "position": range(50), "fi_near": 1 - x, "fi_far": 2 * x, "good": x, "bad": -x}
            )
        )
    deciles, correlations, paired = influence_by_distance.token_tables(pd.concat(rows), ["good", "bad"], ["bad"])
    rho = correlations.set_index(["signal", "target"]).spearman_mean
    assert rho[("good", "fi_far")] == pytest.approx(1) and rho[("bad", "fi_far")] == pytest.approx(-1)
    assert rho[("good", "fi_near")] == pytest.approx(-1)
    # good - bad on each document: +2 for fi_far, -2 for fi_near, the same on all three (a zero-width interval)
    assert paired[["signal", "against", "target", "n"]].values.tolist() == [
        ["good", "bad", "fi_far", 3],
        ["good", "bad", "fi_near", 3],
    ]
    assert paired.difference_mean.tolist() == pytest.approx([2, -2])
    assert paired.difference_ci_low.tolist() == pytest.approx([2, -2])
    good = deciles[deciles.signal == "good"].sort_values("decile")
    assert len(good) == 10 and good.fi_far_mean.is_monotonic_increasing and (good.n == 3).all()


def test_influence_by_distance_run_writes_every_table(llama, tmp_path):
    from forward_influence.measure import InfluenceSettings

    traces = [_trace(90, seed=i, name=f"d{i}") for i in range(2)]
    settings = InfluenceSettings(fraction=0.1, evict_at=50, sinks=2, window=8)
    tables = influence_by_distance.run(
        tiny_model("llama"), traces, tmp_path, settings=settings, scan_tokens=12, scan_distance=36, progress=False
    )
    assert set(tables["influence"].selection) == set(influence_by_distance.DEFAULT_SELECTIONS)
    assert set(zip(tables["per_token_paired"].signal, tables["per_token_paired"].against)) == {
        (s, a)
        for s in ("entropy_next", "entropy_generated", "evolution", "infokv")
        for a in ("attention_snapkv", "attention_h2o")
    }
    per_token = tables["per_token"]
    assert len(per_token) == 2 * 12 and per_token.position.min() == 38 and per_token.fi_far.notna().all()
    for name in (
        "influence",
        "influence_per_distance",
        "per_token",
        "per_token_deciles",
        "per_token_correlations",
        "per_token_paired",
    ):
        assert (tmp_path / f"{name}.csv").is_file()
    assert (tmp_path / "influence.png").is_file() and (tmp_path / "per_token.png").is_file()
    before = {
        name: (tmp_path / f"{name}.csv").read_bytes()
        for name in ("influence", "per_token_correlations", "per_token_paired")
    }
    fresh = tmp_path / "fresh"  # a rerun from scratch, no cache: identical CSVs
    influence_by_distance.run(
        tiny_model("llama"), traces, fresh, settings=settings, scan_tokens=12, scan_distance=36, progress=False
    )
    assert {name: (fresh / f"{name}.csv").read_bytes() for name in before} == before


def test_compare_evicts_each_complement_and_measures_it(llama, tmp_path):
    trace = _trace(140, name="d0")
    frame = compare.document_frame(llama, trace, Budget(0.5), evict_at=100)
    assert list(frame.selection) == list(compare.COMPARED) and (frame.kept == math.ceil(0.5 * 101)).all()
    ranking = selections.scores(llama, trace.token_ids[:101], ["attention_h2o"])
    kept = selections.kept_sets(ranking, Budget(0.5), 100)["attention_h2o"]
    spec = EvictionSpec(tuple(sorted(set(range(101)) - set(kept))), 100)
    kl = evict(llama, clean_run(llama, trace.token_ids, hidden=False), [spec], 39, hidden=False).kl[0]
    row = frame.set_index("selection").loc["attention_h2o"]
    assert row.fi_near == pytest.approx(kl[:8].mean()) and row.fi_far == pytest.approx(kl[32:].mean())
    assert row.jaccard_attention_h2o == 1.0
    with pytest.raises(InputError, match="^evict_at 139 is beyond trace"):
        compare.document_frame(llama, trace, Budget(0.5), evict_at=139)


def test_demo_writes_one_self_contained_report(tmp_path):
    from analyses.demo import run_demo

    path = run_demo(tiny_model("llama"), tmp_path, docs=2, max_tokens=200, evict_at=120)
    page = path.read_text()
    assert path == tmp_path / "report.html"
    assert [
        h in page
        for h in (
            "1. Influence by distance",
            "2. Attention vs entropy",
            "3. Selections at a 25% budget",
            "4. Token heatmap",
            "Summary",
        )
    ] == [True] * 5
    assert page.count("data:image/png;base64,") == 3 and page.count("<iframe srcdoc=") == 1
    for name in (
        "influence/influence.csv",
        "attention_vs_entropy/attention_vs_entropy.csv",
        "compare/compare.csv",
        "heatmap.html",
    ):
        assert (tmp_path / name).is_file()


def test_compare_cli_rejects_a_bad_budget_in_one_line(capsys):
    from forward_influence_cli.main import main

    assert main(["compare", "essay:gap", "--budget", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "budget ratio must lie in (0, 1]" in err and len(err.splitlines()) == 1


def test_evaluation_documents_are_full_length_segments_spread_over_essays():
    from analyses.documents import essay_segments
    from forward_influence import corpus
    from forward_influence.traces import read_traces

    tokenizer = tiny_model("llama").tokenizer
    essays = {n: read_traces(f"essay:{n}", tokenizer)[0].token_ids for n in corpus.essay_names("evaluation")}
    long_enough = [n for n, ids in essays.items() if len(ids) >= 600]
    docs = essay_segments(tokenizer, len(long_enough) + 2, 600)
    assert all(len(d) == 600 for d in docs)
    assert [d.id for d in docs[: len(long_enough)]] == [f"essay:{n}" for n in long_enough]  # first segments first
    second = docs[len(long_enough)]
    name = second.id.removeprefix("essay:").removesuffix("#2")
    assert second.id.endswith("#2") and second.token_ids == essays[name][600:1200]
    total = sum(len(ids) // 600 for ids in essays.values())
    with pytest.raises(InputError, match=f"hold only {total} documents of 600 tokens"):
        essay_segments(tokenizer, total + 1, 600)


def test_far_influence_averages_buckets_per_essay_then_across_essays(tmp_path):
    from analyses import far_influence

    g = torch.Generator().manual_seed(0)
    traces = [Trace(f"d{i}", torch.randint(0, 96, (300 + 60 * i,), generator=g).tolist()) for i in range(3)]
    tables = far_influence.run(tiny_model("llama"), tmp_path, prefix=100, chunk=37, traces=traces, progress=False)
    table, paired, frame = tables["far_influence"], tables["far_influence_paired"], tables["far_influence_per_document"]
    assert list(table.columns) == [
        "selection",
        "bucket_start",
        "bucket_end",
        "kl_mean",
        "kl_ci_low",
        "kl_ci_high",
        "n_documents",
    ]
    assert set(table.selection) == set(far_influence.FAR_SELECTIONS) and (table.kl_ci_low >= 0).all()
    assert table.set_index(["selection", "bucket_start"]).n_documents.loc[("random", 1)] == 3
    assert table.set_index(["selection", "bucket_start"]).n_documents.loc[("random", 129)] == 2  # a full bucket only
    first = frame[(frame.selection == "infokv") & (frame.bucket_start == 1)]
    assert table.set_index(["selection", "bucket_start"]).kl_mean.loc[("infokv", 1)] == pytest.approx(first.kl.mean())
    full = frame[(frame.bucket_start == 129) & (frame.bucket_end == 256)]  # partial buckets are left out
    wide = full.pivot(index="document", columns="selection", values="kl")
    row = paired[(paired.against == "attention_h2o") & (paired.bucket_start == 129)].iloc[0]
    assert row.difference_mean == pytest.approx((wide.entropy_generated - wide.attention_h2o).mean())
    assert (tmp_path / "far_influence.png").is_file()
    model = tiny_model("llama")  # the named essays only, read back from the cache
    chosen = far_influence.run(model, tmp_path, prefix=100, chunk=37, traces=traces, progress=False, essays=["d2"])
    pd.testing.assert_frame_equal(
        chosen["far_influence_per_document"], frame[frame.document == "d2"].reset_index(drop=True)
    )
    with pytest.raises(InputError, match="--essays: d9 not among the essays with 2148"):
        far_influence.run(model, tmp_path, prefix=100, chunk=37, traces=traces, progress=False, essays=["d9"])


def test_headroom_places_each_policy_between_random_and_the_oracle(tmp_path):
    from analyses.headroom import headroom, interaction, plot_headroom

    rows = [
        dict(task="fidelity", item=f"d{i}", policy=p, budget="0.25", nll_increase=v)
        for i, (r, s, h) in enumerate([(0.4, 0.3, 0.2), (0.6, 0.5, 0.3), (0.5, 0.35, 0.25)])
        for p, v in (("random", r), ("snapkv", s), ("h2o", h))
    ]
    oracle = pd.DataFrame(
        [
            dict(item=f"d{i}", policy="oracle", budget="0.25", nll_increase=v, set_kl=k, summed_single_kl=2 * k)
            for i, (v, k) in enumerate([(0.1, 1.0), (0.2, 2.0), (0.15, 3.0)])
        ]
    )
    table = headroom(pd.DataFrame(rows), oracle).set_index("policy")
    assert table.loc["random", "place"] == pytest.approx(0) and table.loc["oracle", "place"] == pytest.approx(1)
    assert table.loc["snapkv", "place"] == pytest.approx((0.5 - 0.38333333) / (0.5 - 0.15))  # means over the documents
    assert table.loc["h2o", "place_ci_low"] <= table.loc["h2o", "place"] <= table.loc["h2o", "place_ci_high"]
    ratio = interaction(oracle).iloc[0]
    assert ratio.ratio == pytest.approx(2.0 / 4.0)  # the set costs half its tokens' sum here (ratio of the means)
    assert ratio.ratio_ci_low <= ratio.ratio <= ratio.ratio_ci_high
    drawn = plot_headroom(table.reset_index(), "headroom", tmp_path / "headroom")
    assert [p.name for p in drawn] == ["headroom.png", "headroom.svg"] and all(p.stat().st_size for p in drawn)


def test_headroom_names_a_missing_results_file_in_one_line(tmp_path, capsys):
    from analyses.headroom import main

    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "results.csv")])
    assert exit.value.code == 2
    assert f"results: no such file: {tmp_path / 'results.csv'}" in capsys.readouterr().err


def test_headroom_refuses_one_document_before_the_model_loads(tmp_path, capsys):
    from analyses.headroom import main

    results = tmp_path / "results.csv"
    results.write_text("task,item,policy,budget,nll_increase\n")
    with pytest.raises(SystemExit) as exit:
        main([str(results), "--docs", "1", "--model", "no-such-model"])
    assert exit.value.code == 2
    assert "--docs: the intervals over documents need at least 2, not 1" in capsys.readouterr().err


def test_a_sweep_of_thirteen_policies_gets_thirteen_colours():
    import seaborn as sns

    from analyses.plotting import distinct_palette

    few, many = distinct_palette(["a", "b", "a"]), distinct_palette([f"p{i}" for i in range(13)])
    assert few == dict(zip("ab", sns.color_palette("colorblind", 2)))  # first-seen order, duplicates once
    assert len(many) == 13 and len(set(many.values())) == 13
    assert len(set(distinct_palette([f"p{i}" for i in range(24)]).values())) == 24
