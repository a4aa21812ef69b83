from __future__ import annotations

from dataclasses import dataclass

import torch

from forward_influence.observation import Observation, Reads
from forward_influence.reconstruction import Reconstruction

from .base import Count, Policy, protect


@dataclass
class KVzip(Policy):
    """Keep what the model needs to reconstruct its context (KVzip, Kim et al., arXiv 2505.23416).

    After the cached tokens, the model is asked to repeat them: a repeat instruction, then the context
    itself, fed as queries over the cache `chunk` tokens at a time. Each cached entry scores the largest
    attention a reconstruction query pays it, max over the query heads of its KV group
    (`forward_influence.reconstruction`, where the prompt for chat and base models is described); the
    first `sinks` positions are kept. `plus` applies KVzip+'s normalisation (attention over the query's
    hidden-state norm, times the entry's value output norm). Query-agnostic: the scores do not depend on
    a question that follows. The reconstruction pass costs about one more prefill; the runtime runs it
    at every compression, over the entries held then, and needs the tokenizer.
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "kvzip"
    sinks: int = 4
    chunk: Count = 2048
    plus: bool = False

    def signal(self) -> Reconstruction:
        return Reconstruction(self.sinks, self.chunk, self.plus)

    def reads(self) -> Reads:
        return Reads(reconstruction=frozenset({self.signal()}))

    def score(self, obs: Observation, layer: int) -> torch.Tensor:
        return protect(obs.reconstruction[self.signal()][layer], sinks=self.sinks)
