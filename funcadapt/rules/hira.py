"""HiRA: ΔW = W₀ ⊙ (B·A), a Hadamard product with the frozen base weight.

A Hadamard product is linear in each factor, so B ↦ c·B gives ΔW(c) = c·ΔW exactly
(additive: geometric = linear, inverse ΔW ↦ −ΔW).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peft.tuners.hira.layer import HiraLayer
from torch import Tensor

from .base import Coeff, Effect, Rule, RuleDoc, register, scale

_SCALED = ("hira_B", "hira_embedding_B")


def _linear(spec: Any, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    return Effect({role: scale(t, c) for role, t in p.items() if role in _SCALED})


HIRA = register(
    Rule(
        name="hira",
        layer_type=HiraLayer,
        doc=RuleDoc(
            adapter="HiRA",
            layers="Linear, Conv1D, Embedding",
            linear="ΔW(c) = c·ΔW: B ↦ c·B in ΔW = W₀ ⊙ (BA)",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
    )
)
