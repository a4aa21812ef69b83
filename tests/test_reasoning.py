"""The reasoning task: decode-time compression compared with the full-cache completion."""

from __future__ import annotations

import pytest

from analyses.tasks.reasoning import Reasoning, prefix_agreement
from forward_influence.errors import InputError
from forward_influence.tracer import Tracer
from kv_compression.policies import SnapKV, StreamingLLM

from conftest import tiny_model, tiny_tokenizer


def test_prefix_agreement_counts_the_tokens_before_the_first_difference():
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3]) == 1.0 and prefix_agreement([], [5]) == 1.0


def test_decode_time_compression_is_compared_with_the_full_completion():
    loaded = tiny_model("llama")
    tracer = Tracer(loaded)
    task = Reasoning(max_new_tokens=40, buffer=4)
    (item,) = task.items(loaded.tokenizer, 1)
    assert item.id == "p001" and item.meta["answer"] == 34
    capacity = str(len(item.token_ids) + 40)
    rows = task.run(tracer, item, {"snapkv": SnapKV(window=4), "streaming": StreamingLLM()}, ["8", capacity])
    assert len(rows) == 4
    large = [r for r in rows if r["budget"] == capacity]
    # A budget of prompt + new tokens never evicts: the completion is the full-cache one.
    assert all(r["prefix_agreement"] == 1.0 and r["similarity"] == 1.0 for r in large)
    small = [r for r in rows if r["budget"] == "8"]
    assert any(r["prefix_agreement"] < 1.0 for r in small)
    with pytest.raises(InputError, match="larger than the prompt plus the new tokens"):  # one more never evicts either
        task.run(tracer, item, {"snapkv": SnapKV(window=4)}, [str(len(item.token_ids) + 41)])


def test_every_problem_of_the_file_is_an_item():
    items = Reasoning().items(tiny_tokenizer(), 1000)
    assert len(items) == 72 and all(isinstance(i.meta["answer"], int) for i in items)
