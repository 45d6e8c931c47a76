"""HiRA: ΔW = W₀ ⊙ (B·A), a Hadamard product with the frozen base weight.

A Hadamard product is linear in each factor, so B ↦ c·B gives ΔW(c) = c·ΔW exactly
(additive: geometric = linear, inverse ΔW ↦ −ΔW).
"""

from __future__ import annotations

from peft.tuners.hira.layer import HiraLayer

from .base import additive_rule, register

HIRA = register(
    additive_rule(
        name="hira",
        layer_type=HiraLayer,
        roles=("hira_B", "hira_embedding_B"),
        adapter="HiRA",
        layers="Linear",
        linear="ΔW(c) = c·ΔW: B ↦ c·B in ΔW = W₀ ⊙ (BA)",
        quantized="4-bit nf4, 8-bit",
    )
)
