"""funcadapt: the effect of any PEFT adapter as a pure function of a coefficient.

tree = funcadapt.extract(model)                  # adapter params (the model's own) + structure
params = funcadapt.transform(tree, -1.0)          # pure: a typed Transformed, nothing mutated
out = funcadapt.call(model, params, **batch)      # each layer's effect applied when it runs

with funcadapt.AdapterModifier(model, "scale", -1.0):   # the same, as a context manager
    loss = model(**batch).loss
"""

from .attribute import Attribution, attribute
from .call import call, vmap
from .deploy import export, merge
from .functional import AdamWState, adamw_init, adamw_update, combine, load_params, stack, trainable, unstack
from .groups import Groups, layer_groups
from .images import PerImage, per_image, per_step
from .modifier import AdapterModifier
from .rows import PerRow, per_row, tile, untile
from .rules.base import RULES, Rule
from .swap import ActiveContext, OpenContextWarning, active_contexts
from .sweep import Sweep, sweep
from .tokens import PerToken, after_prompt, per_token
from .transform import MODES, OPS, LayerEffect, Mode, Op, Transformed, transform
from .tree import AdapterTree, LayerSpec, extract

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "OPS",
    "RULES",
    "ActiveContext",
    "AdamWState",
    "AdapterModifier",
    "AdapterTree",
    "Attribution",
    "Groups",
    "LayerEffect",
    "LayerSpec",
    "Mode",
    "Op",
    "OpenContextWarning",
    "PerImage",
    "PerRow",
    "PerToken",
    "Rule",
    "Sweep",
    "Transformed",
    "active_contexts",
    "adamw_init",
    "adamw_update",
    "after_prompt",
    "attribute",
    "call",
    "combine",
    "export",
    "extract",
    "layer_groups",
    "load_params",
    "merge",
    "per_image",
    "per_row",
    "per_step",
    "per_token",
    "stack",
    "sweep",
    "tile",
    "trainable",
    "transform",
    "unstack",
    "untile",
    "vmap",
]
