"""Forward Influence: evict tokens from a model's KV cache and measure how its future changes.

Modules, in the order a measurement uses them: `sources` and `models` (check and load a model),
`corpus` and `traces` (what to study), `eviction` (which keys each query may see), `tracer` (the
nnsight pass), `signals` (per-token entropy, attention and representation change), `logits`
(chunked distributions and divergences), `influence` (batched eviction against the clean run),
`selection`, `measure`, `scan` and `stats` (sets, tables, confidence intervals), `gates`,
`gradient` and `set_optimum` (soft eviction, gradient influence, the optimal eviction set),
`reconstruction` (KVzip's signal), `observation` (what compression policies read), `verify`
(masking == physical eviction) and `generate` (reasoning traces). The ``forward-influence`` command
is `forward_influence_cli`.
"""

__version__ = "0.1.0"
