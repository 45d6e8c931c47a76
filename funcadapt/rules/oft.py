"""OFT: a block-diagonal rotation R = Cayley(Q) applied to the layer input (Linear,
Conv) or output (Embedding), with Q skew-symmetric, built from the trained vector.

geometric: Q ↦ c·Q, i.e. R(c) = Cayley(c·Q): the rotation's own one-parameter path.
           Q is linear in the trained vector, so this is an exact parameter transform.
linear:    x ↦ x + c·(x·R − x) at the rotation. The base layer is affine in what the
           rotation produces, so the layer output is exactly y0 + c·(y1 − y0). No
           parameter-space form exists (I + c(R − I) is not a rotation).
invert:    exact Cayley: Q ↦ −Q (Cayley(−Q) = Cayley(Q)⁻¹ exactly).
           Cayley–Neumann (PEFT's default, ``use_cayley_neumann=True``): R is a
           truncated series, so Cayley(−Q) is only an approximate inverse
           (error O(‖Q‖⁵) with 5 terms); funcadapt applies the exact matrix inverse of
           the R that PEFT uses instead.

PEFT's rotation writes the skew matrix and the series in place into fresh tensors,
which ``torch.func.vmap`` refuses for a batched Q. While a call runs the rotation
module's ``forward`` is swapped for :func:`rotate`, the same math out of place.
COFT's projection, which PEFT applies to the stored weight in place under
``no_grad``, is applied functionally with the same straight-through gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.tuners.oft.layer import OFTLayer
from torch import Tensor

from ..ops import Interpolate, Rotate, RuleOp, cayley_neumann, on_path, rotations, scaled_generator
from .base import Coeff, Effect, LayerSpec, Patch, Rule, RuleDoc, register, scale

_ROLES = ("oft_R.weight", "oft_embedding_R.weight")


def _skew(rot: Any, vec: Tensor) -> Tensor:
    n, b = vec.shape[0], rot.block_size
    m = vec.new_zeros(n, b, b).index_put((torch.arange(n, device=vec.device)[:, None], rot.rows, rot.cols), vec)
    return m - m.transpose(-2, -1)


def _project(rot: Any, vec: Tensor, eps: float) -> Tensor:
    q = _skew(rot, vec)
    eps_t = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norm = torch.linalg.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps_t, q, eps_t * (q / norm))
    return out[:, rot.rows, rot.cols]


def _cayley(rot: Any, vec: Tensor) -> Tensor:
    """Same arithmetic as PEFT's ``_cayley_batch``, out of place."""
    b = rot.block_size
    q = _skew(rot, vec)
    if rot.use_cayley_neumann:
        return cayley_neumann(q, rot.num_cayley_neumann_terms).to(vec.dtype)
    eye = torch.eye(b, device=q.device).unsqueeze(0).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False).to(vec.dtype)


def rotate(rot: Any, x: Tensor, ops: Sequence[Rotate] = ()) -> Tensor:
    """PEFT's ``OFTRotationModule.forward`` in pure ops, with R taken along ``ops``: the (projected)
    generator scaled by every ``"generator"`` op, then R ↦ I + c·(R − I) for ``"lerp"`` (so
    x·R ↦ x + c·(x·R − x)) and R ↦ R⁻¹ for ``"inverse"``, in order. Nested funcadapt contexts
    append their ops, so they compose."""
    out_dtype = x.dtype
    weight = rot.weight
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if rot.coft:
        weight = weight + (_project(rot, weight, rot.eps) - weight).detach()
    weight = scaled_generator(weight, ops)  # COFT's geometric path scales the projected generator: Cayley(c·P(Q))
    r = on_path(_cayley(rot, weight), ops)
    shape = x.shape
    xx = rot._unfold(x) if len(shape) == 4 else x
    folded = xx.shape
    rank = rot.in_features // rot.block_size if rot.block_share else rot.r
    if rot.block_share:
        r = r.repeat(rank, 1, 1)
    y = torch.einsum("...rk,rkc->...rc", xx.reshape(*folded[:-1], rank, rot.block_size), r).reshape(*folded)
    if len(shape) == 4:
        y = rot._fold(y, shape)
    return y.to(out_dtype)


def _rot_module(layer: Any, adapter: str) -> Any:
    if adapter in layer.oft_R:
        return layer.oft_R[adapter]
    return layer.oft_embedding_R[adapter]


def _linear(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    if spec.layer_type == "Conv2d":
        return Effect(ops=(Interpolate(c),))  # see _refuse_conv: R = I is not the base layer there
    return Effect(ops=(Rotate("lerp", c),))


def _refuse_conv(spec: LayerSpec) -> None:
    if spec.layer_type == "Conv2d":
        raise ValueError(
            f"layer {spec.path!r} adapter {spec.adapter!r}: PEFT's OFT on Conv2d rotates unfolded input patches "
            f"and folds them back by summing overlaps, so even Q = 0 (R = I) is not the base layer; the rotation "
            f"path Cayley(c·Q) does not pass through the base model and geometric mode / invert are undefined. "
            f"Use mode='linear' (exact output interpolation: c = 0 is the base layer)"
        )


def _geometric(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    _refuse_conv(spec)
    if spec.static["coft"]:  # the projection must come first: P(c·Q) saturates, c·P(Q) does not
        return Effect(ops=(Rotate("generator", c),))
    return Effect({role: scale(t, c) for role, t in p.items() if role in _ROLES})


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    _refuse_conv(spec)
    if spec.static["use_cayley_neumann"]:
        return Effect(ops=(Rotate("inverse"),))
    return _geometric(spec, p, -1.0)


_OPS = "_funcadapt_oft_ops"


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    rot = _rot_module(layer, adapter)
    own = rotations(ops)
    return [
        Patch(rot, _OPS, lambda current: (current or ()) + own, wrap=True),
        Patch(rot, "forward", lambda x: rotate(rot, x, getattr(rot, _OPS, ()))),
    ]


def _static(layer: Any, adapter: str) -> dict:
    rot = _rot_module(layer, adapter)
    return {
        "block_size": rot.block_size,
        "use_cayley_neumann": bool(rot.use_cayley_neumann),
        "num_cayley_neumann_terms": rot.num_cayley_neumann_terms,
        "coft": bool(rot.coft),
    }


OFT = register(
    Rule(
        name="oft",
        layer_type=OFTLayer,
        doc=RuleDoc(
            adapter="OFT (incl. COFT, block sharing)",
            layers="Linear, Conv2d",
            linear="x ↦ x + c·(x·R − x) at the rotation ⇒ y(c) = y0 + c·(y1 − y0) (Conv2d: output interpolation)",
            linear_exact="exact fallback (interpolation at the rotation)",
            geometric="R(c) = Cayley(c·Q) (refused on Conv2d)",
            invert="exact: R⁻¹ (Cayley(−Q); exact matrix inverse under Cayley–Neumann); refused on Conv2d",
            quantized=(
                "4-bit nf4, fp4 + double quant (bf16), 8-bit "
                "(linear mode: output interpolation where it acts on the input)"
            ),
        ),
        linear=_linear,
        geometric=_geometric,
        invert=_invert,
        patches=_patches,
        static=_static,
        acts_on_input=lambda spec: spec.layer_type != "Embedding",
    )
)
