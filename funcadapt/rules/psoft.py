"""PSOFT: an r×r map R' acts between the frozen principal-subspace factors of the weight,

    Δy = s·B·(R' − I)·A·x,   R' = diag(v_b)·R·diag(v_a),

with A (r×in), B (out×r) fixed buffers from the base weight's SVD (s·B·A is its rank-r
principal part), R = Cayley(Q) for the skew Q built from the trained vector (exact solve or
PEFT's Cayley–Neumann series, optionally with Q rescaled to norm ≤ eps), or a free r×r
matrix with ``psoft_orth=False``; v_b, v_a optional trained magnitude vectors.

linear:    R' ↦ I + c·(R' − I) at the r×r map, so Δy(c) = c·Δy exactly: y(c) = y0 + c·(y1 − y0)
           without a second pass through the base layer. No parameter form (I + c(R − I) is not
           a Cayley transform).
geometric: Q ↦ c·Q (after PEFT's eps rescaling, which would otherwise saturate c·Q), v ↦ v^c:
           R'(c) = diag(v_b^c)·Cayley(c·Q)·diag(v_a^c). Needs v > 0. Refused with
           ``psoft_orth=False`` (a general matrix has no real power).
invert:    exact: R' ↦ R'⁻¹ (the matrix inverse of the R' PEFT uses; with magnitudes or the
           Cayley–Neumann series that is not the same as geometric c = −1). The principal part
           s·B·R'·A becomes s·B·R'⁻¹·A, the rotation of the subspace undone.

PEFT builds the Cayley–Neumann series in place and rescales Q behind a Python ``if`` on its
norm, both of which ``torch.func.vmap`` refuses. While a call runs the r×r module's
``forward`` is swapped for :func:`psoft_map` (the same math, out of place, the rescaling as
``torch.where``): always when a coefficient acts on it, otherwise only under transforms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.tuners.psoft.layer import PsoftLayer
from torch import Tensor

from ..ops import Rotate, RuleOp, cayley_neumann, on_path, rotations, scaled_generator
from .base import (
    Coeff,
    Effect,
    LayerSpec,
    Patch,
    Rule,
    RuleDoc,
    power,
    register,
    require_positive,
    transform_safe,
)


def psoft_matrix(rot: Any, ops: Sequence[Rotate] = ()) -> Tensor:
    """PEFT's ``OrthLayer.get_matrix`` out of place, taken along ``ops``: Q scaled by every
    ``"generator"`` op (after the eps rescaling), then in order R' ↦ I + c·(R' − I) for ``"lerp"``
    and R' ↦ R'⁻¹ for ``"inverse"``."""
    cast_to_fp32 = False
    orig_dtype = None
    if not rot.orth:
        r = rot.weight
    else:
        w = rot.weight
        q = torch.zeros((rot.size, rot.size), device=w.device, dtype=w.dtype).index_put((rot.rows, rot.cols), w)
        q = q - q.transpose(0, 1)
        orig_dtype = q.dtype
        eye = torch.eye(rot.size, device=q.device, dtype=q.dtype)
        if rot.use_cayley_neumann:
            if rot.cayley_neumann_eps is not None:
                eps = rot.cayley_neumann_eps
                norm = torch.linalg.norm(q, ord="fro")
                q = torch.where(torch.isfinite(norm) & (norm > eps), q * (eps / (norm + 1e-12)), q)
            r = cayley_neumann(scaled_generator(q, ops), int(rot.num_cayley_neumann_terms))
        else:
            q = scaled_generator(q, ops)
            cast_to_fp32 = orig_dtype in (torch.float16, torch.bfloat16)
            if cast_to_fp32:
                q = q.float()
            r = torch.linalg.solve(eye - q, eye + q, left=False)
    if rot.vector_b is not None:
        r = rot.vector_b[:, None] * r
    if rot.vector_a is not None:
        r = r * rot.vector_a[None, :]
    r = on_path(r, ops)
    if cast_to_fp32:
        r = r.to(orig_dtype)
    return r


def psoft_map(rot: Any, x: Tensor, ops: Sequence[Rotate] = ()) -> Tensor:
    """PEFT's ``OrthLayer.forward`` (x ↦ x·R'ᵀ) on :func:`psoft_matrix`."""
    r = psoft_matrix(rot, ops)
    half_on_cpu = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if half_on_cpu else x.dtype
    return (x.to(dtype) @ r.to(dtype).t()).to(x.dtype)


def _linear(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    return Effect(ops=(Rotate("lerp", c),))


def _geometric(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    if not spec.static["orth"]:
        raise ValueError(
            f"layer {spec.path!r} adapter {spec.adapter!r} (PSOFT with psoft_orth=False): R is a general r×r "
            f"matrix, whose real power R^c is not defined in general, so mode='geometric' is undefined. Use "
            f"mode='linear', or op='invert' for the exact inverse R⁻¹"
        )
    params = {}
    for role in ("psoft_R.vector_b", "psoft_R.vector_a"):
        if role in p:
            require_positive(p[role], f"the PSOFT magnitude vector {role.rsplit('.', 1)[1]}", spec.path, spec.adapter)
            params[role] = power(p[role], c)
    return Effect(params, ops=(Rotate("generator", c),))


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    return Effect(ops=(Rotate("inverse"),))


_OPS = "_funcadapt_psoft_ops"


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    rot = layer.psoft_R[adapter]
    own = rotations(ops)
    if not own:
        if getattr(rot, _OPS, ()):  # an outer context's ops are in force: keep running them
            return []
        return [Patch(rot, "forward", transform_safe(lambda current, x: psoft_map(rot, x)), wrap=True)]
    return [
        Patch(rot, _OPS, lambda current: (current or ()) + own, wrap=True),
        Patch(rot, "forward", lambda x: psoft_map(rot, x, getattr(rot, _OPS, ()))),
    ]


def _static(layer: Any, adapter: str) -> dict:
    rot = layer.psoft_R[adapter]
    return {
        "r": layer.r[adapter],
        "scaling": layer.scaling[adapter],
        "orth": bool(rot.orth),
        "use_cayley_neumann": bool(rot.use_cayley_neumann),
        "cayley_neumann_eps": rot.cayley_neumann_eps,
    }


PSOFT = register(
    Rule(
        name="psoft",
        layer_type=PsoftLayer,
        doc=RuleDoc(
            adapter="PSOFT (incl. Cayley–Neumann, non-orthogonal R)",
            layers="Linear",
            linear="R' ↦ I + c·(R' − I) in Δy = s·B(R' − I)A·x ⇒ Δy(c) = c·Δy",
            linear_exact="exact (interpolation at the r×r map)",
            geometric="R'(c) = diag(v_b^c)·Cayley(c·Q)·diag(v_a^c) (v > 0); refused with psoft_orth=False",
            invert="exact: R' ↦ R'⁻¹ (matrix inverse)",
        ),
        linear=_linear,
        geometric=_geometric,
        invert=_invert,
        patches=_patches,
        static=_static,
        additive=True,
    )
)
