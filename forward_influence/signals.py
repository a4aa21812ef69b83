"""Token signals: what the model says about each token of a trace, read in one traced pass.

For a trace of T tokens, `token_signals` returns, per token i:

- ``entropy_next``: top-k entropy (nats) of the next-token distribution at position i (the one that
  predicts token i+1),
- ``entropy_generated``: top-k entropy of the distribution that produced token i, i.e. the one at
  position i-1 (NaN for the first token; `generated_alignment`),
- ``entropy_full``: full-vocabulary entropy of the distribution at position i,
- ``attention_snapkv``: attention token i receives from the last `window` queries of the trace,
  averaged over those queries (SnapKV-style), per layer and query head, and its mean over both,
- ``attention_h2o``: attention token i receives summed over every query of the trace (H2O-style
  cumulative attention), per layer and query head, and its mean over both,
- ``evolution``: layer-wise representation change, ``1 - cos(h_in, h_out)`` between token i's residual
  stream before and after each layer (`representation_change`), and its mean over layers.

Top-k entropy renormalises the k most probable tokens (k = `top_k`, default `defaults.TOP_K`).
Logits are made from the final hidden states a chunk at a time, so memory stays bounded on long
traces. Attention is recomputed from the query states and cached keys the pass reads
(`forward_influence.attention`), the same function the compression runtime uses.

The rules shared with the observations of `forward_influence.observation` live here:
`generated_alignment`, `representation_change` and `distance_to_final`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .attention import attention_received
from .defaults import TOP_K, WINDOW
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


def generated_alignment(entropy_next: torch.Tensor) -> torch.Tensor:
    """``[..., seen]`` next-alignment entropies shifted one position right: entry i is the entropy of
    the distribution that produced token i (NaN for the first token), on the same device and dtype."""
    first = torch.full_like(entropy_next[..., :1], float("nan"))
    return torch.cat([first, entropy_next[..., :-1]], dim=-1)


def representation_change(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> torch.Tensor:
    """Change of each token's residual stream across one layer, ``1 - cos(h_in, h_out)``: ``[..., tokens]``."""
    return 1.0 - torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)


def distance_to_final(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """InfoKV's representation evolution D: the cosine distance between each token's residual stream
    after layer l and after the last layer, ``1 - cos(h_l, h_L)``. `outputs` holds the stream after each
    layer, ``[layers, ..., tokens, hidden]`` (a stacked tensor or a sequence of per-layer tensors);
    returns ``[layers, ..., tokens]`` (0 at the last layer)."""
    last = torch.nn.functional.normalize(outputs[-1].float(), dim=-1)
    return torch.stack([1.0 - (torch.nn.functional.normalize(h.float(), dim=-1) * last).sum(-1) for h in outputs])


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
    top_k: int = TOP_K
    window: int = WINDOW

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
    top_k: int = TOP_K,
    window: int = WINDOW,
    attention: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> TokenSignals:
    """Read every signal of one trace in one traced pass (see the module docstring)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    readout = tracer.run(ids[None], hidden=True, use_cache=attention, queries=attention)
    entropy_top, entropy_all = entropies(tracer.model, readout.final[0], top_k=top_k, chunk=chunk)
    hidden = readout.hidden[:, 0]  # [layers + 1, tokens, hidden]
    snapkv = h2o = None
    if attention:
        positions = torch.arange(len(ids), device=tracer.device)
        recent = min(window, len(ids))
        sums, windows = [], []
        for index, module in enumerate(tracer.model.get_decoder().layers):
            query, key = readout.queries[index], readout.cache.layers[index].keys
            args = (module.self_attn.scaling, tracer.layout.windows[index])
            sums.append(attention_received(query, key, positions, positions, *args)[0])
            windows.append(
                attention_received(query[:, :, -recent:], key, positions[-recent:], positions, *args)[0] / recent
            )
        snapkv, h2o = torch.stack(windows).cpu().numpy(), torch.stack(sums).cpu().numpy()
    return TokenSignals(
        token_ids=ids.tolist(),
        entropy_generated=generated_alignment(entropy_top).cpu().numpy(),
        entropy_next=entropy_top.cpu().numpy(),
        entropy_full=entropy_all.cpu().numpy(),
        evolution_layers=representation_change(hidden[:-1], hidden[1:]).cpu().numpy(),
        attention_snapkv_layers=snapkv,
        attention_h2o_layers=h2o,
        top_k=top_k,
        window=window,
    )
