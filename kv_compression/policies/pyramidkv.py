from __future__ import annotations

from dataclasses import dataclass

from forward_influence.errors import InputError

from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with a pyramid of layer budgets (PyramidKV, Cai et al., arXiv 2406.02069).

    Tokens are scored as in SnapKV. The layer budgets fall linearly from the bottom layer to the top
    one with the same total as a uniform budget: with b the uniform per-layer budget beyond the
    window, the top layer keeps ``b / beta`` and the bottom one ``2b - b / beta`` (plus the window).
    Scores: [batch, kv_heads, tokens]; higher means keep.
    """

    name = "pyramidkv"
    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise InputError(f"pyramidkv: beta must be at least 1, got {self.beta}")

    def layer_budgets(self, tokens: int, num_layers: int) -> list[int]:
        if num_layers == 1:
            return [tokens]
        extra = max(tokens - self.window, 0)
        top = extra / self.beta
        bottom = 2 * extra - top
        return [
            round(bottom - (bottom - top) * layer / (num_layers - 1)) + min(tokens, self.window)
            for layer in range(num_layers)
        ]
