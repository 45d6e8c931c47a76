"""OSF: the base weight's low singular part is trainable in place,

    W' = W + ΔW,   ΔW = U·diag(S)·V − U₀·diag(S₀)·V₀,

U, S, V the trained low-rank SVD factors and U₀, S₀, V₀ their frozen initial values (the
part of W they replace). Linear.

linear:    ΔW is not linear in any one of U, S, V (and U·S·V + c(…) needs rank 2k), so the
           exact output interpolation y(c) = y0 + c·(y1 − y0), i.e. W + c·ΔW.
geometric: = linear (ΔW is an additive update, PEFT merges it by adding).
invert:    exact: W − ΔW, the output interpolation at c = −1.

PEFT projects the gradients of U and V with tensor hooks on those Parameters. funcadapt
passes the Parameters themselves through (the fallback changes no parameter), so autograd
gradients are PEFT's projected ones; ``torch.func.grad`` over the parameters sees the raw,
unprojected gradient (hooks on Parameters do not fire for functorch's wrapped tensors).
"""

from __future__ import annotations

from collections.abc import Mapping

from peft.tuners.osf.layer import OSFLayer
from torch import Tensor

from .base import Effect, LayerSpec, Rule, RuleDoc, interpolated, register


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    return interpolated(spec, p, -1.0)


OSF = register(
    Rule(
        name="osf",
        layer_type=OSFLayer,
        doc=RuleDoc(
            adapter="OSF (orthogonal subspace fine-tuning)",
            layers="Linear",
            linear="W + c·ΔW, ΔW = U·S·V − U₀·S₀·V₀ (output interpolation)",
            linear_exact="exact fallback (output interpolation)",
            geometric="= linear (additive)",
            invert="exact: W − ΔW",
        ),
        linear=None,
        geometric=interpolated,
        invert=_invert,
        additive=True,
        commutative=True,
        static=lambda layer, a: {"effective_rank": layer.effective_rank[a]},
    )
)
