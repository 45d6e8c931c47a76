"""LN Tuning: PEFT swaps a norm layer (LayerNorm, RMSNorm, ...) for a trained copy of it.

The adapter *is* the copy's weight and bias (W1, b1); the base layer keeps (W0, b0) and the
adapted layer returns the copy's output y1 = norm(x; W1, b1) instead of y0 = norm(x; W0, b0).

linear:    y(c) = y0 + c·(y1 − y0), the output interpolation (exact by construction).
           A norm's output is affine in its weight and bias (LayerNorm: x̂ ⊙ W + b,
           RMSNorm: x̂ ⊙ W, with x̂ independent of both), so this *is* the parameter
           interpolation W(c) = W0 + c·(W1 − W0), b(c) = b0 + c·(b1 − b0) (tested). It is
           computed on the outputs because the base weights are not adapter tensors (they are
           not in the tree); for a non-affine module targeted with LN Tuning the output
           interpolation is the stated meaning.
geometric: = linear (the change is additive in weight space: W0 + c·ΔW)
invert:    c = −1: W0 − ΔW, i.e. y0 − (y1 − y0)
"""

from __future__ import annotations

from peft.tuners.ln_tuning.layer import LNTuningLayer

from .base import Rule, RuleDoc, interpolated, register

LN_TUNING = register(
    Rule(
        name="ln-tuning",
        layer_type=LNTuningLayer,
        doc=RuleDoc(
            adapter="LN Tuning (trained norm copy)",
            layers="LayerNorm, RMSNorm (any module)",
            linear="y(c) = y0 + c·(y1 − y0); for norms = W0 + c·(W1 − W0), b0 + c·(b1 − b0)",
            linear_exact="exact fallback (output interpolation)",
            geometric="= linear (additive in weight space)",
            invert="exact: W0 − (W1 − W0)",
        ),
        linear=None,
        geometric=interpolated,
    )
)
