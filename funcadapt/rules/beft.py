"""BEFT: a trained bias offset added to the layer output, y' = y + β.

linear:    β ↦ c·β, so Δy(c) = c·Δy exactly. Additive: geometric = linear, invert β ↦ −β.
"""

from __future__ import annotations

from peft.tuners.beft.layer import BeftLayer

from .base import Rule, RuleDoc, register, scaling

_linear = scaling("beft_bias")

BEFT = register(
    Rule(
        name="beft",
        layer_type=BeftLayer,
        doc=RuleDoc(
            adapter="BEFT (bias offset)",
            layers="Linear",
            linear="Δy(c) = c·Δy: β ↦ c·β in y + β",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: β ↦ −β",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
    )
)
