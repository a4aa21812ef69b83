"""The compression runtime: a transformers cache that scores and physically evicts during generation.

Four parts, one concept each:

- `cache`: `CompressedCache`, a `DynamicCache` whose full-attention layers (`layer.CompressedLayer`)
  remember the original position of every entry; it stores, scores and keeps (`keep`, `sizes`,
  `snapshot`) and lists its evictions (`replay_specs`);
- `recorder`: the hooks and the attention function that record, online, what the policy declares in
  `Policy.reads`, through the same functions as the tracer's offline observation, and build the
  `Observation` it scores;
- `schedule`: when a compression happens, one rule for the prefill, decoding and teacher forcing;
- `decoding`: `generate`, `teacher_forced`, greedy decoding and `held` (the prefilled cache, offline);
  `reconstruction_pass` runs KVzip's pass over a frozen snapshot of the cache.

Kept keys keep their RoPE rotation of their original positions (no re-rotation): the cache reports the
original length, and each layer offsets its causal mask by the tokens it has evicted, so a block of new
tokens attends exactly as it would one token at a time, and compressed generation equals the tracer's
masked simulation of the same evictions (`replay_specs`). Sliding-window layers (Gemma3) keep their
own window and are not compressed. Batch size 1 only.
"""

from .cache import CompressedCache, Compression, replay_specs
from .decoding import SAMPLING, generate, greedy_agreement, greedy_continuation, held, teacher_forced
from .layer import CompressedLayer
from .recorder import compressing, observation
from .schedule import Schedule

__all__ = [
    "SAMPLING",
    "CompressedCache",
    "CompressedLayer",
    "Compression",
    "Schedule",
    "compressing",
    "generate",
    "greedy_agreement",
    "greedy_continuation",
    "held",
    "observation",
    "replay_specs",
    "teacher_forced",
]
