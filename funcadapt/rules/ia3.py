"""(IA)³: a learned vector λ multiplies the layer's output (or, feed-forward, its input).

linear:    λ ↦ 1 + c·(λ − 1)   y(c) = y0 + c·(y1 − y0) exactly, since y is linear in λ
geometric: λ ↦ λ^c             the multiplicative one-parameter group; needs λ > 0
invert:    λ ↦ 1/λ             (geometric at c = −1)
"""

from __future__ import annotations

from collections.abc import Mapping

from peft.tuners.ia3.layer import IA3Layer
from torch import Tensor

from .base import Coeff, Effect, Rule, RuleDoc, lerp_from_one, power, register, require_positive


def _linear(spec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    return Effect({"ia3_l": lerp_from_one(p["ia3_l"], c)})


def _geometric(spec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    require_positive(p["ia3_l"], "the (IA)³ vector", spec.path, spec.adapter)
    return Effect({"ia3_l": power(p["ia3_l"], c)})


IA3 = register(
    Rule(
        name="ia3",
        layer_type=IA3Layer,
        doc=RuleDoc(
            adapter="(IA)³ (incl. feed-forward)",
            layers="Linear, Conv1D, Conv2d",
            linear="λ ↦ 1 + c·(λ − 1)",
            linear_exact="exact (parameter space)",
            geometric="λ ↦ λ^c (λ > 0)",
            invert="exact: λ ↦ 1/λ",
            quantized=(
                "4-bit nf4, fp4 + double quant (bf16), 8-bit "
                "(linear mode: output interpolation where it acts on the input)"
            ),
        ),
        linear=_linear,
        commutative=True,
        acts_on_input=lambda spec: bool(spec.static.get("is_feedforward")),
        geometric=_geometric,
        static=lambda layer, a: {"is_feedforward": bool(layer.is_feedforward)},
    )
)
