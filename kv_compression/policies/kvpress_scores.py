from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads

from .base import Policy


@dataclass
class KvpressScores(Policy):
    """A kvpress press's choice, measured by our tracer (CLI name ``kvpress:CLASS[:field=value...]``).

    The press (`press`: a kvpress ``ScorerPress`` class name and its fields, e.g.
    ``SnapKVPress:window_size=64``) runs over the trace's prefill and the scores its ``score()`` gives
    every cached token are recorded per layer (`kv_compression.kvpress.press_scores`); keeping the top
    tokens by them is the press's own choice at the same number of kept tokens, so Forward Influence,
    fidelity and the token tables measure it like any policy. Layers the press leaves alone keep every
    token. Offline only (generate with kvpress's own pipeline). Scores: [batch, kv_heads, tokens].
    """

    name = "kvpress"
    online = False
    press: str = ""

    def reads(self) -> Reads:
        return Reads(press=frozenset({self.press}))

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        scores = obs.press_scores[self.press][layer]
        keys = obs.layers[layer].keys
        if scores is None:
            return torch.full(keys.shape[:3], float("inf"), device=keys.device)
        return scores.to(keys.device)
