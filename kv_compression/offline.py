"""Offline observations: what the tracer reads so that a set of policies can score a trace.

Outside the runtime, a policy scores from an `Observation` of the whole trace
(`forward_influence.observation.observe`, one traced pass). Observations differ between policies
only in the top-k of their entropies, so policies with the same ``top_k`` share one pass. The query
window is the longest any policy asks for, and at least `MIN_WINDOW`: each policy slices its own
window from it, so a longer one changes no score. The logit lens is read when a policy requires it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from forward_influence.observation import Observation, observe
from forward_influence.tracer import Tracer

from .policies import Policy

MIN_WINDOW = 64


def observations(tracer: Tracer, token_ids: Sequence[int] | torch.Tensor, policies: Sequence[Policy]) -> list[Observation]:
    """One observation per policy of `policies`, in order; policies with the same top-k share one."""
    window = max([getattr(p, "window", 1) for p in policies] + [MIN_WINDOW])
    lens = any("logit_lens" in p.requires() for p in policies)
    by_k: dict[int, Observation] = {}
    for policy in policies:
        k = getattr(policy, "top_k", 10)
        if k not in by_k:
            by_k[k] = observe(tracer, token_ids, window=window, top_k=k, logit_lens=lens)
    return [by_k[getattr(p, "top_k", 10)] for p in policies]
