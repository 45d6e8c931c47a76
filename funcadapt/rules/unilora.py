"""Uni-LoRA: ΔW = B·A with A = θ[I_A] ⊙ S_A and B = θ[I_B] ⊙ S_B, every entry of every
layer's A and B drawn (by fixed indices I, with fixed normalising scales S) from one
trained vector θ shared by all layers of the adapter.

ΔW is quadratic in θ, the only trained tensor (scaling θ by √c would only reach c ≥ 0
and touches every layer at once). The per-layer factor B is scaled exactly where PEFT
builds it instead: while a call runs, the layer's ``_get_lora_matrices`` returns
(A, c·B) for this adapter, so ΔW(c) = c·ΔW at every layer, for any c, with θ untouched.
Additive: geometric = linear, inverse ΔW ↦ −ΔW.

PEFT's forward adds out of place, so it runs under torch.func transforms as it is.
"""

from __future__ import annotations

from peft.tuners.unilora.layer import UniLoraLayer

from .base import Rule, RuleDoc, register, scaled_inside
from .vblora import scaled_lora_matrices

UNILORA = register(
    Rule(
        name="unilora",
        layer_type=UniLoraLayer,
        doc=RuleDoc(
            adapter="Uni-LoRA (one shared vector θ)",
            layers="Linear, Conv1D",
            linear="ΔW(c) = c·ΔW: B ↦ c·B where PEFT builds B from θ (the shared θ is not touched)",
            linear_exact="exact (forward-time B ↦ c·B)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=scaled_inside,
        geometric=scaled_inside,
        patches=scaled_lora_matrices,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"r": layer.r[a]},
    )
)
