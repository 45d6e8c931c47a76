"""HiRA: ΔW = W₀ ⊙ (B·A), a Hadamard product with the frozen base weight.

A Hadamard product is linear in each factor, so B ↦ c·B gives ΔW(c) = c·ΔW exactly
(additive: geometric = linear, inverse ΔW ↦ −ΔW).
"""

from __future__ import annotations

from peft.tuners.hira.layer import HiraLayer

from .base import Rule, RuleDoc, register, scaling

_linear = scaling("hira_B", "hira_embedding_B")


HIRA = register(
    Rule(
        name="hira",
        layer_type=HiraLayer,
        doc=RuleDoc(
            adapter="HiRA",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: B ↦ c·B in ΔW = W₀ ⊙ (BA)",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
            quantized="4-bit nf4, 8-bit",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
    )
)
