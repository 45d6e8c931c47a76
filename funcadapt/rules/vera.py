"""VeRA: ΔW = Λ_b·B·Λ_d·A with frozen shared random A, B and trained vectors λ_b, λ_d.

ΔW is linear in λ_b, so λ_b ↦ c·λ_b gives ΔW(c) = c·ΔW exactly; additive, so
geometric equals linear and the inverse is ΔW ↦ −ΔW.
"""

from __future__ import annotations

from peft.tuners.vera.layer import VeraLayer

from .base import Rule, RuleDoc, register, scaling

_linear = scaling("vera_lambda_b")


VERA = register(
    Rule(
        name="vera",
        layer_type=VeraLayer,
        doc=RuleDoc(
            adapter="VeRA",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: λ_b ↦ c·λ_b",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
            quantized="4-bit nf4, 8-bit",
        ),
        linear=_linear,
        additive=True,
        commutative=True,
        geometric=_linear,
    )
)
