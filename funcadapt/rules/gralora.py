"""GraLoRA: the weight split into k×k blocks, block (i, j) adapted by its own low-rank
pair, ΔW_ij = s·B_j-part · A_i-part; optionally plus a plain LoRA term s·B_g·A_g of rank
``hybrid_r``.

ΔW is linear in the stacked B factors and in B_g, so B ↦ c·B and B_g ↦ c·B_g give
ΔW(c) = c·ΔW exactly (additive: geometric = linear, inverse ΔW ↦ −ΔW).

PEFT's forward adds in place (``result += ...``), which ``vmap`` refuses for a batched
update into the unbatched base output, and ``.view``s tensors that may not be viewable
under vmap. Under torch.func transforms only, the forward is swapped for the same math
out of place (``reshape`` for ``view``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.gralora.layer import GraloraLayer
from torch import Tensor

from .base import additive_rule, register, swapping


def gralora_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``gralora.Linear.forward``, out of place."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    flat = x.ndim == 2
    if flat:
        x = x.unsqueeze(1)
    for adapter in layer.active_adapters:
        if adapter not in layer.gralora_A:
            continue
        a, b = layer.gralora_A[adapter], layer.gralora_B[adapter]
        k = layer.gralora_k[adapter]
        sub = layer.r[adapter] // k
        dropout = layer.gralora_dropout[adapter]
        s = layer.scaling[adapter]
        batch, length, features = x.shape
        h = torch.einsum("blni,nir->blnr", dropout(x.to(a.dtype)).reshape(batch, length, k, features // k), a)
        h = h.reshape(batch, length, k, k, sub).permute(0, 1, 3, 2, 4).reshape(batch, length, k, k * sub)
        out = torch.einsum("bljr,jro->bljo", h, b).reshape(batch, length, -1)
        if flat:
            out = out.squeeze(1)
        result = result + s * out.to(result_dtype)
        if layer.hybrid_r[adapter] > 0:
            hybrid = layer.gralora_B_general[adapter](layer.gralora_A_general[adapter](dropout(x.to(a.dtype))))
            if flat:
                hybrid = hybrid.squeeze(1)
            result = result + s * hybrid.to(result_dtype)
    return result.to(previous_dtype)


GRALORA = register(
    additive_rule(
        name="gralora",
        layer_type=GraloraLayer,
        roles=("gralora_B", "gralora_B_general.weight"),
        adapter="GraLoRA (incl. hybrid_r)",
        layers="Linear, Conv1D",
        linear="ΔW(c) = c·ΔW: B ↦ c·B (block factors and the hybrid LoRA's B)",
        patches=swapping("forward", gralora_forward),
        static=lambda layer, a: {
            "r": layer.r[a],
            "k": layer.gralora_k[a],
            "hybrid_r": layer.hybrid_r[a],
            "scaling": layer.scaling[a],
        },
    )
)
