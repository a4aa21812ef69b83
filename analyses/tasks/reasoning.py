"""Reasoning under decode-time compression: the packaged word problems (`PROBLEMS`), answered greedily.

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

Accuracy of models this small is near the floor (2 of 20 problems for either embedded model), so the
agreement metrics are the ones that rank policies.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

import torch

from forward_influence.generate import INSTRUCTION, last_integer, read_problems
from forward_influence.tracer import Tracer
from forward_influence.traces import chat_ids
from kv_compression.budget import Budget
from kv_compression.policies import Policy

from . import Item, PerSetting, greedy_completion

PROBLEMS = resources.files("analyses") / "data" / "problems.jsonl"


def prefix_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """Share of `reference` reproduced by `other` before their first difference."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / len(reference) if reference else 1.0


@dataclass
class Reasoning(PerSetting):
    """The decode-time compression task (see the module docstring)."""

    max_new_tokens: int = 192
    buffer: int = 32
    problems: Traversable = PROBLEMS
    name: str = "reasoning"
    decodes = True
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
            ids, _ = chat_ids(tokenizer, INSTRUCTION + problem["question"], "")
            items.append(Item(problem["id"], ids, dict(answer=problem["answer"])))
        return items

    def capacity(self, item: Item, model: str) -> int:
        return len(item.token_ids) + self.max_new_tokens

    def complete(self, tracer: Tracer, item: Item, policy: Policy | None, budget: Budget | None) -> list[int]:
        ids = torch.tensor(item.token_ids, device=tracer.device)
        return greedy_completion(tracer, ids, policy, budget, self.max_new_tokens, self.buffer)

    def correct(self, tracer: Tracer, item: Item, tokens: list[int]) -> float:
        return float(last_integer(tracer.tokenizer.decode(tokens, skip_special_tokens=True)) == item.meta["answer"])

    def reference(self, tracer: Tracer, item: Item) -> list[int]:
        return self.complete(tracer, item, None, None)

    def measure(self, tracer: Tracer, item: Item, reference: list[int], policy: Policy, budget: Budget) -> dict:
        tokens = self.complete(tracer, item, policy, budget)
        return dict(
            prompt_tokens=len(item.token_ids),
            accuracy=self.correct(tracer, item, tokens),
            prefix_agreement=prefix_agreement(reference, tokens),
            similarity=difflib.SequenceMatcher(a=reference, b=tokens, autojunk=False).ratio(),
            length=len(tokens),
            accuracy_full=self.correct(tracer, item, reference),
            length_full=len(reference),
        )
