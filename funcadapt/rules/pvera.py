"""PVeRA: VeRA with a probabilistic bottleneck, Δy = λ_b·B·z with z ~ N(μ, σ²) from
(μ, log σ²) = λ_d·A·x (z = μ at inference unless ``sample_at_inference``).

The term is linear in λ_b whatever z is, so λ_b ↦ c·λ_b scales the effect exactly,
sampled or not (additive: geometric = linear, inverse −Δy).
"""

from __future__ import annotations

from peft.tuners.pvera.layer import PveraLayer

from .base import Rule, RuleDoc, register, scaling

_linear = scaling("pvera_lambda_b")


PVERA = register(
    Rule(
        name="pvera",
        layer_type=PveraLayer,
        doc=RuleDoc(
            adapter="PVeRA",
            layers="Linear",
            linear="Δy(c) = c·Δy: λ_b ↦ c·λ_b",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: Δy ↦ −Δy",
            quantized="4-bit nf4, 8-bit",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
    )
)
