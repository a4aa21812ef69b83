"""Scoring policies, one per file, by their CLI names."""

from .base import Policy
from .criticalkv import CriticalKV
from .distilled import Distilled
from .entropy import Entropy
from .evolution import Evolution
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .infokv import InfoKV
from .keydiff import KeyDiff
from .knorm import Knorm
from .kvzip import KVzip
from .learned import Learned
from .optimal import Optimal
from .oracle import Oracle
from .pyramidkv import PyramidKV
from .random_scores import Random
from .rkv import RKV
from .rpc import RPC
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        StreamingLLM,
        SnapKV,
        H2O,
        TOVA,
        Knorm,
        PyramidKV,
        RKV,
        ExpectedAttention,
        RPC,
        KVzip,
        KeyDiff,
        CriticalKV,
        Random,
        Entropy,
        Evolution,
        InfoKV,
        Learned,
        Distilled,
        Oracle,
        Optimal,
    )
}

__all__ = ["POLICIES", "Policy", *[cls.__name__ for cls in POLICIES.values()]]
