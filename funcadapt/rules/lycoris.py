"""LyCORIS adapters: LoHa and LoKr.

LoHa: ΔW = s·(W1a·W1b) ⊙ (W2a·W2b)   (CP form: the same with Tucker cores t1, t2)
LoKr: ΔW = s·W1 ⊗ W2                 (W1, W2 full, factored W·a·W·b, or CP)

A Hadamard or Kronecker product is linear in each factor, so scaling one factor
(LoHa's W1a, LoKr's W1 or W1a) gives ΔW(c) = c·ΔW exactly. Additive: geometric =
linear, the inverse is ΔW ↦ −ΔW.

PEFT builds LoHa's weight with ``HadaWeight``, an ``autograd.Function`` without
``setup_context`` that ``vmap`` refuses, and decides module dropout with a Python
``if`` on a random draw, which ``vmap`` cannot branch on. While a call runs, the layer's
``get_delta_weight`` (LoHa) and ``forward`` (both) are swapped for the same math in
plain ops; module dropout becomes a 0/1 factor drawn the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from torch import Tensor

from ..ops import RuleOp
from .base import Patch, Rule, RuleDoc, register, scaling, swap_under_transforms


def loha_delta_weight(layer: Any, adapter: str, *, apply_rank_dropout: bool = False) -> Tensor:
    """PEFT's ``LoHaLayer.get_delta_weight`` without the custom autograd.Functions."""
    s = torch.tensor(layer.scaling[adapter])
    w1a, w1b = layer.hada_w1_a[adapter], layer.hada_w1_b[adapter]
    w2a, w2b = layer.hada_w2_a[adapter], layer.hada_w2_b[adapter]
    if adapter in layer.hada_t1:
        t1, t2 = layer.hada_t1[adapter], layer.hada_t2[adapter]
        first = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        second = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        weight = first * second * s
    else:
        weight = ((w1a @ w1b) * (w2a @ w2b)) * s
    weight = weight.reshape(layer.get_base_layer().weight.shape)
    rank_dropout = layer.rank_dropout[adapter]
    if apply_rank_dropout:
        drop = (torch.rand(weight.size(0)) > rank_dropout).to(weight.dtype)
        drop = drop.view(-1, *[1] * len(weight.shape[1:])).to(weight.device)
        weight = weight * (drop / drop.mean())
    return weight


def lycoris_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``LycorisLayer``-style forward with module dropout as a factor, not a branch."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    for adapter in layer.active_adapters:
        if adapter not in layer._available_adapters:
            continue
        keep = torch.rand(1) > layer.module_dropout[adapter] if layer.training else None  # PEFT's draw order
        delta = layer._get_delta_activations(adapter, x, *args, **kwargs)
        if keep is not None:
            delta = delta * keep.to(device=delta.device, dtype=delta.dtype)
        result = result + delta
    return result.to(previous_dtype)


def _loha_patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    return [
        swap_under_transforms(layer, "get_delta_weight", loha_delta_weight),
        swap_under_transforms(layer, "forward", lycoris_forward),
    ]


def _lokr_patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    return [swap_under_transforms(layer, "forward", lycoris_forward)]


LOHA = register(
    Rule(
        name="loha",
        layer_type=LoHaLayer,
        doc=RuleDoc(
            adapter="LoHa",
            layers="Linear, Conv2d",
            linear="ΔW(c) = c·ΔW: W1a ↦ c·W1a in ΔW = s·(W1a W1b) ⊙ (W2a W2b)",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=scaling("hada_w1_a"),
        geometric=scaling("hada_w1_a"),
        patches=_loha_patches,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"scaling": layer.scaling.get(a)},
    )
)

LOKR = register(
    Rule(
        name="lokr",
        layer_type=LoKrLayer,
        doc=RuleDoc(
            adapter="LoKr",
            layers="Linear, Conv2d",
            linear="ΔW(c) = c·ΔW: W1 ↦ c·W1 in ΔW = s·W1 ⊗ W2",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=scaling("lokr_w1", "lokr_w1_a"),
        geometric=scaling("lokr_w1", "lokr_w1_a"),
        patches=_lokr_patches,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"scaling": layer.scaling.get(a)},
    )
)
