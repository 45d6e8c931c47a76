"""PEANuT: ΔW = s·(B·f(W₀ᵀ))ᵀ, f a small non-linear encoder/decoder network (A, encoders,
decoders, activation) fed the frozen base weight W₀, B the output projection.

ΔW is linear in B (B is applied last, after every non-linearity), so B ↦ c·B gives
ΔW(c) = c·ΔW exactly; additive, so geometric equals linear and the inverse is ΔW ↦ −ΔW.
PEFT's forward is out of place, so it runs unchanged under torch.func transforms.
"""

from __future__ import annotations

from peft.tuners.peanut.layer import PeanutLayer

from .base import Rule, RuleDoc, register, scaling

_linear = scaling("peanut_B.weight")


PEANUT = register(
    Rule(
        name="peanut",
        layer_type=PeanutLayer,
        doc=RuleDoc(
            adapter="PEANuT",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: B ↦ c·B in ΔW = s·(B·f(W₀ᵀ))ᵀ",
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
