"""VB-LoRA: ΔW = B·A, every length-b piece of A and B a softmax-weighted mix of the top-k
vectors of a vector bank shared by *all* layers of the adapter:
A[piece] = Σᵢ softmax(top-k logits)ᵢ · bank[idxᵢ], likewise B.

No trained tensor enters ΔW linearly: the logits go through top-k and softmax, and the
bank enters both A and B (ΔW is quadratic in it; scaling it by √c would only reach
c ≥ 0, and would act on every layer at once). The per-layer factor B can still be scaled
exactly where PEFT builds it: while a call runs, the layer's ``_get_lora_matrices``
returns (A, c·B) for this adapter, so ΔW(c) = c·ΔW at every layer, for any c, with
nothing shared touched. Additive: geometric = linear, inverse ΔW ↦ −ΔW.

PEFT's forward adds out of place, so it runs under torch.func transforms as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peft.tuners.vblora.layer import VBLoRALayer
from torch import Tensor

from ..ops import RuleOp, scale_inside
from .base import Patch, Rule, RuleDoc, register, scale, scaled_inside


def scaled_lora_matrices(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    """Patches that make ``layer._get_lora_matrices(adapter, ...)`` return (A, c·B) for this
    adapter, with c the coefficient of its :class:`~funcadapt.ops.ScaleInside`. Nested calls wrap
    what is installed, so their coefficients multiply."""
    c = scale_inside(ops)
    if c is None:
        return []

    def wrap(current: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
        def lora_matrices(adapter_name: str, *rest: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            a, b = current(adapter_name, *rest, **kwargs)
            return (a, scale(b, c)) if adapter_name == adapter else (a, b)

        return lora_matrices

    return [Patch(layer, "_get_lora_matrices", wrap, wrap=True)]


VBLORA = register(
    Rule(
        name="vblora",
        layer_type=VBLoRALayer,
        doc=RuleDoc(
            adapter="VB-LoRA (shared vector bank)",
            layers="Linear, Conv1D",
            linear="ΔW(c) = c·ΔW: B ↦ c·B where PEFT builds B from the bank (the shared bank is not touched)",
            linear_exact="exact (forward-time B ↦ c·B)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=scaled_inside,
        geometric=scaled_inside,
        patches=scaled_lora_matrices,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"r": layer.r[a], "topk": layer.topk[a]},
    )
)
