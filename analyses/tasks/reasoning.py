"""Reasoning under decode-time compression: the word problems of data/problems.jsonl, answered greedily.

Each problem is asked through the chat template (as `forward-influence trace` does) and answered by
greedy decoding with a compressed cache: budgets are token counts (64, 128, 256, ...), so the short
prompt is kept whole and eviction starts once the cache outgrows budget + `buffer` during decoding.
Against the full-cache completion of the same problem:

- ``accuracy``: the completion's last integer equals the answer (1/0),
- ``prefix_agreement``: share of the full-cache completion's tokens reproduced before the first
  divergence,
- ``similarity``: edit similarity of the two token sequences (`difflib.SequenceMatcher` ratio),
- ``length``: completion length in tokens,
- ``accuracy_full``, ``length_full``: the full cache's own.

The buffer is 32 tokens, not R-KV's 128: the embedded model's completions run to about 80 tokens
after a ~75-token prompt, so a 128-token buffer would never let a budget below the whole sequence
evict anything while decoding; completions stop at 192 new tokens (more than twice the full-cache
length), which bounds the cost of the looping completions that heavy compression produces.

Accuracy of models this small is near the floor (about 2/20 while planning), so the agreement
metrics are the ones that rank policies.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from forward_influence.generate import INSTRUCTION, last_integer, read_problems
from forward_influence.tracer import Tracer
from forward_influence.traces import _chat_ids
from kv_compression.policies import Policy

from . import Item, greedy_completion

PROBLEMS = Path(__file__).resolve().parents[2] / "data" / "problems.jsonl"


def prefix_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Share of `reference` reproduced by `other` before their first difference."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / len(reference) if reference else 1.0


@dataclass
class Reasoning:
    """The decode-time compression task (see the module docstring)."""

    max_new_tokens: int = 192
    buffer: int = 32
    problems: Path = PROBLEMS
    name: str = "reasoning"
    metrics: tuple[str, ...] = ("accuracy", "prefix_agreement", "similarity", "length")
    labels = {
        "accuracy": "answer accuracy (share)",
        "prefix_agreement": "agreement before first divergence (share)",
        "similarity": "edit similarity to the full-cache completion",
        "length": "completion length (tokens)",
    }

    def items(self, tokenizer, n: int) -> list[Item]:
        items = []
        for problem in read_problems(self.problems)[:n]:
            ids, _ = _chat_ids(tokenizer, INSTRUCTION + problem["question"], "")
            items.append(Item(problem["id"], ids, dict(answer=problem["answer"])))
        return items

    def complete(self, tracer: Tracer, ids: torch.Tensor, policy: Policy | None, budget: str | None) -> list[int]:
        return greedy_completion(tracer, ids, policy, budget, self.max_new_tokens, self.buffer)

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]:
        ids = torch.tensor(item.token_ids, device=tracer.device)
        answer = item.meta["answer"]

        def correct(tokens: list[int]) -> float:
            return float(last_integer(tracer.tokenizer.decode(tokens, skip_special_tokens=True)) == answer)

        full = self.complete(tracer, ids, None, None)
        accuracy_full = correct(full)
        rows = []
        for name, policy in policies.items():
            for budget in budgets:
                tokens = self.complete(tracer, ids, policy, budget)
                rows.append(dict(
                    item=item.id, policy=name, budget=budget, prompt_tokens=len(ids),
                    accuracy=correct(tokens),
                    prefix_agreement=prefix_agreement(full, tokens),
                    similarity=difflib.SequenceMatcher(a=full, b=tokens, autojunk=False).ratio(),
                    length=len(tokens), accuracy_full=accuracy_full, length_full=len(full),
                ))
        return rows
