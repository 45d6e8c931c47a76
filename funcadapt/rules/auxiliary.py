"""PEFT's auxiliary wrappers: ``modules_to_save`` (a trained copy of a whole module) and
trainable tokens (trained rows of an embedding).

Both replace a module's output by that of trained weights, so linear mode is the exact
output interpolation y(c) = y0 + c·(y1 − y0) with y0 the original module. For the
affine modules these usually wrap (Linear, Embedding, LayerNorm) that is the same as
interpolating the weights, W(c) = W0 + c·(W1 − W0); for any other module it is the
stated meaning. The change is additive in weight space, so geometric equals linear
and the inverse is c = −1.
"""

from __future__ import annotations

from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.other import ModulesToSaveWrapper

from .base import Rule, RuleDoc, interpolated, register

MODULES_TO_SAVE = register(
    Rule(
        name="modules-to-save",
        layer_type=ModulesToSaveWrapper,
        doc=RuleDoc(
            adapter="modules_to_save (trained module copy)",
            layers="any module (tested: Linear head)",
            linear="y(c) = y0 + c·(y1 − y0), y0 the original module",
            linear_exact="exact fallback (output interpolation)",
            geometric="= linear (additive)",
            invert="exact: y0 − (y1 − y0)",
        ),
        linear=None,
        geometric=interpolated,
    )
)

TRAINABLE_TOKENS = register(
    Rule(
        name="trainable-tokens",
        layer_type=TrainableTokensLayer,
        doc=RuleDoc(
            adapter="trainable tokens",
            layers="Embedding",
            linear="trained rows W[i](c) = W[i] + c·(δ[i] − W[i]) (output interpolation)",
            linear_exact="exact fallback (output interpolation)",
            geometric="= linear (additive)",
            invert="exact: rows 2·W[i] − δ[i]",
        ),
        linear=None,
        geometric=interpolated,
        static=lambda layer, a: {"token_indices": list(layer.token_indices[a])},
    )
)
