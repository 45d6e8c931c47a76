"""Lily: the layer adds s·h·B̄ with h = A·x, B̄ = Σₑ p̄ₑ·Bₑ and p̄ the router's softmax
over the experts Bₑ, averaged over *all tokens of the batch*. A is shared by groups of
``stride_A`` consecutive layers and the experts B by all layers of one target kind; the
router is per layer.

The added output is linear in B and in the layer's float scale s, and p̄ does not depend
on either. Scaling the shared B would act on every layer that shares it, including
layers where funcadapt interpolates the output instead, so the per-layer part is scaled:
while a call runs, the layer's ``scaling[adapter]`` is c·s, giving exactly
y(c) = y0 + c·(y1 − y0) at every layer with nothing shared touched. Additive: geometric
= linear, inverse: the added output negated.

The effect depends on the batch (p̄ averages over it, padding included): the same as in
PEFT, since funcadapt runs PEFT's forward. For that reason per-row coefficients
(``funcadapt.per_row``) are refused: rows of one batch are not independent. ``vmap``
over coefficients is exact (each vmapped batch averages over itself). PEFT's forward
adds out of place, so it runs under torch.func transforms as it is.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lily.layer import LilyLayer

from ..ops import RuleOp, scale_inside
from .base import Patch, Rule, RuleDoc, register, scaled_inside, scaled_multiplier


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    c = scale_inside(ops)
    if c is None:
        return []
    return [Patch(layer.scaling, adapter, lambda s: scaled_multiplier(s, c), item=True)]


LILY = register(
    Rule(
        name="lily",
        layer_type=LilyLayer,
        doc=RuleDoc(
            adapter="Lily (shared A / expert Bs, router)",
            layers="Linear",
            linear=(
                "y(c) = y0 + c·(y1 − y0): the layer's scale s ↦ c·s (shared A, Bs untouched); "
                "per_row, per_token, per_image refused"
            ),
            linear_exact="exact (forward-time s ↦ c·s)",
            geometric="= linear (additive)",
            invert="exact: the added output negated",
        ),
        linear=scaled_inside,
        geometric=scaled_inside,
        patches=_patches,
        rows_coupled="Lily's router averages its expert weights over all tokens of the batch",
        additive=True,
        commutative=True,
        static=lambda layer, a: {"r": layer.r[a], "num_B": layer.num_B[a], "stride_A": layer.stride_A[a]},
    )
)
