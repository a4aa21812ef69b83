"""The long-decoding task: references generated once and kept, replayed exactly through the compressing runtime."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analyses.evaluate import evaluate
from analyses.tasks.long_decode import LongDecode, bucket_labels, prompts, repeated_ngrams, user_references

from conftest import tiny_model, tiny_tokenizer


def test_prompts_alternate_problems_and_essays_and_grow_by_appending():
    first = prompts(tiny_tokenizer(), 4, essay_prompt=16)
    assert [p.kind for p in first] == ["problem", "essay", "problem", "essay"]
    assert [p.id for p in prompts(tiny_tokenizer(), 6, essay_prompt=16)][:4] == [p.id for p in first]
    assert len(first[1].token_ids) == 16 and first[0].id == "p001"


def test_repeated_ngrams_and_position_buckets():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 5 four-grams, one repeats
    assert bucket_labels(1024) == [(0, 512, "0_511"), (512, 1024, "512_1023")]
    assert bucket_labels(2048)[-1] == (1024, 2048, "1024_2047")


def test_the_sweep_replays_each_reference_and_writes_position_buckets(tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_INFLUENCE_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    task = LongDecode(new_tokens=48, horizon=4, essay_prompt=16, buffer=8)
    summary = evaluate(loaded, [task], ["snapkv", "h2o"], ["24", "prompt+0.5"], 2, tmp_path / "out")
    results = pd.read_csv(tmp_path / "out" / "results.csv", dtype={"budget": str})
    assert len(results) == 2 * 2 * 2 and set(results.buffer) == {8}
    assert (results.kl >= 0).all() and results.agreement_tokens.between(0, 4).all()
    assert {"kl_0_47", "nll_increase_0_47"} <= set(results.columns)
    assert np.allclose(results.kl, results.kl_0_47)  # one bucket: 48 generated tokens
    table = pd.read_csv(summary)
    assert {"buffer", "generated_tokens", "repeated_4grams_full", "kl_mean"} <= set(table.columns)
    assert (table.n_items == 2).all()
    assert (tmp_path / "out" / "long-decode.png").is_file()
    stored = [json.loads(line) for line in user_references(loaded.name).read_text().splitlines()]
    assert [len(r["generated_ids"]) for r in stored] == [48, 48]  # generated once, kept for the next run
    before = user_references(loaded.name).read_text()
    evaluate(
        loaded,
        [LongDecode(new_tokens=48, horizon=4, essay_prompt=16, buffer=16)],
        ["snapkv"],
        ["24"],
        2,
        tmp_path / "again",
    )
    assert user_references(loaded.name).read_text() == before  # another sweep reuses the references


@pytest.mark.slow
def test_the_documented_command_runs_on_the_packaged_references(tmp_path, capsys):
    from forward_influence_cli.main import main

    out = tmp_path / "long"
    code = main(
        [
            "eval",
            "--task",
            "long-decode",
            "--policies",
            "infokv,rkv,h2o",
            "--budgets",
            "256",
            "--docs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == str(out / "summary.csv")
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 3 and (results.generated_tokens == 2048).all() and (results.prompt_tokens == 108).all()
    assert {"kl_0_511", "kl_512_1023", "kl_1024_2047"} <= set(results.columns) and (out / "long-decode.png").is_file()
