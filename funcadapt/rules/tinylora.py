"""TinyLoRA: ΔW = B·R·A with R = Σᵢ vᵢ·Pᵢ, where A, B are the frozen truncated SVD
factors of the base weight, Pᵢ frozen random r×r matrices and v a tiny trained vector.

ΔW is linear in R, so R ↦ c·R gives ΔW(c) = c·ΔW exactly (additive: geometric = linear,
inverse −ΔW). The one trained tensor, v, is *shared*: PEFT keeps one v per group of
layers (``weight_tying``) in a model-level ``ParameterDict`` that every layer of the
group (indeed every TinyLoRA layer) reaches through the same object, so a new v cannot be
shown to one layer without showing it to all of them. Scaling v would therefore be wrong
wherever one layer of the group is treated differently (a layer interpolated jointly
with a non-additive adapter stacked on it). The coefficient is applied per layer
instead, at forward time: while a call runs, the layer's ``_compute_R`` returns c·R for
this adapter. v itself is never copied or scaled, so gradients reach it once, through
every layer that uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peft.tuners.tinylora.layer import TinyLoraLayer
from torch import Tensor

from ..ops import RuleOp, scale_inside
from .base import Patch, Rule, RuleDoc, register, scale, scaled_inside


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    c = scale_inside(ops)
    if c is None:
        return []

    def wrap(current: Callable[[str], Tensor]) -> Callable[[str], Tensor]:
        def compute_r(adapter_name: str) -> Tensor:
            r = current(adapter_name)
            return scale(r, c) if adapter_name == adapter else r

        return compute_r

    return [Patch(layer, "_compute_R", wrap, wrap=True)]


def _static(layer: Any, adapter: str) -> dict[str, Any]:
    return {"group": layer._tinylora_v_key.get(adapter), "r": layer.r.get(adapter)}


TINYLORA = register(
    Rule(
        name="tinylora",
        layer_type=TinyLoraLayer,
        doc=RuleDoc(
            adapter="TinyLoRA",
            layers="Linear, Conv1D, Embedding",
            linear="ΔW(c) = c·ΔW: R ↦ c·R in ΔW = B·R·A, R = Σ vᵢPᵢ (per layer, at forward time; v is shared)",
            linear_exact="exact (forward-time, per layer)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=scaled_inside,
        geometric=scaled_inside,
        patches=_patches,
        static=_static,
        additive=True,
        commutative=True,
    )
)
