"""ShadowPEFT: recognised and refused.

ShadowPEFT wraps whole decoder blocks and threads a state computed by a model-level
shadow network through them: a block's output is not the base block's output plus a
per-layer effect, and with the adapter switched off a block cannot run on the shadow
state at all. There is no per-layer quantity a coefficient could scale honestly, and
the output-interpolation fallback has no y0 to interpolate from, so extraction refuses
it with that explanation instead of a generic "no rule".
"""

from __future__ import annotations

from peft.tuners.shadow.layers import ShadowLayer

from .base import Rule, RuleDoc, register

SHADOW = register(
    Rule(
        name="shadow",
        layer_type=ShadowLayer,
        doc=RuleDoc(
            adapter="ShadowPEFT",
            layers="decoder blocks",
            linear="refused: a model-level shadow state runs through whole blocks, no per-layer effect",
            linear_exact="refused",
            geometric="refused",
            invert="refused",
        ),
        linear=None,
        unsupported=(
            "ShadowPEFT threads a state from a model-level shadow network through whole decoder blocks, so a "
            "block's output is not the base block's output plus a per-layer effect (and with the adapter off a "
            "block cannot run on that state): it has no per-layer coefficient. Compare against the base model "
            "with model.disable_adapter(), or train a layer adapter (LoRA, IA3, ...) to steer with funcadapt"
        ),
    )
)
