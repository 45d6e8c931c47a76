"""X-LoRA: every LoRA expert's update scaled jointly, ``B_i ↦ c·B_i``; runs under torch.func transforms.

X-LoRA mixes LoRA experts per token: y = W x + g · Σ_i s_i(x) · B_i A_i x, with scalings s_i
from a classifier that reads the last hidden state of a *scaling pass* (a first forward of
the whole model in which every expert gets the scaling ``scaling_pass_value``, 0 by
default). Its layers are PEFT LoRA ``Linear`` layers whose ``forward`` was replaced by an
``XLoraLinearLayer``'s, so the parameter-space math is LoRA's: ``B_i ↦ c·B_i`` makes every
call of every adapted layer ``y0 + c·(y1 − y0)`` (its update is linear in B_i, with the
scalings that call was given). c = 0 is ``disable_adapter()`` and c = 1 is PEFT's forward.

* With the default ``scaling_pass_value = 0`` the scaling pass is the base model at every c,
  so the gating s_i(x) is PEFT's own at every c and only the experts' size changes.
* With ``scaling_pass_value ≠ 0`` the scaling pass runs the (scaled) experts too, so the
  gating follows c: still exactly the per-layer interpolation of every layer call (the
  independent reference), but not "PEFT's gating with smaller experts".
* The classifier's parameters are not scaled and not in the tree (c has nothing to act on
  there); they stay the model's own Parameters during calls and keep receiving gradients.
* Per-adapter coefficients (``{"0": a, "1": b}``) scale each expert's B separately.

Under transforms (vmap, grad, jacrev over c) PEFT's code fails twice, and funcadapt swaps in
math-identical versions only while a transform runs (PEFT's code runs unchanged outside):
the scaling pass switches the experts off and on through ``LoraModel.disable/
enable_adapter_layers()`` and re-freezes them, which sets ``requires_grad`` (only flags
change, under ``no_grad``; the replacement flips ``_disable_adapters`` only), and
``XLoraLinearLayer.forward`` adds each expert's update in place (replaced by an out-of-place
sum). The last scalings X-LoRA stores on the model (``get_latest_scalings()``) would be dead
transform tensors afterwards, so their previous value is restored.

This rule covers X-LoRA's ``Linear`` experts (the usual target). Experts in ``Embedding`` or
``Conv2d`` layers are matched by the plain LoRA rule: the same math, outside transforms.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.xlora.layer import XLoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import Tensor

from ..ops import RuleOp
from .base import Patch, RuleDoc, register, rule_named, transform_safe, under_transforms

_XLORA: weakref.WeakKeyDictionary[Any, weakref.ref[XLoraLayer]] = weakref.WeakKeyDictionary()
"""LoRA layer -> the XLoraLayer whose forward PEFT installed on it, learned while the layer's
forward is still X-LoRA's (a frame may have wrapped it since)."""


def _xlora(layer: Any) -> XLoraLayer | None:
    known = _XLORA.get(layer)
    if known is not None:
        return known()
    xlora = getattr(layer.__dict__.get("forward"), "__self__", None)
    if isinstance(xlora, XLoraLayer) and xlora.target is layer:
        _XLORA[layer] = weakref.ref(xlora)
        return xlora
    return None


def xlora_linear_forward(xlora: Any, x: Tensor, *args: Any, scalings: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``XLoraLinearLayer.forward`` with its in-place ``result += …`` written out of place (vmap
    cannot add a batched update into an unbatched base output in place); the same math."""
    target = xlora.target
    dtype = x.dtype
    if xlora.adapters_disabled:
        return target.base_layer(x, *args, **kwargs).to(dtype)
    mixing = xlora.get_maybe_topk_scalings(scalings) if scalings is not None else None
    result = target.base_layer(x, *args, **kwargs)
    if not target.merged:
        for n, adapter in enumerate(target.active_adapters):
            if adapter not in target.lora_A:
                continue
            if target.use_dora[adapter]:
                raise ValueError("X-LoRA does not support LoRA layers with DoRA")
            lora_A, lora_B = target.lora_A[adapter], target.lora_B[adapter]
            x = x.to(lora_A.weight.dtype)
            if mixing is not None:
                x_in, weight = xlora.apply_scalings_to_x(x, mixing, n), xlora.config.global_scaling_weight
            else:
                x_in, weight = x, 1
            result = result + lora_B(lora_A(target.lora_dropout[adapter](x_in))) * target.scaling[adapter] * weight
    return result.to(dtype)


def _switch_flags(lora_model: Any, enabled: bool) -> None:
    """``LoraModel.enable/disable_adapter_layers`` without touching ``requires_grad``."""
    for module in lora_model.model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module._disable_adapters = not enabled


def _once(wrap: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Every X-LoRA layer of a model asks for the same model-level patch: install it once."""

    def install(current: Any) -> Any:
        if getattr(current, "_funcadapt_xlora", False):
            return current
        patched = wrap(current)
        patched._funcadapt_xlora = True
        return patched

    return install


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    patches = list(_LORA.patches(layer, adapter, ops)) if _LORA.patches is not None else []
    xlora = _xlora(layer)
    if xlora is None:
        return patches
    owner: Any = xlora.model
    lora_model = owner.lora_model

    def forward(current: Any, *a: Any, **kw: Any) -> Tensor:
        return xlora_linear_forward(xlora, *a, **kw)

    patches += [
        Patch(layer, "forward", _once(transform_safe(forward)), wrap=True),
        Patch(
            lora_model,
            "disable_adapter_layers",
            _once(transform_safe(lambda cur: _switch_flags(lora_model, False))),
            wrap=True,
        ),
        Patch(
            lora_model,
            "enable_adapter_layers",
            _once(transform_safe(lambda cur: _switch_flags(lora_model, True))),
            wrap=True,
        ),
        Patch(owner, "_maybe_freeze_all_adapters", _once(transform_safe(lambda cur: None)), wrap=True),
    ]
    if under_transforms():
        patches.append(Patch(owner, "internal_xlora_scalings", owner.internal_xlora_scalings))
    return patches


_LORA = rule_named("lora")

XLORA = register(
    dataclasses.replace(
        _LORA,
        name="xlora",
        layer_type=LoraLinear,
        doc=RuleDoc(
            adapter="X-LoRA",
            layers="Linear (LoRA experts)",
            linear="every expert B_i ↦ c·B_i; classifier not scaled (gating unchanged with scaling_pass_value=0)",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="B_i ↦ −B_i",
        ),
        match=lambda layer, adapter: _xlora(layer) is not None and _LORA.match(layer, adapter),
        patches=_patches,
        not_deployable=(
            "PEFT saves an X-LoRA model as its classifier and the paths its experts were loaded from, and "
            "reloads the experts from those paths (PEFT's own save does not reload elsewhere): transformed "
            "experts cannot travel in it. Export each expert as a LoRA adapter from a LoRA model instead"
        ),
    )
)
