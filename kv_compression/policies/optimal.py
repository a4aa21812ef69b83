from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.errors import InputError
from forward_influence.observation import Observation, Reads
from forward_influence.set_optimum import SetSearch

from .base import Count, Policy, Positive, Share

UNIFORM = "uniform"  # the start with every score equal


@dataclass
class Optimal(Policy):
    """Keep, per layer and KV head, the set that a search finds to minimise the future's divergence.

    For the `budget` (the kept share of each head), the search (`forward_influence.set_optimum`)
    optimises soft eviction gates of every compressed layer and KV head to minimise the mean
    KL(full || compressed) over the next `distance` positions of the trace: a soft top-k whose
    temperature anneals, `steps` Adam steps at learning rate `lr`, from each of the `starts` (``+``-joined:
    ``uniform`` and the CLI names of online policies, whose scores give the initial order). The score is
    the best start's final theta: each head's top tokens at `budget` are the hard set the search
    measured best, exactly. It reads the future, so it is a measurement of the headroom over every
    policy, never a compressor: offline only, like the oracle. At another budget than its own it ranks
    by the same theta, which was not searched for that budget. No token is protected.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "optimal"
    online = False
    budget: Share = 0.25
    distance: Count = 256
    steps: Count = 20
    lr: Positive = 0.05
    starts: str = "uniform+h2o+expected-attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import POLICIES  # the registry imports this module

        for start in self.start_names:
            if start != UNIFORM and (start not in POLICIES or not POLICIES[start].online):
                online = sorted(n for n, cls in POLICIES.items() if cls.online)
                raise InputError(
                    f"optimal: starts must be {UNIFORM} or online policies ({', '.join(online)}), got {start!r}"
                )

    @property
    def start_names(self) -> tuple[str, ...]:
        return tuple(self.starts.split("+"))

    def search(self) -> SetSearch:
        return SetSearch(self.budget, self.distance, self.steps, self.lr, starts=self.start_names)

    def reads(self) -> Reads:
        from . import POLICIES

        reads = Reads(set_search=frozenset({self.search()}))
        for start in self.start_names:
            if start != UNIFORM:
                reads = reads | POLICIES[start]().reads()
        return reads

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        optimum = obs.set_optimum[self.search()]
        return optimum.theta[optimum.layers.index(layer)][None].to(obs.layers[layer].keys.device)
