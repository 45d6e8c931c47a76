"""VeRA: ΔW = Λ_b·B·Λ_d·A with frozen shared random A, B and trained vectors λ_b, λ_d.

ΔW is linear in λ_b, so λ_b ↦ c·λ_b gives ΔW(c) = c·ΔW exactly; additive, so
geometric equals linear and the inverse is ΔW ↦ −ΔW.
"""

from __future__ import annotations

from collections.abc import Mapping

from peft.tuners.vera.layer import VeraLayer
from torch import Tensor

from .base import Coeff, Effect, Rule, RuleDoc, register, scale


def _linear(spec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    return Effect({"vera_lambda_b": scale(p["vera_lambda_b"], c)})


VERA = register(
    Rule(
        name="vera",
        layer_type=VeraLayer,
        doc=RuleDoc(
            adapter="VeRA",
            layers="Linear, Conv1D",
            linear="ΔW(c) = c·ΔW: λ_b ↦ c·λ_b",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=_linear,
        additive=True,
        commutative=True,
        geometric=_linear,
    )
)
