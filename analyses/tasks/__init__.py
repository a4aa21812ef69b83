"""Evaluation tasks by name: a registry a user extends with one file.

A task is an object with a `name`, `items(tokenizer, n)` (its evaluation items, a deterministic
list) and `run(tracer, item, policies, budgets)`, which returns one row (a dict of metrics) per
policy and budget, including the full-cache reference the task compares against. To add a task,
write ``analyses/tasks/<name>.py`` with such an object and add it to `TASKS` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from forward_influence.tracer import Tracer
from kv_compression.policies import Policy


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


def registry() -> dict[str, Task]:
    from .fidelity import Fidelity
    from .needle import Needle
    from .reasoning import Reasoning

    return {task.name: task for task in (Fidelity(), Needle(), Reasoning())}
