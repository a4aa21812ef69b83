"""Evaluation tasks by name: a registry a user extends with one file.

A task is an object with a `name`, its `metrics` (with axis `labels`), `items(tokenizer, n)` (its
evaluation items, a deterministic list), whether it `decodes` (a ``prompt+RATIO`` budget needs new
tokens), `capacity(item, model)` (the most tokens an item's cache ever holds, so that a count budget
beyond it is refused before any forward pass) and `run(tracer, item, policies, budgets)`, which returns
one row (a dict of metrics) per policy and budget, including the full-cache reference the task compares
against. Most tasks measure one (policy, budget) setting at a time against a reference computed once
per item: they derive from `PerSetting`, which owns that loop, and write `reference` and `measure`.
To add a task, write ``analyses/tasks/<name>.py`` with such an object and add it to `registry` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from forward_influence.models import pad_token_id
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
    decodes: bool

    def items(self, tokenizer, n: int) -> list[Item]: ...

    def capacity(self, item: Item, model: str) -> int: ...

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]: ...


class PerSetting:
    """A task measured one (policy, budget) setting at a time against a full-cache reference."""

    def reference(self, tracer: Tracer, item: Item) -> Any:
        """What every setting of `item` is compared with (computed once per item)."""
        raise NotImplementedError

    def measure(self, tracer: Tracer, item: Item, reference: Any, policy: Policy, budget: Budget) -> dict:
        """The metrics of one setting (and any reference columns, named ``*_full``)."""
        raise NotImplementedError

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]:
        reference = self.reference(tracer, item)
        return [
            dict(
                item=item.id,
                policy=name,
                budget=budget,
                **self.measure(tracer, item, reference, policy, Budget.parse(budget)),
            )
            for name, policy in policies.items()
            for budget in budgets
        ]


def check_budgets(task: Task, items: Sequence[Item], budgets: Sequence[str], model: str) -> None:
    """Refuse (`InputError`) a budget that `task` cannot apply to one of `items`: ``prompt+RATIO`` where
    nothing is decoded, a count larger than an item's cache will ever hold."""
    for budget in map(Budget.parse, budgets):
        if not task.decodes:
            budget.check_offline()
        for item in items:
            budget.check_count(task.capacity(item, model), f"{task.name} item {item.id!r}")


def greedy_completion(
    tracer: Tracer, ids: torch.Tensor, policy: Policy | None, budget: Budget | None, max_new_tokens: int, buffer: int
) -> list[int]:
    """The greedy answer's new tokens, with the full cache (`policy` None) or compressed at `budget`."""
    model, pad = tracer.model, pad_token_id(tracer.tokenizer)
    if policy is None:
        with torch.no_grad():
            output = model.generate(
                ids[None],
                attention_mask=torch.ones_like(ids)[None],
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
    else:
        output, _ = generate(
            model,
            ids,
            policy,
            budget,
            buffer=buffer,
            max_new_tokens=max_new_tokens,
            tokenizer=tracer.tokenizer,
            pad_token_id=pad,
        )
    return output[0, len(ids) :].tolist()


def registry() -> dict[str, Task]:
    from .fidelity import Fidelity
    from .long_decode import LongDecode
    from .needle import Needle
    from .reasoning import Reasoning

    return {task.name: task for task in (Fidelity(), Needle(), Reasoning(), LongDecode())}
