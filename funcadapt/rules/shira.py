"""SHiRA: a sparse high-rank update, W + ΔW with ΔW = s·S(v): the trained values v
placed at fixed (masked) positions of an otherwise zero matrix.

S is linear in v, so v ↦ c·v gives ΔW(c) = c·ΔW exactly (additive: geometric = linear,
inverse ΔW ↦ −ΔW). PEFT's forward runs ``F.linear(x, W + ΔW, b)``, so the layer output
is exactly y0 + c·(y1 − y0).

PEFT builds ΔW as a ``torch.sparse_coo_tensor`` and adds it in place into a copy of W;
neither works with a batched (vmapped) v. Under torch.func transforms only, the layer's
forward is swapped for the same math with a dense, out-of-place scatter of the values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.shira.layer import ShiraLayer
from torch import Tensor

from .base import additive_rule, register, swapping


def dense_delta(layer: Any, adapter: str) -> Tensor:
    """PEFT's ``get_delta_weight`` as a dense tensor built out of place (duplicate positions,
    which a SHiRA mask never has, would add up as in a sparse COO tensor)."""
    values = layer.shira_weight[adapter] * layer.scaling[adapter]
    rows, cols = layer.shira_indices[adapter].to(values.device).long()
    dense = torch.zeros(layer.out_features, layer.in_features, device=values.device, dtype=values.dtype)
    return dense.index_put((rows, cols), values, accumulate=True)


def shira_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``shira.Linear.forward`` with dense out-of-place additions."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    adapters = [a for a in layer.active_adapters if a in layer.shira_weight]
    backend = layer.quantization_backend
    if backend and not backend.supports_merge:
        base_result = layer.base_layer(x, *args, **kwargs)
        update = torch.zeros(layer.out_features, layer.in_features).to(base_result)
        for adapter in adapters:
            update = (update + dense_delta(layer, adapter)).to(update.dtype)
        return base_result + F.linear(x, update)
    weight = layer.get_base_weight()
    for adapter in adapters:
        weight = (weight + dense_delta(layer, adapter)).to(weight.dtype)
    return F.linear(x, weight, bias=layer.base_layer.bias)


SHIRA = register(
    additive_rule(
        name="shira",
        layer_type=ShiraLayer,
        roles=("shira_weight",),
        adapter="SHiRA (sparse high-rank)",
        layers="Linear",
        linear="ΔW(c) = c·ΔW: values ↦ c·values in ΔW = s·S(v)",
        patches=swapping("forward", shira_forward),
        static=lambda layer, a: {"r": layer.r[a], "scaling": layer.scaling[a]},
    )
)
