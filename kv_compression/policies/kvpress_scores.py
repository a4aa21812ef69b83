from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads

from .base import Policy


@dataclass
class KvpressScores(Policy):
    """A kvpress press's choice, measured by our tracer (CLI name ``kvpress:CLASS[:field=value...]``).

    The press (`press`: a kvpress press's class name and its fields, e.g. ``SnapKVPress:window_size=64``
    or ``CriticalKVPress:press=SnapKVPress``) runs over the trace's prefill at the compression ratio of
    each budget, and the scores its ``score()`` gives every cached token are recorded per layer
    (`kv_compression.kvpress.PressScores`); keeping the top tokens by them is the press's own choice at
    the same number of kept tokens, so Forward Influence, fidelity and the token tables measure it like
    any policy. `score` is the press at a ratio that evicts nothing. Layers the press leaves alone keep
    every token. Offline only (generate with kvpress's own pipeline). Scores: [batch, kv_heads, tokens].
    """

    name = "kvpress"
    online = False
    budgeted = True
    press: str = ""

    def reads(self) -> Reads:
        return Reads(press=frozenset({self.press}))

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return self._layer(obs, layer, obs.press_scores[self.press].at()[layer])

    def kept_scores(self, obs: Observation, layer: int, kept: int) -> torch.Tensor:
        return self._layer(obs, layer, obs.press_scores[self.press].keeping(kept, obs.num_tokens(layer))[layer])

    @staticmethod
    def _layer(obs: Observation, layer: int, scores: torch.Tensor | None) -> torch.Tensor:
        keys = obs.layers[layer].keys
        if scores is None:
            return torch.full(keys.shape[:3], float("inf"), device=keys.device)
        return scores.to(keys.device)
