"""Evaluation tasks by name: a registry a user extends with one file.

A task derives from `Task`: a `name`, its `metrics` (with axis `labels`), `items(tokenizer, n)` (its
evaluation items, a deterministic list), whether it `decodes` (a ``prompt+RATIO`` budget needs new
tokens), `capacity(item, model)` (the most tokens an item's cache ever holds, so that a count budget
beyond it is refused before any forward pass) and `run(tracer, item, policies, budgets)`, which returns
one row (a dict of metrics) per policy and budget, including the full-cache reference the task compares
against; `cache_key` identifies its measurements in the per-item cache, and `plot` may draw its own
figure. Most tasks measure one (policy, budget) setting at a time against a reference computed once
per item: they derive from `PerSetting`, which owns that loop, and write `reference` and `measure`.
To add a task, write ``analyses/tasks/<name>.py`` with such a class and add it to `registry` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class Task:
    """The base of every task (see the module docstring): its attributes and the methods a task writes
    (`items`, `capacity`, `run`), with the defaults of the others."""

    name: str
    metrics: tuple[str, ...]
    labels: dict[str, str]  # axis label (with unit) per metric
    decodes: bool = False

    def items(self, tokenizer, n: int) -> list[Item]:
        raise NotImplementedError

    def capacity(self, item: Item, model: str) -> int:
        raise NotImplementedError

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]:
        raise NotImplementedError

    def cache_key(self) -> str:
        """What identifies the task's measurements in the per-item cache: its name and every setting.
        A dataclass task's repr lists them all; any other task writes its own."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"task {self.name!r} is not a dataclass: it must define cache_key() (its settings)")
        return repr(self)

    def with_buffer(self, buffer: int) -> Task:
        """The task with compression interval `buffer` if it has one (a ``buffer`` setting), else itself."""
        if dataclasses.is_dataclass(self) and "buffer" in {f.name for f in dataclasses.fields(self)}:
            return dataclasses.replace(self, buffer=buffer)
        return self

    def plot(self, results, title: str, path: Path) -> list[Path] | None:
        """The task's own figure of its per-item `results`, or None for the common one
        (`analyses.evaluate.plot_task`)."""
        return None


class PerSetting(Task):
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


def full_greedy(tracer: Tracer, ids: Sequence[int], max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    """The new tokens of greedy decoding from `ids` with the full cache (the reference every compressed
    decoding is compared with): at most `max_new_tokens`, at least `min_new_tokens` (an end of sequence
    before then is not taken)."""
    ids = torch.as_tensor(list(ids), dtype=torch.long, device=tracer.device)[None]
    with torch.no_grad():
        output = tracer.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=pad_token_id(tracer.tokenizer),
        )
    return output[0, ids.shape[1] :].tolist()


def greedy_completion(
    tracer: Tracer, ids: torch.Tensor, policy: Policy | None, budget: Budget | None, max_new_tokens: int, buffer: int
) -> list[int]:
    """The greedy answer's new tokens, with the full cache (`policy` None, `full_greedy`) or compressed at
    `budget`."""
    if policy is None:
        return full_greedy(tracer, ids.tolist(), max_new_tokens)
    output, _ = generate(
        tracer.model,
        ids,
        policy,
        budget,
        buffer=buffer,
        max_new_tokens=max_new_tokens,
        tokenizer=tracer.tokenizer,
        pad_token_id=pad_token_id(tracer.tokenizer),
    )
    return output[0, len(ids) :].tolist()


def registry() -> dict[str, Task]:
    from .fidelity import Fidelity
    from .long_decode import LongDecode
    from .needle import Needle
    from .reasoning import Reasoning

    return {task.name: task for task in (Fidelity(), Needle(), Reasoning(), LongDecode())}
