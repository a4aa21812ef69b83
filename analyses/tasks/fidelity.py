"""Fidelity under long prefill: compress an essay prefix, then score the continuation teacher-forced.

For each document, the first `prefix` tokens are observed and compressed by a policy at a budget
(the kept sets of every layer and KV head, evicted at the prefix's last position); the next
`continuation` tokens are then read teacher-forced, and compared with the full cache:

- ``nll_increase``: increase in the mean negative log-likelihood of the continuation (nats/token),
- ``kl``: mean KL(full || compressed) of the next-token distributions, and ``kl_far``, the same over
  distances from `far_from` on,
- ``top1_agreement``: share of positions where both predict the same token,
- ``nll_full``: the full cache's own mean NLL (the reference every row is compared with).

The observation and the clean run are computed once per document and shared by every policy and
budget. Exact: the compressed run is the tracer's masked replay of the evictions, which equals
physical eviction (`kv_compression.runtime`). Items are segments of ``prefix + continuation`` tokens
cut from the evaluation essays (`analyses.documents.essay_segments`: every essay long enough gives
its first segment, then the longer ones their next).

    forward-influence eval --task fidelity --policies infokv,snapkv,h2o,random --budgets 0.25,0.5 --docs 5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forward_influence.defaults import FAR_FROM
from forward_influence.eviction import EvictionSpec
from forward_influence.influence import clean_run, evict
from forward_influence.observation import Observation
from forward_influence.tracer import Tracer
from kv_compression.budget import Budget
from kv_compression.kept import eviction_specs, kept_indices, layer_scores
from kv_compression.offline import observation
from kv_compression.policies import Policy

from ..documents import essay_segments
from ..protocol import CONTINUATION, PREFIX
from . import Item, Task


def fidelity_rows(
    tracer: Tracer,
    document: str,
    token_ids: Sequence[int],
    policies: dict[str, Policy],
    budgets: Sequence[str],
    prefix: int = PREFIX,
    continuation: int = CONTINUATION,
    far_from: int = FAR_FROM,
    influence: torch.Tensor | None = None,
    obs: Observation | None = None,
) -> list[dict]:
    """One row per (policy, budget) for one document (see the module docstring for the columns). A
    policy that reads the measured influence (the oracle) measures it on the continuation, or takes
    `influence` (``[1, prefix]``) when given. `obs`, the prefix's observation for `policies`, saves
    observing again when the caller has it."""
    ids = list(token_ids[: prefix + continuation])
    if len(ids) <= prefix:
        raise ValueError(f"{document} has {len(ids)} tokens, not more than the {prefix}-token prefix")
    t = prefix - 1
    clean = clean_run(tracer, ids, hidden=False)
    n_full = -clean.references.next_logp[prefix - 1 : len(ids) - 1].mean().item()
    rows = []
    if obs is None:
        obs = observation(tracer, ids[:prefix], list(policies.values()), future=ids[prefix:], influence=influence)
    for name, policy in policies.items():
        scores = layer_scores(policy, obs)  # scored once, selected at every budget
        for budget in budgets:
            kept = kept_indices(policy, obs, Budget.parse(budget), scores)
            # The empty spec carries the eviction time when a budget keeps everything.
            specs = [EvictionSpec((), t)] + eviction_specs(kept, obs, t)
            result = evict(tracer, clean, [specs], len(ids) - prefix, hidden=False)
            d = result.distance
            rows.append(
                dict(
                    item=document,
                    policy=name,
                    budget=budget,
                    prefix=prefix,
                    continuation=len(ids) - prefix,
                    nll_full=n_full,
                    nll_increase=float(np.nanmean(result.nll_increase[0])),
                    kl=float(np.nanmean(result.kl[0])),
                    kl_far=float(np.nanmean(result.kl[0, d >= far_from])),
                    top1_agreement=float(np.nanmean(result.top1_agreement[0])),
                )
            )
    return rows


@dataclass
class Fidelity(Task):
    """The long-prefill task (see the module docstring)."""

    prefix: int = PREFIX
    continuation: int = CONTINUATION
    far_from: int = FAR_FROM
    name: str = "fidelity"
    decodes = False
    metrics: tuple[str, ...] = ("nll_increase", "kl", "kl_far", "top1_agreement")
    labels = {
        "nll_increase": "NLL increase (nats / token)",
        "kl": "KL(full || compressed) (nats)",
        "kl_far": "KL at distance >= 33 (nats)",
        "top1_agreement": "top-1 agreement (share)",
    }

    def items(self, tokenizer, n: int) -> list[Item]:
        return [
            Item(t.id.removeprefix("essay:"), t.token_ids)
            for t in essay_segments(tokenizer, n, self.prefix + self.continuation)
        ]

    def capacity(self, item: Item, model: str) -> int:
        """The compressed prefix."""
        return self.prefix

    def run(self, tracer: Tracer, item: Item, policies: dict[str, Policy], budgets: Sequence[str]) -> list[dict]:
        return fidelity_rows(
            tracer, item.id, item.token_ids, policies, budgets, self.prefix, self.continuation, self.far_from
        )
