"""RoAd: 2×2 blocks on pairs (x_i, x_j) of the layer output, j = i + g/2 in each group:

    y_i = f_i·x_i − s_i·x_j,   y_j = f_j·x_j + s_j·x_i,   f = α·cos θ, s = α·sin θ

(``road_4`` draws the cos and sin factors from separate (α, θ) halves.)

linear:    f ↦ 1 + c·(f − 1), s ↦ c·s, so y(c) = y0 + c·(y1 − y0) exactly. Any (f, s)
           pair is again a valid parameter: (α, θ) = (|(f, s)|, atan2(s, f)) for
           road_1/road_2 (one polar pair per element), and α = (f, s), θ = (0, π/2)
           for road_4. The transform is exact for all three variants.
geometric: road_1 only: each block is α·R(θ), a complex number α·e^{iθ}, so
           (α, θ) ↦ (|α|^c, c·θ') with θ' = θ (+π when α < 0) is its power. road_2 and
           road_4 blocks are general 2×2 matrices with no such one-parameter path in
           their parameterisation, so geometric mode is refused there.
invert:    exact for every variant: each block is replaced by its inverse
           (1/det)·[[f_j, s_i], [−s_j, f_i]], re-encoded as above.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.road.layer import RoadLayer
from torch import Tensor

from .base import PI, Coeff, Effect, Rule, RuleDoc, as_compute, compute_dtype, exact_at_one, lerp, register, scale


def _halves(v: Tensor, g: int) -> tuple[Tensor, Tensor]:
    v = v.reshape(-1, 2, g // 2)
    return v[:, 0], v[:, 1]


def _decode(variant: str, g: int, theta: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """(α, θ) → full-length (f, s), as RoAd's forward uses them."""
    if variant == "road_1":
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def _encode(variant: str, g: int, f: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Full-length (f, s) → (θ, α) in the variant's layout (inverse of :func:`_decode`)."""
    if variant == "road_4":
        f, s = f.reshape(-1, 1, g), s.reshape(-1, 1, g)
        theta = torch.cat([torch.zeros_like(f), torch.full_like(s, PI / 2)], dim=1).flatten()
        alpha = torch.cat([f, s], dim=1).flatten()
        return theta, alpha
    if variant == "road_1":  # the two rows of each group share one (α, θ)
        f, s = f.reshape(-1, 2, g // 2)[:, 0].flatten(), s.reshape(-1, 2, g // 2)[:, 0].flatten()
    return torch.atan2(s, f), torch.hypot(f, s)


def _unpack(spec, p: Mapping[str, Tensor]) -> tuple[str, int, Tensor, Tensor]:
    theta, alpha = p["road_theta"], p["road_alpha"]
    cd = compute_dtype(theta)
    return spec.static["variant"], spec.static["group_size"], theta.to(cd), alpha.to(cd)


def _pack(p: Mapping[str, Tensor], theta: Tensor, alpha: Tensor) -> Effect:
    return Effect({"road_theta": theta.to(p["road_theta"].dtype), "road_alpha": alpha.to(p["road_alpha"].dtype)})


def _linear(spec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    variant, g, theta, alpha = _unpack(spec, p)
    f, s = _decode(variant, g, theta, alpha)
    new = _pack(p, *_encode(variant, g, lerp(torch.ones_like(f), f, c), scale(s, c)))
    # the (α, θ) round trip rounds: pin c = 1 to the trained tensors exactly
    return Effect({role: exact_at_one(c, t, p[role]) for role, t in new.params.items()})


def _geometric(spec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    variant, _g, theta, alpha = _unpack(spec, p)
    if variant != "road_1":
        raise ValueError(
            f"layer {spec.path!r} adapter {spec.adapter!r}: RoAd {variant} has no geometric path (its 2×2 "
            f"blocks are general matrices, not scaled rotations); use mode='linear', or op='invert' for "
            f"the exact inverse"
        )
    c = as_compute(c, theta)
    theta = torch.where(alpha < 0, theta + PI, theta)
    return _pack(p, c * theta, alpha.abs() ** c)


def _invert(spec, p: Mapping[str, Tensor]) -> Effect:
    variant, g, theta, alpha = _unpack(spec, p)
    f, s = _decode(variant, g, theta, alpha)
    fi, fj = _halves(f, g)
    si, sj = _halves(s, g)
    det = fi * fj + si * sj
    f_inv = torch.stack([fj / det, fi / det], dim=1).flatten()
    s_inv = torch.stack([-si / det, -sj / det], dim=1).flatten()
    return _pack(p, *_encode(variant, g, f_inv, s_inv))


ROAD = register(
    Rule(
        name="road",
        layer_type=RoadLayer,
        match=lambda layer, a: layer.variant[a] in ("road_1", "road_2", "road_4"),
        doc=RuleDoc(
            adapter="RoAd (road_1, road_2, road_4)",
            layers="Linear",
            linear="f ↦ 1 + c·(f − 1), s ↦ c·s (f = α cos θ, s = α sin θ), re-encoded as (α, θ)",
            linear_exact="exact (parameter space)",
            geometric="road_1: α ↦ |α|^c, θ ↦ c·θ; road_2/road_4: refused",
            invert="exact: each 2×2 block inverted",
            quantized="4-bit nf4, 8-bit (road_1)",
        ),
        linear=_linear,
        geometric=_geometric,
        invert=_invert,
        static=lambda layer, a: {"variant": layer.variant[a], "group_size": layer.group_size[a]},
    )
)
