from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, protect
from .entropy import token_entropy
from .evolution import mean_evolution
from .snapkv import SnapKV


def normalise(x: torch.Tensor, how: str) -> torch.Tensor:
    """Per row (layer, KV head) over tokens: ``zscore`` or ``rank`` (scaled to [0, 1]); +inf ignored."""
    finite = torch.isfinite(x)
    values = torch.where(finite, x, torch.nan)
    if how == "zscore":
        mean = values.nanmean(dim=-1, keepdim=True)
        std = ((values - mean) ** 2).nanmean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        out = (values - mean) / std
    elif how == "rank":
        ranks = torch.nan_to_num(values, nan=float("inf")).argsort(dim=-1).argsort(dim=-1).float()
        out = ranks / (finite.sum(dim=-1, keepdim=True) - 1).clamp_min(1)
    else:
        raise ValueError(f"normalisation must be 'zscore' or 'rank', got {how!r}")
    return torch.where(finite, out, x)


@dataclass
class InfoKV(Policy):
    """Attention combined with entropy modulated by representation evolution (InfoKV, arXiv 2606.26875).

    The paper publishes the ingredients, not the constants; every open choice is a field:

    ``score = N(A) + weight * w_l * N(E * (1 + V))``

    - A: SnapKV attention (window `window`, pooling `kernel`, mean over each GQA group),
    - E: top-`top_k` entropy under `alignment` (``next`` or ``generated``; unknown counts as the
      largest known value),
    - V: representation change, ``1 - cos`` of the residual stream across each layer averaged over
      layers (``evolution="hidden"``), or the mean absolute change of the logit-lens top-k entropy
      from one layer to the next (``"logit_lens"``, nats; one output-head pass per layer), or none
      (``"none"``),
    - N: `normalisation` per layer and KV head over tokens (``zscore`` or ``rank``),
    - w_l: `layer_weighting` of the entropy term, ``uniform`` (1) or ``linear`` (0 at the bottom layer
      to 2 at the top, mean 1).

    The first `sinks` and last `window` tokens are kept. Scores: [batch, kv_heads, tokens]; higher
    means keep.
    """

    name = "infokv"
    top_k: int = 10
    alignment: str = "next"
    evolution: str = "hidden"
    normalisation: str = "zscore"
    weight: float = 0.5
    layer_weighting: str = "uniform"
    window: int = 32
    kernel: int = 5
    sinks: int = 4

    def requires(self):
        extra = {"hidden": {"evolution"}, "logit_lens": {"logit_lens"}}.get(self.evolution, set())
        return frozenset({"entropy"} | extra)

    def score(self, obs, layer):
        attention = SnapKV(window=self.window, kernel=self.kernel).attention(obs, layer)
        entropy = token_entropy(obs, self.alignment)
        entropy = torch.where(torch.isnan(entropy), entropy.nan_to_num(nan=0.0).amax(dim=-1, keepdim=True), entropy)
        if self.evolution == "hidden":
            entropy = entropy * (1 + mean_evolution(obs))
        elif self.evolution == "logit_lens":
            entropy = entropy * (1 + obs.logit_lens.diff(dim=1).abs().mean(dim=1))
        elif self.evolution != "none":
            raise ValueError(f"evolution must be 'hidden', 'logit_lens' or 'none', got {self.evolution!r}")
        if self.layer_weighting == "linear":
            n = len(obs.layers)
            scale = 2 * layer / (n - 1) if n > 1 else 1.0
        elif self.layer_weighting == "uniform":
            scale = 1.0
        else:
            raise ValueError(f"layer_weighting must be 'uniform' or 'linear', got {self.layer_weighting!r}")
        combined = normalise(attention, self.normalisation) + self.weight * scale * normalise(
            obs.per_token(layer, entropy), self.normalisation
        )
        return protect(combined, self.sinks, self.window)
