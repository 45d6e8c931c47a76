"""HRA: the base weight times a chain of Householder reflections, W·R with
R = H(u₁)···H(u_r) (or, with Gram–Schmidt, R = I − 2·U·Uᵀ for orthonormal U).

linear:    no parameter form (I + c(R − I) is not a product of reflections): the exact
           output interpolation y(c) = y0 + c·(y1 − y0).
geometric: refused: a reflection has no continuous path to the identity.
invert:    exact: reflections are involutions, so R⁻¹ is the chain reversed,
           H(u_r)···H(u₁) (PEFT's own ``get_delta_weight(reverse=True)``). With Gram–Schmidt,
           R = I − 2·U·Uᵀ is its own inverse, so the inverse effect is the adapter itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from peft.tuners.hra.layer import HRALayer
from torch import Tensor

from ..ops import ReverseChain, RuleOp
from .base import Effect, LayerSpec, Patch, Rule, RuleDoc, register


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    if spec.static["apply_GS"]:
        return Effect()  # I − 2·U·Uᵀ is an involution
    return Effect(ops=(ReverseChain(),))


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    if not any(isinstance(op, ReverseChain) for op in ops):
        return []

    def wrap(current: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def reversed_chain(adapter_name: str, reverse: bool = False) -> Tensor:
            return current(adapter_name, reverse=(not reverse) if adapter_name == adapter else reverse)

        return reversed_chain

    return [Patch(layer, "get_delta_weight", wrap, wrap=True)]


HRA = register(
    Rule(
        name="hra",
        layer_type=HRALayer,
        doc=RuleDoc(
            adapter="HRA (Householder reflections)",
            layers="Linear, Conv2d",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="refused: reflections have no path to the identity",
            invert="exact: the reflection chain reversed (Gram–Schmidt: R is its own inverse)",
        ),
        linear=None,
        invert=_invert,
        patches=_patches,
        static=lambda layer, a: {"apply_GS": bool(layer.hra_apply_GS[a]), "r": layer.hra_r[a]},
        no_geometric_reason="a Householder reflection has no continuous path to the identity",
    )
)
