"""RandLoRA: ΔW = s·B·(Λ ⊙ A ⊙ Γ) with frozen random bases A, B and trained Λ, Γ.

ΔW is linear in Λ, so Λ ↦ c·Λ gives ΔW(c) = c·ΔW exactly (additive: geometric =
linear, inverse ΔW ↦ −ΔW).

PEFT builds Λ ⊙ A ⊙ Γ with ``UniqueBaseGrad``, an ``autograd.Function`` without
``setup_context`` that ``torch.func.vmap`` refuses. While a call runs, the layer's
``get_scaled_bases`` is swapped for the same product in plain differentiable ops:
the forward is identical and autograd gives the same gradients for Λ and Γ (the
bases are frozen buffers).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.randlora.layer import RandLoraLayer
from torch import Tensor

from .base import Rule, RuleDoc, register, scaling, swapping

_linear = scaling("randlora_lambda")


def scaled_bases(layer: Any, adapter: str, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """PEFT's ``RandLoraLayer.get_scaled_bases`` without the custom autograd.Function."""
    bases_a, bases_b = layer.randlora_A[adapter], layer.randlora_B[adapter]
    if device is None:
        device = bases_b.device
    lam = layer.randlora_lambda[adapter].to(device)
    gam = layer.randlora_gamma[adapter].to(device)
    if device.type == "cpu" and bases_b.dtype in (torch.float16, torch.bfloat16):
        bases_a, bases_b, lam, gam = bases_a.float(), bases_b.float(), lam.float(), gam.float()
    min_dim = min(layer.out_features, layer.in_features)
    max_dim = max(layer.out_features, layer.in_features)
    sliced_a = bases_a[:, : layer.num_bases, :min_dim].to(device)
    sliced_b = bases_b[:max_dim, : layer.num_bases, :].to(device)
    update_b = sliced_b.flatten(start_dim=1)
    update_a = (lam[:, :, None] * sliced_a * gam[None]).flatten(end_dim=1)
    if min_dim == layer.in_features:
        return update_a, update_b
    return update_b.T, update_a.T


RANDLORA = register(
    Rule(
        name="randlora",
        layer_type=RandLoraLayer,
        doc=RuleDoc(
            adapter="RandLoRA",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: Λ ↦ c·Λ",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
            quantized="4-bit nf4, 8-bit",
        ),
        linear=_linear,
        additive=True,
        commutative=True,
        geometric=_linear,
        patches=swapping("get_scaled_bases", scaled_bases),
        static=lambda layer, a: {"scaling": layer.scaling.get(a)},
    )
)
