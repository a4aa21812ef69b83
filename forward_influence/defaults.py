"""The measurement conventions every layer shares, each a named number.

- `TOP_K`: k of the top-k entropy signals (the k most probable next tokens, renormalised).
- `SINKS`: the first positions a selection never evicts (attention sinks; evicting them measures the
  sink effect rather than the token).
- `WINDOW`: SnapKV's observation window, the last queries whose attention scores a token.
- `RECENT`: the most recent tokens a policy protects (kept at every budget); as many as SnapKV's window,
  so a policy never evicts a token its window's queries have just read.
- `QUERY_WINDOW`: the recent queries an observation keeps, so every default policy finds its window in it.
- `NEAR`, `FAR_FROM`: the distances of near (1-8) and far (33 and beyond) Forward Influence.
- `SCAN_METHODS`: how a scan gets each token's influence: ``exact`` (one replay per token) or
  ``gradient`` (all tokens from the gates' gradients, `forward_influence.gradient`).
- `GRADIENT_SAMPLES`: the sampled continuations of the gradient estimate (its Monte Carlo size).
"""

TOP_K = 10
SINKS = 4
WINDOW = 32
RECENT = WINDOW
QUERY_WINDOW = 64
NEAR = (1, 8)
FAR_FROM = 33
SCAN_METHODS = ("exact", "gradient")
GRADIENT_SAMPLES = 8
