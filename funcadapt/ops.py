"""Forward-time ops: what an adapted layer does differently *while it runs*, as typed values.

A rule's transform returns new adapter tensors (``Effect.params``) wherever the coefficient has an
exact parameter form. Where it must act while the layer runs, the transform returns ops instead
(``Effect.ops``), from this closed set:

* :class:`Interpolate`: ``y = y0 + c·(y1 − y0)`` at the layer output, y0 with the adapter switched
  off (the exact fallback), one c for the whole batch;
* :class:`InterpolateRows`: the same with ``c[i]`` in row ``i`` of the batch (``funcadapt.per_row``);
* :class:`InterpolateTokens`: the same with ``c[b, t]`` at row ``b``, absolute position ``t``
  (``funcadapt.per_token``);
* :class:`InterpolateImages`: the same with the strength of the image (and denoising step) each row
  belongs to (``funcadapt.per_image``, ``funcadapt.per_step``);
* :class:`ScaleInside`: the part of the adapter that PEFT builds at forward time from tensors shared
  between layers, times c, on this layer only (Lily's scale, TinyLoRA's R, VB-LoRA's and Uni-LoRA's B);
* :class:`Rotate`: OFT's and PSOFT's rotation taken elsewhere on a path (its generator scaled,
  ``I + c·(R − I)``, or ``R⁻¹``);
* :class:`ReverseChain`: HRA's reflections applied in reverse order (its exact inverse).

The first four are interpreted by :mod:`funcadapt.interpret`; the others (:data:`RuleOp`) by the
``patches`` of the rule that returned them, which receives only its own. Every op is a pytree whose
leaves are its coefficients, so ``vmap``, ``grad`` and ``torch.compile`` see through them. The
helpers below are the rules' shared tensor code for :class:`Rotate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor

Coeff = float | Tensor


@dataclass(frozen=True)
class Interpolate:
    """``y(c) = y0 + c·(y1 − y0)`` at the layer output (``torch.lerp``: exact at c = 0 and c = 1)."""

    coeff: Coeff


@dataclass(frozen=True)
class InterpolateRows:
    """:class:`Interpolate` with ``coeffs[i]`` in row ``i`` of the batch (a 1-d tensor)."""

    coeffs: Tensor


@dataclass(frozen=True)
class InterpolateTokens:
    """:class:`Interpolate` with ``values[b, t]`` at row ``b``, absolute position ``t`` (``[B, L]``, or
    ``[L]`` for every row; see :mod:`funcadapt.tokens`)."""

    values: Tensor


@dataclass(frozen=True)
class InterpolateImages:
    """:class:`Interpolate` with the strength of the image each row belongs to, at the denoising step
    running now (``values`` laid out as :class:`funcadapt.images.PerImage` holds them)."""

    values: Tensor


@dataclass(frozen=True)
class ScaleInside:
    """The adapter's forward-built, per-layer part times ``coeff``: ``ΔW(c) = c·ΔW`` on this layer only."""

    coeff: Coeff


RotationPath = Literal["generator", "lerp", "inverse"]


@dataclass(frozen=True)
class Rotate:
    """A rotation ``R = Cayley(Q)`` taken elsewhere: ``"generator"``: Q ↦ c·Q; ``"lerp"``:
    R ↦ I + c·(R − I); ``"inverse"``: R ↦ R⁻¹ (``coeff`` unused). Nested contexts append theirs:
    generators multiply, then the others apply in order (:func:`scaled_generator`, :func:`on_path`)."""

    how: RotationPath
    coeff: Coeff = 1.0


@dataclass(frozen=True)
class ReverseChain:
    """Householder reflections applied in reverse order: ``H(u_r)···H(u₁)``, the inverse of the chain."""


RuleOp = ScaleInside | Rotate | ReverseChain
"""The ops a rule's own ``patches`` interpret."""

OutputOp = Interpolate | InterpolateRows | InterpolateTokens | InterpolateImages
"""The ops :mod:`funcadapt.interpret` applies at a layer's output."""

ForwardOp = OutputOp | RuleOp


def _register(cls: type, leaves: tuple[str, ...], static: tuple[str, ...] = ()) -> None:
    def flatten(op: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(op, f) for f in leaves], tuple(getattr(op, f) for f in static)

    def unflatten(children: Any, context: Any) -> Any:
        return cls(**dict(zip(static, context, strict=True)), **dict(zip(leaves, children, strict=True)))

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"funcadapt.ops.{cls.__name__}")


_register(Interpolate, ("coeff",))
_register(InterpolateRows, ("coeffs",))
_register(InterpolateTokens, ("values",))
_register(InterpolateImages, ("values",))
_register(ScaleInside, ("coeff",))
_register(Rotate, ("coeff",), ("how",))
_register(ReverseChain, ())


def rule_ops(ops: Sequence[ForwardOp]) -> tuple[RuleOp, ...]:
    """The ops a rule's ``patches`` interpret (not the output interpolations)."""
    return tuple(op for op in ops if isinstance(op, ScaleInside | Rotate | ReverseChain))


def scale_inside(ops: Sequence[RuleOp]) -> Coeff | None:
    """The coefficient of the :class:`ScaleInside` among ``ops`` (None if there is none)."""
    return next((op.coeff for op in ops if isinstance(op, ScaleInside)), None)


def rotations(ops: Sequence[RuleOp]) -> tuple[Rotate, ...]:
    return tuple(op for op in ops if isinstance(op, Rotate))


def scaled_generator(q: Tensor, ops: Sequence[Rotate]) -> Tensor:
    """The generator Q times the coefficient of every ``"generator"`` op (in Q's dtype)."""
    for op in ops:
        if op.how == "generator":
            c = op.coeff
            q = (c.to(device=q.device, dtype=q.dtype) if isinstance(c, Tensor) else c) * q
    return q


def on_path(r: Tensor, ops: Sequence[Rotate]) -> Tensor:
    """R after every ``"lerp"`` (I + c·(R − I)) and ``"inverse"`` (R⁻¹) op in order, each computed in
    float32 at least and rounded once to R's dtype. R may be a batch of square matrices."""
    dtype = r.dtype
    for op in ops:
        if op.how == "generator":
            continue
        wide = r.to(torch.promote_types(dtype, torch.float32))
        if op.how == "lerp":
            eye = torch.eye(r.shape[-1], device=r.device, dtype=wide.dtype)
            c = op.coeff
            r = torch.lerp(eye, wide, c.to(device=wide.device, dtype=wide.dtype) if isinstance(c, Tensor) else c)
        else:
            r = torch.linalg.inv(wide)
        r = r.to(dtype)
    return r


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """PEFT's truncated Cayley series ``I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)`` for skew Q (one matrix
    or a batch), out of place, in the same order of operations as PEFT's."""
    r = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            q2 = q @ q
            r = r + 2.0 * q2
            qp = q2
            for _ in range(3, terms - 1):
                qp = qp @ q
                r = r + 2.0 * qp
            qp = qp @ q
            r = r + qp
    return r
