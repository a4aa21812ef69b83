"""KV-cache compression: scoring policies, budgets and a cache that evicts during generation.

`policies` holds one small dataclass per method with a ``score(obs, layer)``; `budget` says how many
tokens are kept and `kept` which ones the scores select (uniform, pyramid or per-head allocation);
`offline` reads the observations a set of policies scores a whole trace from (measurement); `runtime`
is the transformers cache that records observations online and evicts physically during prefill and
decoding. Built on
`forward_influence` (observations, eviction specs, chunked entropy).
"""
