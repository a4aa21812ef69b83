"""Token signals: what the model says about each token of a trace, read in one traced pass.

For a trace of T tokens, `token_signals` returns, per token i:

- ``entropy_next``: top-k entropy (nats) of the next-token distribution at position i (the one that
  predicts token i+1),
- ``entropy_generated``: top-k entropy of the distribution that produced token i, i.e. the one at
  position i-1 (NaN for the first token),
- ``entropy_full``: full-vocabulary entropy of the distribution at position i,
- ``attention_snapkv``: attention token i receives from the last `window` queries of the trace,
  averaged over those queries (SnapKV-style), per layer and query head, and its mean over both,
- ``attention_h2o``: attention token i receives summed over every query of the trace (H2O-style
  cumulative attention), per layer and query head, and its mean over both,
- ``evolution``: layer-wise representation change, ``1 - cos(h_in, h_out)`` between token i's residual
  stream before and after each layer, and its mean over layers.

Top-k entropy renormalises the k most probable tokens (k = `top_k`, default 10). Logits are made
from the final hidden states a chunk at a time, so memory stays bounded on long traces. Attention
probabilities need eager attention; the pass switches to it for the attention signals only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .logits import DEFAULT_CHUNK, entropies
from .tracer import Tracer

SIGNALS = (
    "entropy_generated",
    "entropy_next",
    "entropy_full",
    "attention_snapkv",
    "attention_h2o",
    "evolution",
)


@dataclass
class TokenSignals:
    """Per-token signals of one trace. Vectors are ``[tokens]``; per-layer arrays as documented.

    attention_snapkv_layers, attention_h2o_layers: ``[layers, heads, tokens]`` (query heads).
    evolution_layers: ``[layers, tokens]``.
    """

    token_ids: list[int]
    entropy_generated: np.ndarray
    entropy_next: np.ndarray
    entropy_full: np.ndarray
    evolution_layers: np.ndarray
    attention_snapkv_layers: np.ndarray | None = None
    attention_h2o_layers: np.ndarray | None = None
    top_k: int = 10
    window: int = 32

    @property
    def evolution(self) -> np.ndarray:
        return self.evolution_layers.mean(axis=0)

    @property
    def attention_snapkv(self) -> np.ndarray | None:
        a = self.attention_snapkv_layers
        return None if a is None else a.mean(axis=(0, 1))

    @property
    def attention_h2o(self) -> np.ndarray | None:
        a = self.attention_h2o_layers
        return None if a is None else a.mean(axis=(0, 1))

    def get(self, name: str) -> np.ndarray:
        """A per-token signal by its canonical name (see `SIGNALS`)."""
        if name not in SIGNALS:
            raise KeyError(name)
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} was not read (attention signals need attention=True)")
        return value

    def table(self, tokenizer=None) -> pd.DataFrame:
        """One row per token: ``position, token, <signals>``."""
        n = len(self.token_ids)
        tokens = [tokenizer.decode([i]) for i in self.token_ids] if tokenizer is not None else self.token_ids
        frame = pd.DataFrame({"position": np.arange(n), "token": tokens})
        for name in SIGNALS:
            value = getattr(self, name)
            frame[name] = value if value is not None else np.nan
        return frame


def token_signals(
    tracer: Tracer,
    token_ids: list[int] | torch.Tensor,
    top_k: int = 10,
    window: int = 32,
    attention: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> TokenSignals:
    """Read every signal of one trace in one traced pass (see the module docstring)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    readout = tracer.run(ids[None], hidden=True, attention_window=window if attention else None)
    entropy_top, entropy_all = entropies(tracer.model, readout.final[0], top_k=top_k, chunk=chunk)
    entropy_next = entropy_top.cpu().numpy()
    generated = np.concatenate([[np.nan], entropy_next[:-1]])
    hidden = readout.hidden[:, 0]  # [layers + 1, tokens, hidden]
    cos = torch.nn.functional.cosine_similarity(hidden[:-1], hidden[1:], dim=-1)
    return TokenSignals(
        token_ids=ids.tolist(),
        entropy_generated=generated,
        entropy_next=entropy_next,
        entropy_full=entropy_all.cpu().numpy(),
        evolution_layers=(1.0 - cos).cpu().numpy(),
        attention_snapkv_layers=None if not attention else readout.attention_window[:, 0].cpu().numpy(),
        attention_h2o_layers=None if not attention else readout.attention_sum[:, 0].cpu().numpy(),
        top_k=top_k,
        window=window,
    )
