"""Forward Influence: evict tokens from a model's KV cache and measure how its future changes.

Modules, in the order a measurement uses them: `models` (load a model), `corpus` and `traces` (what
to study), `eviction` (which keys each query may see), `tracer` (the nnsight pass), `signals`
(per-token entropy, attention and representation change), `logits` (chunked distributions and
divergences), `influence` (batched eviction against the clean run), `selection`, `measure`, `scan`
and `stats` (sets, tables, confidence intervals), `observation` (what compression policies read),
`verify` (masking == physical eviction), `generate` (reasoning traces) and `cli` (the
``forward-influence`` command).
"""

__version__ = "0.1.0"
