"""Long-context retrieval: a passkey hidden in an essay haystack, asked for after the compressed context.

Each item hides the sentence "The secret passkey is NNNNN." (a seeded five-digit number) at a depth
of 10%, 50% or 90% of a haystack of evaluation essays cut to about 500, 1000 or 2000 tokens, and asks
"What is the secret passkey? Answer with the number only." after it, in the same user message of the
chat template. The prompt is compressed by the policy at the budget (`kv_compression.runtime`), the
answer is decoded greedily (16 new tokens; digits are single tokens) and scored by exact match of
its first integer. ``correct_full`` is the same item answered with the full cache: a task the
full-cache model fails cannot rank policies, so read the accuracies against it.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import torch

from forward_influence import corpus
from forward_influence.tracer import Tracer
from forward_influence.traces import chat_ids
from kv_compression.budget import BUFFER, Budget
from kv_compression.policies import Policy

from . import Item, PerSetting, greedy_completion

QUESTION = "What is the secret passkey? Answer with the number only."


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def haystack(tokenizer, length: int) -> str:
    """About `length` tokens of the evaluation essays, cut at a sentence end."""
    text = "\n\n".join(corpus.read_essay(name) for name in corpus.essay_names("evaluation")[:8])
    ids = tokenizer(text, add_special_tokens=False).input_ids[:length]
    cut = tokenizer.decode(ids)
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 0 else cut


def with_needle(text: str, depth: float, passkey: int) -> str:
    """`text` with the passkey sentence after the sentence end nearest to `depth` of its length."""
    target = int(depth * len(text))
    end = text.find(". ", target)
    at = end + 1 if end >= 0 else len(text)
    return f"{text[:at]} The secret passkey is {passkey}.{text[at:]}"


@dataclass
class Needle(PerSetting):
    """The passkey retrieval task (see the module docstring)."""

    lengths: tuple[int, ...] = (500, 1000, 2000)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    max_new_tokens: int = 16
    buffer: int = BUFFER
    seed: int = 0
    name: str = "needle"
    decodes = True
    metrics: tuple[str, ...] = ("correct",)
    labels = {"correct": "passkey exact match (share)"}

    def items(self, tokenizer, n: int) -> list[Item]:
        rng = random.Random(self.seed)
        items = []
        combos = itertools.cycle(itertools.product(self.lengths, self.depths))
        texts = {}
        for index, (length, depth) in zip(range(n), combos):
            passkey = rng.randint(10000, 99999)
            texts.setdefault(length, haystack(tokenizer, length))
            prompt = f"{with_needle(texts[length], depth, passkey)}\n\n{QUESTION}"
            ids, _ = chat_ids(tokenizer, prompt, "")
            items.append(
                Item(f"len{length}-depth{depth}-{index}", ids, dict(passkey=passkey, length=length, depth=depth))
            )
        return items

    def capacity(self, item: Item, model: str) -> int:
        return len(item.token_ids) + self.max_new_tokens

    def correct(self, tracer: Tracer, item: Item, policy: Policy | None, budget: Budget | None) -> float:
        ids = torch.tensor(item.token_ids, device=tracer.device)
        tokens = greedy_completion(tracer, ids, policy, budget, self.max_new_tokens, self.buffer)
        return float(first_integer(tracer.tokenizer.decode(tokens, skip_special_tokens=True)) == item.meta["passkey"])

    def reference(self, tracer: Tracer, item: Item) -> float:
        return self.correct(tracer, item, None, None)

    def measure(self, tracer: Tracer, item: Item, reference: float, policy: Policy, budget: Budget) -> dict:
        return dict(
            length=item.meta["length"],
            depth=item.meta["depth"],
            prompt_tokens=len(item.token_ids),
            correct=self.correct(tracer, item, policy, budget),
            correct_full=reference,
        )
