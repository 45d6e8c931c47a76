"""MiSS (all ``init_weights`` variants).

Default, ``True``, ``False`` and ``"mini"``: the input is summed over its r-sized chunks and
multiplied by the trained block D (r×out; "mini" tiles an r×mini_r block across out),

    Δy = (Σ_k x_k)·D   (ΔW = D tiled over the input),

linear in D: D ↦ c·D gives Δy(c) = c·Δy exactly. Additive: geometric = linear, invert −Δy.

``"bat"``: every r×r block of the weight is mapped by its output row's trained block B_i,

    W_ij ↦ W_ij·(I + B_i) + B_i,   i.e. (W_ij + I) ↦ (W_ij + I)·(I + B_i),

an affine map that is right-multiplication by M_i = I + B_i in the shifted blocks W_ij + I.

linear:    ΔW_ij = W_ij·B_i + B_i is linear in B: B ↦ c·B gives ΔW(c) = c·ΔW exactly.
geometric: refused: M^c = (I + B)^c needs a real matrix logarithm, which a general matrix
           does not have.
invert:    exact: M ↦ M⁻¹, i.e. B ↦ (I + B)⁻¹ − I, which maps W' back to W exactly (PEFT's own
           unmerge, (W' − B)·(I + B)⁻¹, is the same map).

PEFT's "bat" delta writes ``miss_block.data`` (a no-op round trip on CPU half precision), which
would mutate whatever tensor funcadapt passes in; while a call runs that layer's
``get_delta_weight`` is the same arithmetic without the write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.miss.layer import MissLayer
from torch import Tensor

from ..ops import RuleOp
from .base import Effect, LayerSpec, Patch, Rule, RuleDoc, compute_dtype, register, scaling

_linear = scaling("miss_block")


def _is_bat(layer: Any, adapter: str) -> bool:
    return getattr(layer, "miss_fn", None) == "bat"


def bat_delta_weight(layer: Any, adapter: str, orig_weight: Tensor, reverse: bool = False) -> Tensor:
    """PEFT's ``MissLinear.get_delta_weight`` without writing back into ``miss_block``."""
    block = layer.miss_block[adapter]
    dtype = block.dtype
    cast_to_fp32 = block.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    miss_b = block.float() if cast_to_fp32 else block
    orig_weight = orig_weight.to(miss_b.dtype)
    r = miss_b.size(-1)
    w = orig_weight.reshape(orig_weight.size(0) // r, r, orig_weight.size(1) // r, r).permute(2, 0, 1, 3)
    if reverse:
        eye = torch.eye(r, device=miss_b.device, dtype=torch.float32)
        inverse = torch.inverse(eye + miss_b.float()).to(miss_b.dtype)
        result = (w - miss_b) @ inverse
    else:
        result = w @ miss_b + miss_b
    out = result.permute(1, 2, 0, 3).reshape(*orig_weight.shape)
    return out.to(dtype=dtype) if cast_to_fp32 else out


def _bat_invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    b = p["miss_block"]
    wide = b.to(compute_dtype(b))
    eye = torch.eye(b.shape[-1], device=b.device, dtype=wide.dtype)
    return Effect({"miss_block": (torch.linalg.inv(eye + wide) - eye).to(b.dtype)})


def _bat_patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    def delta(adapter_name: str, orig_weight: Tensor, reverse: bool = False) -> Tensor:
        return bat_delta_weight(layer, adapter_name, orig_weight, reverse)

    return [Patch(layer, "get_delta_weight", delta)]


MISS_BAT = register(
    Rule(
        name="miss-bat",
        layer_type=MissLayer,
        match=_is_bat,
        doc=RuleDoc(
            adapter="MiSS init_weights='bat'",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: B ↦ c·B in W_ij ↦ W_ij(I + B_i) + B_i",
            linear_exact="exact (parameter space)",
            geometric="refused: (I + B)^c is undefined for a general matrix",
            invert="exact: B ↦ (I + B)⁻¹ − I",
        ),
        linear=_linear,
        invert=_bat_invert,
        patches=_bat_patches,
        static=lambda layer, a: {"r": layer.miss_r[a], "init": "bat"},
        no_geometric_reason=(
            "MiSS 'bat' multiplies each shifted weight block by M = I + B, a general matrix; its real power "
            "M^c needs a matrix logarithm that a general matrix does not have"
        ),
    )
)

MISS = register(
    Rule(
        name="miss",
        layer_type=MissLayer,
        match=lambda layer, a: not _is_bat(layer, a),
        doc=RuleDoc(
            adapter="MiSS (default, mini, random init)",
            layers="Linear",
            linear="Δy(c) = c·Δy: D ↦ c·D in Δy = (Σ_k x_k)·D",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: Δy ↦ −Δy",
        ),
        linear=_linear,
        geometric=_linear,
        additive=True,
        commutative=True,
        static=lambda layer, a: {
            "r": layer.miss_r[a],
            "init": getattr(layer, "miss_fn", None),
            "mini_r": layer.miss_mini_r.get(a),
        },
    )
)
