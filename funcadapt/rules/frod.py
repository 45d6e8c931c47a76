"""FRoD: the adapted weight is rebuilt as W' = U·(S + diag(λ))·Vᵀ, with V a frozen basis
shared by a category of layers, U frozen per layer, λ trained per layer and S a trained
sparse matrix at fixed positions; PEFT's forward computes y = W'x (+ bias) directly.

ΔW = W' − W₀ is affine, not linear, in the trained tensors: at initialisation
U·diag(λ₀)·Vᵀ only approximately reproduces W₀ (a float64 solve rounded to the layer's
dtype), so no parameter-space transform gives exactly the base layer at c = 0.
``mode="linear"`` therefore interpolates the layer output, y(c) = y₀ + c·(y₁ − y₀) with
y₀ the base layer (exact by construction). The effects of several FRoD adapters on one
layer add up (PEFT adds W'ᵢx − W₀x per adapter), so the rule is additive and commutative.
``mode="geometric"`` and ``op="invert"`` are refused: a reconstructed weight has no group
structure, and W'⁻¹-style inverses are not what the adapter means.
"""

from __future__ import annotations

from peft.tuners.frod.layer import FrodLayer

from .base import Rule, RuleDoc, register

FROD = register(
    Rule(
        name="frod",
        layer_type=FrodLayer,
        doc=RuleDoc(
            adapter="FRoD",
            layers="Linear, Conv1D",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="refused: no group structure",
            invert="refused (use op='scale', coeff=-1)",
        ),
        linear=None,
        additive=True,
        commutative=True,
        no_geometric_reason=(
            "FRoD replaces the weight by a reconstruction U(S + diag λ)Vᵀ whose difference to the base weight "
            "is affine, not linear, in its parameters; it has no group structure"
        ),
    )
)
