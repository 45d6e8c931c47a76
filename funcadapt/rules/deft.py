"""DeFT: the base weight loses a learned rank-r subspace of its output space and (unless
PaRa) gets a learned replacement in it,

    W' = (I − Q_P·rightᵀ)·W + Q_P·(s·R)           (PaRa: W' = (I − Q_P·rightᵀ)·W)

with P the trained out×r matrix, Q_P = qr(P).Q and right = Q_P (``decomposition_method="qr"``,
an orthogonal projection) or Q_P = P and right = relu(P) (``"relu"``), R the trained r×in
block, s = alpha/r. Linear and Conv1D.

linear:    ΔW = Q_P·(s·R − rightᵀ·W) depends on P through a QR factorisation or P·relu(P)ᵀ,
           and on R only together with the projected base weight, so no parameter
           transform scales it: the exact output interpolation y(c) = y0 + c·(y1 − y0).
geometric: refused, and so is invert: the projection I − Q_P·rightᵀ is rank-deficient (it
           deletes a subspace of W, with no inverse) and the replacement Q_P·R is written
           into that subspace, so the adapter is no element of a group acting on W.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.deft.layer import DeftLayer

from .base import Rule, RuleDoc, register


def _static(layer: Any, adapter: str) -> dict:
    return {
        "r": layer.deft_r[adapter],
        "decomposition": layer.deft_decomposition[adapter],
        "para": bool(layer.deft_para[adapter]),
        "scaling": layer.deft_scaling[adapter],
    }


DEFT = register(
    Rule(
        name="deft",
        layer_type=DeftLayer,
        doc=RuleDoc(
            adapter="DeFT (incl. PaRa, qr / relu)",
            layers="Linear, Conv1D",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="refused: a rank-deficient projection has no group structure",
            invert="refused (use op='scale', coeff=-1)",
        ),
        linear=None,
        static=_static,
        no_geometric_reason=(
            "DeFT projects a learned subspace out of W ((I − Q_P·rightᵀ)·W is rank-deficient, so it has no "
            "inverse) and writes Q_P·R into it; that is no element of a group acting on the weight"
        ),
    )
)
