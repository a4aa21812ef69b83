"""Offline observations: what the tracer reads so that a set of policies can score a trace.

Outside the runtime, a policy scores from an `Observation` of the whole trace
(`forward_influence.observation.observe`, one traced pass). One pass serves a set of policies: it
reads the union of what they declare (`Policy.reads`): the longest query window, every top-k they
need, cumulative attention and the representation tables when any of them asks. A policy slices its
own window from the longer one and picks its own k, so sharing the pass changes no score.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch

from forward_influence.observation import Observation, Reads, observe
from forward_influence.tracer import Tracer

from .policies import Policy


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
        obs.press_scores = {spec: kvpress.press_scores(tracer.model, ids, spec) for spec in wanted.press}
    return obs
