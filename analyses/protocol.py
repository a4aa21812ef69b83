"""The protocol of the analyses: each number that fixes what an experiment measures, named once.

- `PREFIX`: the tokens observed and compressed per document of the fidelity task, and the segment
  whose last position is the common eviction time of the influence analyses (learned, headroom,
  gradient-vs-exact): t = PREFIX - 1.
- `CONTINUATION`: the reference tokens that follow each prefix, over which the fidelity task measures.
- `INFLUENCE_DISTANCE`: the future each token's exact influence is measured over at t (its far part,
  ``fi_far``, is distances `forward_influence.defaults.FAR_FROM` to this one).
- `FAR_PREFIX`, `FAR_BUCKET`, `PAPER_TOP_K`: the InfoKV paper's far-distance protocol: the tokens
  compressed, the width of a bucket of distance, and the k of its entropy.
"""

PREFIX = 1024
CONTINUATION = 256
INFLUENCE_DISTANCE = 64
FAR_PREFIX = 2048
FAR_BUCKET = 128
PAPER_TOP_K = 256
