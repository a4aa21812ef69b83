"""The passkey retrieval task: items, answers and rows against the full-cache reference."""

from __future__ import annotations

import pytest

from analyses.tasks.needle import Needle, first_integer, with_needle
from kv_compression.policies import SnapKV


def test_the_needle_sits_at_a_sentence_end_near_its_depth():
    text = "One two. Three four. Five six. Seven eight. Nine ten."
    placed = with_needle(text, 0.5, 12345)
    assert "The secret passkey is 12345." in placed
    before = placed.split("The secret passkey")[0]
    assert before.endswith(". ") and abs(len(before) - len(text) / 2) < 12
    assert first_integer("The secret passkey is 31415.") == 31415 and first_integer("none") is None


@pytest.mark.slow
def test_needle_items_are_answered_and_scored_against_the_full_cache(embedded):
    task = Needle(lengths=(500,), depths=(0.5,))
    (item,) = task.items(embedded.tokenizer, 1)
    assert item.meta["length"] == 500 and str(item.meta["passkey"]) in embedded.tokenizer.decode(item.token_ids)
    rows = task.run(embedded, item, {"snapkv": SnapKV()}, ["0.5"])
    assert len(rows) == 1 and rows[0]["correct_full"] == 1.0  # the embedded model retrieves with a full cache
    assert rows[0]["correct"] in (0.0, 1.0) and rows[0]["prompt_tokens"] == len(item.token_ids)
    assert task.items(embedded.tokenizer, 1)[0].token_ids == item.token_ids  # seeded, reproducible
