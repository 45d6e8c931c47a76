"""PVeRA: VeRA with a probabilistic bottleneck, Δy = λ_b·B·z with z ~ N(μ, σ²) from
(μ, log σ²) = λ_d·A·x (z = μ at inference unless ``sample_at_inference``).

The term is linear in λ_b whatever z is, so λ_b ↦ c·λ_b scales the effect exactly,
sampled or not (additive: geometric = linear, inverse −Δy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peft.tuners.pvera.layer import PveraLayer
from torch import Tensor

from .base import Coeff, Effect, Rule, RuleDoc, register, scale


def _linear(spec: Any, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    return Effect({"pvera_lambda_b": scale(p["pvera_lambda_b"], c)})


PVERA = register(
    Rule(
        name="pvera",
        layer_type=PveraLayer,
        doc=RuleDoc(
            adapter="PVeRA",
            layers="Linear, Conv1D",
            linear="Δy(c) = c·Δy: λ_b ↦ c·λ_b",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: Δy ↦ −Δy",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
    )
)
