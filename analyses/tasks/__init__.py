"""Evaluation tasks by name: a registry a user extends with one file.

A task is an object with a `name`, `items(tokenizer, n)` (its evaluation items, a deterministic
list) and `run(tracer, item, policies, budgets)`, which returns one row (a dict of metrics) per
policy and budget, including the full-cache reference the task compares against. To add a task,
write ``analyses/tasks/<name>.py`` with such an object and add it to `TASKS` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.policies import Policy
from kv_compression.runtime import generate


@dataclass
class Item:
    """One evaluation item: an id unique within its task, its tokens and anything else it needs."""

    id: str
    token_ids: list[int]
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    name: str
    metrics: tuple[str, ...]
    labels: dict[str, str]  # axis label (with unit) per metric

    def items(self, tokenizer, n: int) -> list[Item]: ...

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]: ...


def greedy_completion(
    tracer: Tracer, ids: torch.Tensor, policy: Policy | None, budget: str | None, max_new_tokens: int, buffer: int
) -> list[int]:
    """The greedy answer's new tokens, with the full cache (`policy` None) or compressed at `budget`."""
    tokenizer, model = tracer.tokenizer, tracer.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if policy is None:
        with torch.no_grad():
            output = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=pad)
    else:
        output, _ = generate(model, ids, policy, Budget.parse(budget), buffer=buffer,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    return output[0, len(ids):].tolist()


def registry() -> dict[str, Task]:
    from .fidelity import Fidelity
    from .needle import Needle
    from .reasoning import Reasoning

    return {task.name: task for task in (Fidelity(), Needle(), Reasoning())}
