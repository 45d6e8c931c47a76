"""LoRA, rsLoRA, AdaLoRA and the LoRA variants (DoRA, ...).

LoRA:    ΔW = s·B·A               → B ↦ c·B  (and B's bias, when ``lora_bias``), so ΔW(c) = c·ΔW
AdaLoRA: ΔW = s·B·(A ⊙ E)/r       → E ↦ c·E
rsLoRA only changes the float ``s``, so it is plain LoRA here.

DoRA rescales ``W + s·BA`` column-wise to a learned magnitude; the effect is not
linear in any one parameter, so ``mode="linear"`` interpolates the layer output
(exact by construction) and ``mode="geometric"`` is refused: DoRA's magnitude and
direction have no joint group structure. Other LoRA variants (aLoRA, Arrow, ...)
use the same exact fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peft.tuners.adalora.layer import AdaLoraLayer, SVDLinear
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor

from .base import Coeff, Patch, Rule, RuleDoc, register, replacing, scaling, transform_safe

_SVD4BIT: Any
try:
    from peft.tuners.adalora.bnb import SVDLinear4bit as _SVD4BIT
except ImportError:  # bitsandbytes not installed
    _SVD4BIT = None
# AdaLoRA classes whose forward adds in place (the 8-bit class already adds out of place)
_SVD_LINEAR: tuple[type, ...] = (SVDLinear,) if _SVD4BIT is None else (SVDLinear, _SVD4BIT)


def _is_vanilla(layer: Any, adapter: str) -> bool:
    return adapter not in getattr(layer, "lora_variant", {})


def _is_dora(layer: Any, adapter: str) -> bool:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return variant is not None and type(variant).__name__.startswith("Dora")


def _lora_static(layer: Any, adapter: str) -> dict:
    return {
        "scaling": layer.scaling.get(adapter),
        "r": layer.r.get(adapter),
        "use_rslora": layer.use_rslora.get(adapter, False) if hasattr(layer, "use_rslora") else False,
    }


_lora_linear = scaling("lora_B.weight", "lora_B.bias", "lora_embedding_B")
_adalora_linear = scaling("lora_E")


def adalora_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``SVDLinear.forward`` / ``SVDLinear4bit.forward`` with ``result + ...`` instead of
    ``result += ...``: the in-place add cannot take a vmapped (batched) update into an unbatched
    result. Casts happen where PEFT's do (the 4-bit class casts before scaling)."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    cast_first = _SVD4BIT is not None and isinstance(layer, _SVD4BIT)
    result = layer.base_layer(x, *args, **kwargs)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        lora_a, lora_b, lora_e = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_E[adapter]
        x = layer._cast_input_dtype(x, lora_a.dtype)
        delta = layer.lora_dropout[adapter](x) @ (lora_a * lora_e).T @ lora_b.T
        if cast_first:
            delta = delta.to(result.dtype)
        delta = delta * layer.scaling[adapter] / (layer.ranknum[adapter] + 1e-5)
        result = result + delta.to(result.dtype)
    return result


def _adalora_patches(layer: Any, adapter: str, args: Mapping[str, Coeff]) -> list[Patch]:
    if not isinstance(layer, _SVD_LINEAR):
        return []  # SVDConv2d keeps PEFT's forward: exact, but not vmap-safe (in-place add)
    return [Patch(layer, "forward", transform_safe(replacing(adalora_forward, layer)), wrap=True)]


ADALORA = register(
    Rule(
        name="adalora",
        layer_type=AdaLoraLayer,
        doc=RuleDoc(
            adapter="AdaLoRA",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: E ↦ c·E in ΔW = s·B(A⊙E)/r",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=_adalora_linear,
        additive=True,
        commutative=True,
        geometric=_adalora_linear,
        patches=_adalora_patches,
        static=lambda layer, a: {"scaling": layer.scaling.get(a), "ranknum": float(layer.ranknum[a].item())},
    )
)

DORA = register(
    Rule(
        name="dora",
        layer_type=LoraLayer,
        match=_is_dora,
        doc=RuleDoc(
            adapter="DoRA (LoRA with use_dora)",
            layers="Linear, Conv1D, Conv2d",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="refused: no group structure",
            invert="refused (use op='scale', coeff=-1)",
        ),
        linear=None,
        static=_lora_static,
        no_geometric_reason="DoRA renormalises W + s·BA to a learned magnitude; that has no group structure",
    )
)

LORA_VARIANT = register(
    Rule(
        name="lora-variant",
        layer_type=LoraLayer,
        match=lambda layer, a: not _is_vanilla(layer, a),
        doc=RuleDoc(
            adapter="other LoRA variants (aLoRA, Arrow, ...)",
            layers="Linear (MiCA)",
            linear="y(c) = y0 + c·(y1 − y0) at the layer",
            linear_exact="exact fallback (output interpolation)",
            geometric="refused",
            invert="refused (use op='scale', coeff=-1)",
        ),
        linear=None,
        static=_lora_static,
        no_geometric_reason="this LoRA variant has no known group structure",
    )
)

LORA = register(
    Rule(
        name="lora",
        layer_type=LoraLayer,
        match=_is_vanilla,
        doc=RuleDoc(
            adapter="LoRA, rsLoRA",
            layers="Linear, Conv1D, Embedding, Conv2d",
            linear="ΔW(c) = c·ΔW: B ↦ c·B (and lora_bias) in ΔW = s·BA",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=_lora_linear,
        additive=True,
        commutative=True,
        geometric=_lora_linear,
        static=_lora_static,
    )
)
