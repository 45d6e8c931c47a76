"""BOFT: butterfly orthogonal fine-tuning. The base weight is rotated on its input side and
scaled per output channel,

    W' = diag(s)·W·Rᵀ,   R = F_m···F_1,   F_i = P_i·blockdiag(Cayley(Q_ij))·P_iᵀ,

with Q = ½(B − Bᵀ) the skew part of the trained blocks ``boft_R`` (so Q is linear in them),
``P_i`` fixed butterfly permutations and ``s`` the trained vector ``boft_s``. The bias is not
rotated or scaled. Linear and Conv2d (the rotation acts on the flattened ``in·k·k`` filter).

linear:    no parameter form (W + c(diag(s)·W·Rᵀ − W) is not of BOFT's form): the exact output
           interpolation y(c) = y0 + c·(y1 − y0).
geometric: B ↦ c·B and s ↦ s^c, i.e. W'(c) = diag(s^c)·W·Cayley(c·Q)ᵀ per factor: the
           Cayley path of each rotation block and the multiplicative path of the scale.
           Needs s > 0. (Cayley is not the exponential map: Cayley(aQ)·Cayley(bQ) ≠
           Cayley((a+b)Q) in general, so this is a path through the identity and the
           adapter, not a one-parameter group; c = −1 is the exact inverse, see below.)
invert:    exact: B ↦ −B (Cayley(−Q) = Cayley(Q)⁻¹ exactly, PEFT's Cayley is the exact
           solve) and s ↦ 1/s, so W'⁻¹ = diag(1/s)·W·R⁻ᵀ undoes the adapter. With several
           butterfly factors (m > 1, only when PEFT's CUDA block-diagonal kernel is built)
           the factors would also have to be applied in reverse order, which PEFT's forward
           cannot express, so invert is refused there.

PEFT's forward is out of place and vmap-safe, except the multiplicative dropout
(``boft_dropout > 0`` in train mode), which draws its mask with ``.item()`` and fills it in
place; under torch.func transforms that module's forward is swapped for the same draw
(same random calls, same order) written without both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.boft.layer import BOFTLayer, MultiplicativeDropoutLayer
from torch import Tensor

from ..ops import RuleOp
from .base import (
    Coeff,
    Effect,
    LayerSpec,
    Patch,
    Rule,
    RuleDoc,
    compute_dtype,
    power,
    register,
    require_positive,
    scale,
    swap_under_transforms,
)


def multiplicative_dropout(module: Any, x: Tensor) -> Tensor:
    """PEFT's ``MultiplicativeDropoutLayer.forward`` without ``.item()`` and in-place writes:
    one of the N butterfly factors, drawn at random, gets ``int(p·D)`` random blocks
    replaced by the identity. Same random calls in the same order as PEFT."""
    if not module.training:
        return x
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("The last two dimensions of input should be the same!")
    n, d, h, _ = x.shape
    n_random = torch.randint(0, n, (1,), device=x.device)
    num_to_replace = int(module.p * d)
    mask = torch.cat([torch.ones(num_to_replace, device=x.device), torch.zeros(d - num_to_replace, device=x.device)])
    mask = mask[torch.randperm(d)].view(1, d, 1, 1)
    chosen = (torch.arange(n, device=x.device) == n_random).to(mask.dtype).view(n, 1, 1, 1)
    full_mask = chosen * mask
    eye = torch.eye(h, device=x.device).repeat(n, d, 1, 1)
    return (1 - full_mask) * x + full_mask * eye


def _geometric(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    s = p["boft_s"]
    require_positive(s, "the BOFT scale vector boft_s", spec.path, spec.adapter)
    return Effect({"boft_R": scale(p["boft_R"], c), "boft_s": power(s, c)})


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    if spec.static["n_factors"] > 1:
        raise ValueError(
            f"layer {spec.path!r} adapter {spec.adapter!r} (BOFT): the rotation is a product of "
            f"{spec.static['n_factors']} butterfly factors; its inverse needs them in reverse order, which "
            f"PEFT's forward cannot express, so op='invert' is not available. Use mode='geometric' with "
            f"coeff=-1.0 (each factor inverted, same order) or op='scale' with coeff=-1.0 (antiparallel)"
        )
    s = p["boft_s"]
    if bool((s == 0).any()):
        raise ValueError(
            f"layer {spec.path!r} adapter {spec.adapter!r} (BOFT): boft_s has zero entries, so the scaling "
            f"diag(s) has no inverse; use op='scale' with coeff=-1.0"
        )
    s_inv = (1 / s.to(compute_dtype(s))).to(s.dtype)
    return Effect({"boft_R": scale(p["boft_R"], -1.0), "boft_s": s_inv})


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    dropout = layer.boft_dropout[adapter]
    if not isinstance(dropout, MultiplicativeDropoutLayer):
        return []
    return [swap_under_transforms(dropout, "forward", multiplicative_dropout)]


def _static(layer: Any, adapter: str) -> dict:
    return {
        "n_factors": int(layer.boft_R[adapter].shape[0]),
        "block_size": layer.boft_block_size[adapter],
        "block_num": layer.boft_block_num[adapter],
    }


BOFT = register(
    Rule(
        name="boft",
        layer_type=BOFTLayer,
        doc=RuleDoc(
            adapter="BOFT (butterfly OFT)",
            layers="Linear, Conv2d",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="W'(c) = diag(s^c)·W·Cayley(c·Q)ᵀ: blocks B ↦ c·B, s ↦ s^c (s > 0)",
            invert="exact: B ↦ −B, s ↦ 1/s (refused for several butterfly factors)",
        ),
        linear=None,
        geometric=_geometric,
        invert=_invert,
        patches=_patches,
        static=_static,
    )
)
