"""DeLoRA: Δy = (λ/r)·B·diag(1/(‖A_i‖‖B_i‖))·A·(‖W‖ ⊙ x), a normalised low-rank update
with a learned strength λ. Linear in λ, so λ ↦ c·λ gives Δy(c) = c·Δy exactly
(additive: geometric = linear, inverse −Δy).

PEFT accumulates the updates in place into ``zeros_like(base_out)``, which ``vmap``
refuses for a batched update; while a call runs the forward is swapped for the same
sum out of place.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.delora.layer import DeloraLayer
from torch import Tensor, nn

from .base import Rule, RuleDoc, register, scaling, swapping

_linear = scaling("delora_lambda")


def delora_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``DeloraLayer`` forward with ``add_out = add_out + h``."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    previous_dtype = x.dtype
    if not layer.active_adapters:
        return layer.base_layer(x, *args, **kwargs).to(previous_dtype)
    base_out = layer.base_layer(x, *args, **kwargs)
    add_out = torch.zeros_like(base_out)
    for adapter in layer.active_adapters:
        if adapter not in layer.delora_A:
            continue
        x_d = layer.delora_dropout[adapter](x)
        h = nn.functional.linear(x_d * layer.delora_w_norm[adapter], layer.delora_A[adapter])
        a_norm = torch.clamp(layer.delora_A[adapter].norm(dim=1), min=1e-4)
        b_norm = torch.clamp(layer.delora_B[adapter].norm(dim=0), min=1e-4)
        h = h * ((layer.delora_lambda[adapter] / layer.r[adapter]) / (a_norm * b_norm))
        add_out = add_out + nn.functional.linear(h, layer.delora_B[adapter])
    return (base_out + add_out.to(base_out.dtype)).to(previous_dtype)


DELORA = register(
    Rule(
        name="delora",
        layer_type=DeloraLayer,
        doc=RuleDoc(
            adapter="DeLoRA",
            layers="Linear",
            linear="Δy(c) = c·Δy: λ ↦ c·λ",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: Δy ↦ −Δy",
        ),
        linear=_linear,
        geometric=_linear,
        patches=swapping("forward", delora_forward),
        additive=True,
        commutative=True,
    )
)
