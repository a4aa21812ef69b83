"""The evaluation sweep: resumable per item, deterministic, with results, summary and figure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analyses.evaluate import evaluate
from analyses.tasks import Item, Task
from analyses.tasks.fidelity import Fidelity
from forward_influence.errors import InputError

from conftest import VOCAB, tiny_model


@dataclass
class SmallFidelity(Fidelity):
    """Fidelity on random token items, sized for a tiny model; counts the items it computes."""

    prefix: int = 40
    continuation: int = 20
    far_from: int = 10
    runs: int = field(default=0, repr=False)  # a counter, not a setting: left out of the cache key

    def items(self, tokenizer, n):
        g = torch.Generator().manual_seed(4)
        return [Item(f"doc{i}", torch.randint(0, VOCAB, (60,), generator=g).tolist()) for i in range(n)]

    def run(self, tracer, item, policies, budgets):
        self.runs += 1
        return super().run(tracer, item, policies, budgets)


def test_sweep_writes_tables_and_figure_and_resumes_from_its_cache(tmp_path):
    loaded = tiny_model("llama")
    task = SmallFidelity()
    summary = evaluate(loaded, [task], ["snapkv", "random"], ["0.25", "0.5"], 3, tmp_path)
    assert task.runs == 3
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 3 * 2 * 2 and set(results.item) == {"doc0", "doc1", "doc2"}
    table = pd.read_csv(summary)
    assert len(table) == 4 and (table.n_items == 3).all() and "nll_full" in table.columns
    row = table[(table.policy == "snapkv") & (table.budget == 0.25)].iloc[0]
    assert row.kl_mean == pytest.approx(results[(results.policy == "snapkv") & (results.budget == 0.25)].kl.mean())
    assert (tmp_path / "fidelity.png").is_file() and (tmp_path / "fidelity.svg").is_file()
    before = (tmp_path / "results.csv").read_text()
    evaluate(loaded, [task], ["snapkv", "random"], ["0.25", "0.5"], 3, tmp_path)
    assert task.runs == 3 and (tmp_path / "results.csv").read_text() == before  # all cached, identical
    evaluate(loaded, [task], ["snapkv", "random", "h2o"], ["0.25", "0.5"], 3, tmp_path)
    assert task.runs == 6  # only the new policy was computed, once per item


def test_same_seed_gives_identical_results_in_a_fresh_folder(tmp_path):
    loaded = tiny_model("llama")
    for folder in ("a", "b"):
        evaluate(loaded, [SmallFidelity()], ["random", "infokv"], ["0.25"], 2, tmp_path / folder)
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_bad_sweeps_are_input_errors_before_any_work(tmp_path):
    loaded = tiny_model("llama")
    for tasks, policies, budgets, message in (
        (["needles"], ["snapkv"], ["0.5"], "unknown task"),
        (["fidelity"], ["snapkv", "magic"], ["0.5"], "unknown policy"),
        (["fidelity"], ["snapkv"], ["2.5"], "ratio"),
    ):
        with pytest.raises(InputError, match=message):
            evaluate(loaded, tasks, policies, budgets, 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_findings_pick_the_best_baseline_and_pair_the_items():
    from analyses.findings import findings

    rows = []
    for item, (ours, snap, h2o, rand) in enumerate(
        [(0.10, 0.20, 0.15, 0.0), (0.30, 0.35, 0.40, 0.0), (0.20, 0.30, 0.20, 0.0)]
    ):
        for policy, value in (("infokv", ours), ("snapkv", snap), ("h2o", h2o), ("random", rand)):
            rows.append(dict(task="fidelity", budget="0.25", item=f"i{item}", policy=policy, nll_increase=value))
    table = findings(pd.DataFrame(rows))
    row = table.iloc[0]
    assert len(table) == 1 and row.baseline == "h2o"  # lowest mean NLL increase among the baselines; random is not one
    assert row.policy == "infokv" and row.policy_mean == pytest.approx(0.2) and row.baseline_mean == pytest.approx(0.25)
    difference = np.array([0.10 - 0.15, 0.30 - 0.40, 0.20 - 0.20])
    low, high = stats.t.interval(0.95, 2, loc=difference.mean(), scale=stats.sem(difference))
    assert (row.difference_mean, row.difference_ci_low, row.difference_ci_high) == pytest.approx(
        (difference.mean(), low, high)
    )


def test_findings_compare_fidelity_on_the_kl_beside_the_nll_each_against_its_best_baseline():
    from analyses.findings import findings

    # per item and policy: (nll increase, kl)
    values = {
        "distilled": [(0.30, 0.05), (0.20, 0.07)],
        "h2o": [(0.10, 0.20), (0.12, 0.22)],
        "snapkv": [(0.40, 0.10), (0.42, 0.12)],
    }
    rows = [
        dict(task="fidelity", budget="0.1", item=f"i{i}", policy=p, nll_increase=nll, kl=kl)
        for p, per_item in values.items()
        for i, (nll, kl) in enumerate(per_item)
    ]
    table = findings(pd.DataFrame(rows))
    assert list(table.metric) == ["nll_increase", "kl"] and list(table.baseline) == ["h2o", "snapkv"]
    assert table.difference_mean.to_numpy() == pytest.approx([0.14, -0.05]) and (table.policy == "distilled").all()


def test_findings_compare_long_decoding_bucket_by_bucket_each_against_its_best_baseline():
    from analyses.findings import findings

    # per item and policy: (kl over the whole generation, kl of positions 0-511, kl of 512-1023)
    values = {
        "infokv": [(0.20, 0.10, 0.30), (0.22, 0.12, 0.32)],
        "h2o": [(0.15, 0.20, 0.10), (0.17, 0.22, 0.12)],
        "snapkv": [(0.30, 0.05, 0.55), (0.32, 0.07, 0.57)],
    }
    rows = [
        dict(task="long-decode", budget="256", buffer=128, item=f"i{i}", policy=p, kl=kl, kl_0_511=a, kl_512_1023=b)
        for p, per_item in values.items()
        for i, (kl, a, b) in enumerate(per_item)
    ]
    table = findings(pd.DataFrame(rows).sample(frac=1, random_state=0, axis="columns"))
    assert list(table.metric) == ["kl", "kl_0_511", "kl_512_1023"]  # the whole generation first, then by position
    assert list(table.baseline) == ["h2o", "snapkv", "h2o"]  # each bucket's own best baseline
    assert table.difference_mean.to_numpy() == pytest.approx([0.05, 0.05, 0.20])
    assert (table.policy == "infokv").all() and (table.n_items == 2).all()


def test_shards_fill_one_cache_that_a_plain_run_merges_into_the_same_tables(tmp_path):
    loaded = tiny_model("llama")
    whole = evaluate(loaded, [SmallFidelity()], ["snapkv", "random"], ["0.5"], 3, tmp_path / "whole")
    task = SmallFidelity()
    for shard in ((0, 2), (1, 2)):
        assert evaluate(loaded, [task], ["snapkv", "random"], ["0.5"], 3, tmp_path / "shards", shard=shard).is_dir()
    assert task.runs == 3 and not (tmp_path / "shards" / "summary.csv").exists()  # each item once, no table yet
    merged = evaluate(loaded, [task], ["snapkv", "random"], ["0.5"], 3, tmp_path / "shards")
    assert task.runs == 3  # the merge computes nothing
    assert merged.read_text() == whole.read_text()
    assert (tmp_path / "shards" / "results.csv").read_text() == (tmp_path / "whole" / "results.csv").read_text()


def test_a_budget_a_task_cannot_apply_is_refused_before_any_forward_pass(tmp_path, monkeypatch):
    loaded = tiny_model("llama")

    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran before the budgets were checked")

    monkeypatch.setattr(type(loaded.model), "forward", refuse)
    for budget, message in (
        ("prompt+0.5", "budget prompt+0.5 grows while decoding"),
        ("41", "budget of 41 tokens is larger than fidelity item 'doc0' (40 tokens)"),
    ):
        with pytest.raises(InputError, match=re.escape(message)):
            evaluate(loaded, [SmallFidelity()], ["snapkv"], ["0.5", budget], 2, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_decoding_task_holds_its_prompt_and_its_new_tokens():
    from analyses.tasks import check_budgets
    from analyses.tasks.long_decode import LongDecode, packaged_references
    from analyses.tasks.needle import Needle

    item = Item("a", [1] * 10)
    check_budgets(Needle(max_new_tokens=16), [item], ["prompt+0.5", "26"], "any")  # the whole cache may be kept
    with pytest.raises(InputError, match=re.escape("larger than needle item 'a' (26 tokens)")):
        check_budgets(Needle(max_new_tokens=16), [item], ["27"], "any")
    packaged = next(iter(packaged_references("smollm2-135m-instruct").values()))["settings"]["new_tokens"]
    assert LongDecode().capacity(item, "smollm2-135m-instruct") == 10 + packaged
    assert LongDecode(new_tokens=64).capacity(item, "a-model-without-references") == 10 + 64


def test_merged_sweeps_equal_one_sweep_of_every_policy(tmp_path):
    from analyses.merge import merge

    loaded = tiny_model("llama")
    for folder, policies in (("a", ["snapkv"]), ("b", ["random", "h2o"]), ("both", ["snapkv", "random", "h2o"])):
        evaluate(loaded, [SmallFidelity()], policies, ["0.25", "0.5"], 2, tmp_path / folder)
    summary = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", model="tiny-llama")
    keys = ["policy", "budget"]
    for name in ("results.csv", "summary.csv"):
        merged = pd.read_csv(tmp_path / "merged" / name).sort_values([*keys, "item"] if name == "results.csv" else keys)
        one = pd.read_csv(tmp_path / "both" / name).sort_values([*keys, "item"] if name == "results.csv" else keys)
        pd.testing.assert_frame_equal(merged.reset_index(drop=True), one.reset_index(drop=True))
    assert summary == tmp_path / "merged" / "summary.csv" and (tmp_path / "merged" / "fidelity.png").is_file()
    with pytest.raises(InputError, match="policy 'snapkv' at budget 0.25 is in more than one sweep"):
        merge([tmp_path / "a", tmp_path / "both"], tmp_path / "twice")
    with pytest.raises(InputError, match="no results.csv"):
        merge([tmp_path / "a", tmp_path / "nowhere"], tmp_path / "missing")


class PlainFidelity(Task):
    """SmallFidelity as a plain class, not a dataclass: its cache key must be written, not read off a repr."""

    name, metrics, labels, prefix, continuation, far_from = "fidelity", Fidelity.metrics, Fidelity.labels, 40, 20, 10
    capacity = Fidelity.capacity

    def __init__(self, key: str | None = None):
        self.key, self.calls = key, 0

    def items(self, tokenizer, n):
        return SmallFidelity().items(tokenizer, n)

    def run(self, tracer, item, policies, budgets):
        self.calls += 1
        return Fidelity.run(self, tracer, item, policies, budgets)

    def cache_key(self):
        return self.key if self.key is not None else super().cache_key()


def test_a_task_that_is_not_a_dataclass_names_its_cache_key(tmp_path):
    loaded = tiny_model("llama")
    with pytest.raises(TypeError, match="task 'fidelity' is not a dataclass: it must define cache_key"):
        evaluate(loaded, [PlainFidelity()], ["snapkv"], ["0.5"], 2, tmp_path)
    task = PlainFidelity("plain fidelity 40+20")
    evaluate(loaded, [task], ["snapkv"], ["0.5"], 2, tmp_path)
    evaluate(loaded, [task], ["snapkv"], ["0.5"], 2, tmp_path)
    assert task.calls == 2  # the second sweep read both items from the cache
