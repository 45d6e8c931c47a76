"""GLoRA: one generalised update of weight and bias,

    W' = W + W⊙A + B,   b' = b + b⊙D + E + W·C,

each of A…E a low-rank product Xd·Xu ("lora"), a vector or a scalar X ("vector",
"constant"), or absent ("none"; C, D, E also when the base layer has no bias).

linear:    the update is linear in (A, B, C, D, E) jointly and each is linear in its Xd (or X):
           Xd ↦ c·Xd, X ↦ c·X gives ΔW(c) = c·ΔW, Δb(c) = c·Δb exactly.
           Additive (PEFT sums the adapters' updates): geometric = linear, invert −Δ.
"""

from __future__ import annotations

from peft.tuners.glora.layer import GloraLayer

from .base import Rule, RuleDoc, register, scaling

_ROLES = tuple(f"glora_{m}.{x}" for m in "ABCDE" for x in ("Xd", "X"))
_linear = scaling(*_ROLES)


GLORA = register(
    Rule(
        name="glora",
        layer_type=GloraLayer,
        doc=RuleDoc(
            adapter="GLoRA (lora / vector / constant paths)",
            layers="Linear",
            linear="ΔW(c) = c·ΔW, Δb(c) = c·Δb: Xd ↦ c·Xd (X ↦ c·X) in W⊙A + B, b⊙D + E + W·C",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: (ΔW, Δb) ↦ −(ΔW, Δb)",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"r": layer.r.get(a)},
    )
)
