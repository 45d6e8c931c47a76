"""PEANuT: ΔW = s·(B·f(W₀ᵀ))ᵀ, f a small non-linear encoder/decoder network (A, encoders,
decoders, activation) fed the frozen base weight W₀, B the output projection.

ΔW is linear in B (B is applied last, after every non-linearity), so B ↦ c·B gives
ΔW(c) = c·ΔW exactly; additive, so geometric equals linear and the inverse is ΔW ↦ −ΔW.
PEFT's forward is out of place, so it runs unchanged under torch.func transforms.
"""

from __future__ import annotations

from peft.tuners.peanut.layer import PeanutLayer

from .base import additive_rule, register

PEANUT = register(
    additive_rule(
        name="peanut",
        layer_type=PeanutLayer,
        roles=("peanut_B.weight",),
        adapter="PEANuT",
        layers="Linear",
        linear="ΔW(c) = c·ΔW: B ↦ c·B in ΔW = s·(B·f(W₀ᵀ))ᵀ",
    )
)
