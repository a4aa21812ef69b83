from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from forward_influence.defaults import WINDOW
from forward_influence.observation import Observation, Reads

from .base import Count, NonNegative, Policy, Ratio, normalise, protect
from .entropy import Alignment
from .snapkv import window_attention

Combination = Literal["softmax", "zscore", "rank"]
EvolutionMeasure = Literal["to_final", "across_layers", "logit_lens", "none"]


@dataclass
class InfoKV(Policy):
    """Attention mixed with entropy weighted by representation evolution (InfoKV, arXiv 2606.26875).

    The published rule, as three independent write-ups of the paper's PDF state it (no code and no
    full text of the paper are public, so this is the best statement available). Per layer l and
    cached token i:

    - H_i, the uncertainty: the top-`top_k` restricted entropy (k = 256, the probabilities of the k most
      likely tokens renormalised; nats) of the distribution that generated token i
      (``alignment="generated"``; ``"next"`` takes the distribution at the token instead). An unknown
      entropy (the first token) counts as the largest known one.
    - D_i^(l), the representation evolution: the cosine distance between token i's residual stream
      after layer l and after the last layer (``evolution="to_final"``; 0 at the last layer).
    - E_i^(l) = (D_i^(l) + `tau`) * H_i, with tau = 1 so the last layer's term does not vanish.
    - A_i^(l), the attention: SnapKV's (`window` = 32 queries, mean over them, average-pooled with
      width `kernel`, mean over each KV group). It is a distribution over the cached tokens: each
      query's attention sums to 1 over them, and so does the mean (pooling shifts the sum by well
      under 1%).
    - S_i^(l) = `alpha` * A_i^(l) + (1 - `alpha`) * softmax_i(E^(l)) over the layer's cached tokens, with
      alpha = 0.9 (alpha = 1 is pure attention); each layer keeps its top tokens per KV head. The
      window is always kept; the published rule keeps no sink tokens (`sinks` = 0).

    The open choices are fields, and `forward-influence calibrate` chooses among them by Forward
    Influence: `combination` (``softmax`` as published, or both terms put on one scale by ``zscore`` or
    ``rank`` per layer and KV head and mixed with the same alpha), `evolution` (``to_final``;
    ``across_layers``: ``1 - cos`` across each layer averaged over layers; ``logit_lens``: the mean
    absolute change of the logit-lens top-k entropy from one layer to the next; ``none``: D = 0),
    `alpha`, `tau`, `top_k` and `alignment`. Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "infokv"
    alpha: Ratio = 0.9
    tau: NonNegative = 1.0
    top_k: Count = 256
    alignment: Alignment = "generated"
    evolution: EvolutionMeasure = "to_final"
    combination: Combination = "softmax"
    window: Count = WINDOW
    kernel: Count = 5
    sinks: int = 0

    def reads(self) -> Reads:
        k = frozenset({self.top_k})
        return Reads(
            window=self.window,
            top_k=k,
            final_distance=self.evolution == "to_final",
            layer_change=self.evolution == "across_layers",
            logit_lens=k if self.evolution == "logit_lens" else frozenset(),
        )

    def evolution_term(self, obs: Observation, layer: int) -> torch.Tensor:
        """D of every token seen, ``[batch, seen]`` (unknown values count as 0)."""
        if self.evolution == "to_final":
            change = obs.final_distance[:, layer]
        elif self.evolution == "across_layers":
            change = obs.layer_change.nanmean(dim=1)
        elif self.evolution == "logit_lens":
            change = obs.logit_lens[self.top_k].diff(dim=1).abs().mean(dim=1)
        else:
            return torch.zeros_like(obs.entropy(self.top_k, self.alignment))
        return torch.nan_to_num(change, nan=0.0)

    def uncertainty(self, obs: Observation, layer: int) -> torch.Tensor:
        """E = (D + tau) * H of every token seen, ``[batch, seen]``."""
        entropy = obs.entropy(self.top_k, self.alignment)
        entropy = torch.where(torch.isnan(entropy), entropy.nan_to_num(nan=0.0).amax(dim=-1, keepdim=True), entropy)
        return (self.evolution_term(obs, layer) + self.tau) * entropy

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        attention = window_attention(obs, layer, self.window, self.kernel)
        uncertainty = obs.per_token(layer, self.uncertainty(obs, layer))
        if self.combination == "softmax":
            combined = self.alpha * attention + (1 - self.alpha) * torch.softmax(uncertainty, dim=-1)
        else:
            combined = self.alpha * normalise(attention, self.combination) + (1 - self.alpha) * normalise(
                uncertainty, self.combination
            )
        return protect(combined, self.sinks, self.window)
