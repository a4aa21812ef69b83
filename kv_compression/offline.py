"""Offline observations: what the tracer reads so that a set of policies can score a trace.

Outside the runtime, a policy scores from an `Observation` of the whole trace
(`forward_influence.observation.observe`, one traced pass). One pass serves a set of policies: it
reads the union of what they declare (`Policy.reads`): the longest query window, every top-k they
need, cumulative attention and the representation tables when any of them asks. A policy slices its
own window from the longer one and picks its own k, so sharing the pass changes no score. A set search
(the `optimal` policy) runs here too, from its starting policies' scores on the same observation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import reduce

import torch

from forward_influence.errors import InputError
from forward_influence.influence import clean_run
from forward_influence.observation import Observation, Reads, observe
from forward_influence.set_optimum import SetOptimum, SetSearch, initial_theta, optimise_gates
from forward_influence.tracer import Tracer

from .budget import Budget
from .kept import layer_scores
from .policies import POLICIES, Policy
from .policies.optimal import UNIFORM
from .runtime import held


def reads(policies: Sequence[Policy]) -> Reads:
    """Everything any of `policies` reads."""
    return reduce(lambda a, b: a | b, (p.reads() for p in policies), Reads())


def observation(
    tracer: Tracer,
    token_ids: Sequence[int] | torch.Tensor,
    policies: Sequence[Policy],
    future: Sequence[int] = (),
    influence: torch.Tensor | None = None,
) -> Observation:
    """One observation of `token_ids` that every policy of `policies` can score. A policy that reads a
    measured influence (the oracle) needs `future`, the tokens that follow, or the `influence` table; a
    kvpress press's scores are recorded by running it over the trace (`kv_compression.kvpress`)."""
    wanted = reads(policies)
    obs = observe(tracer, token_ids, wanted, future=future, influence=influence)
    if wanted.press:
        from . import kvpress  # an optional extra, in its own environment

        ids = torch.as_tensor(token_ids).tolist()
        obs.press_scores = {spec: kvpress.PressScores(tracer.model, ids, spec) for spec in wanted.press}
    if wanted.reconstruction:
        cache = held(tracer.model, torch.as_tensor(token_ids).tolist(), _reading(policies), tracer.tokenizer)
        obs.reconstruction = {spec: cache.reconstruction(spec) for spec in wanted.reconstruction}
    if wanted.set_search:
        ids = torch.as_tensor(token_ids).tolist()
        obs.set_optimum = {search: set_optimum(tracer, obs, ids, future, search) for search in wanted.set_search}
    return obs


def _reading(policies: Sequence[Policy]) -> Policy:
    """A policy of `policies` that reads a reconstruction (the held cache is built for it)."""
    return next(p for p in policies if p.reads().reconstruction)


def set_optimum(
    tracer: Tracer, obs: Observation, token_ids: Sequence[int], future: Sequence[int], search: SetSearch
) -> SetOptimum:
    """Run `search` at the last position of `token_ids` over the next ``min(search.distance,
    len(future))`` tokens, in every full-attention layer, keeping the budget's tokens per head, from
    the starts it names (`uniform`: all equal; a policy: its scores on `obs`)."""
    if not len(future):
        raise InputError("a set search needs the tokens that follow the observed ones")
    distance = min(search.distance, len(future))
    search = replace(search, distance=distance)
    layers = obs.full_layers
    starts = []
    for name in search.starts:
        if name == UNIFORM:
            keys = obs.layers[layers[0]].keys
            starts.append(torch.zeros(len(layers), *keys.shape[1:3], device=keys.device))
            continue
        scores = layer_scores(POLICIES[name](), obs)
        starts.append(initial_theta(torch.stack([scores[layer][0] for layer in layers])))
    keep = Budget(search.budget).tokens(len(token_ids))
    clean = clean_run(tracer, list(token_ids) + list(future[:distance]), hidden=False)
    return optimise_gates(tracer, clean, search, torch.stack(starts), layers, keep)
