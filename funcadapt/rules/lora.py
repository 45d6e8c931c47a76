"""LoRA, rsLoRA, AdaLoRA and the LoRA variants (DoRA, ...).

LoRA:    ΔW = s·B·A               → B ↦ c·B  (and B's bias, when ``lora_bias``), so ΔW(c) = c·ΔW
AdaLoRA: ΔW = s·B·(A ⊙ E)/r       → E ↦ c·E
rsLoRA only changes the float ``s``, so it is plain LoRA here.

LoRA on a bare ``nn.Parameter`` (``target_parameters``, PEFT's ``ParamWrapper``) adds the same
ΔW = s·BA (per expert for a 3-d parameter) to the parameter while its module runs. That module
may use the parameter non-linearly (an MoE expert block: gate_up → activation → down), so
``mode="linear"`` interpolates the module's output (exact fallback) and ``mode="geometric"`` is
the weight-space ΔW(c) = c·ΔW: B ↦ c·B. PEFT registers a parametrization on every call (refused by
torch.func transforms, and bumping the parameter's autograd version); during funcadapt calls a
math-identical forward shows W + ΔW through ``torch.func.functional_call`` instead.
``nn.MultiheadAttention`` has its own rule (:mod:`funcadapt.rules.lora_mha`).

DoRA rescales ``W + s·BA`` column-wise to a learned magnitude; the effect is not
linear in any one parameter, so ``mode="linear"`` interpolates the layer output
(exact by construction) and ``mode="geometric"`` is refused: DoRA's magnitude and
direction have no joint group structure. Other LoRA variants (aLoRA, Arrow, ...)
use the same exact fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.adalora.layer import AdaLoraLayer, SVDConv2d, SVDLinear
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.lora.layer import _LoraFactorsProxy as _FactorsProxy
from peft.tuners.lora.layer import _LoraParameterProxy as _DeltaProxy
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import UPCAST_DTYPES
from torch import Tensor, nn

from ..ops import RuleOp
from .base import Patch, Rule, RuleDoc, known_value, register, scaling, swap_under_transforms
from .lora_mha import LORA_MHA as LORA_MHA_RULE

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


def adalora_conv2d_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``SVDConv2d.forward`` with its in-place ``result += conv2d(x, ΔW)`` written out of
    place. An in-place add computes in the promoted dtype and rounds into ``result``'s dtype;
    ``(result + update).to(result.dtype)`` does the same, so the values are PEFT's."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    base = layer.get_base_layer()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        lora_a, lora_b, lora_e = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_E[adapter]
        x = layer._cast_input_dtype(x, lora_a.dtype)
        ranknum = layer.ranknum[adapter] + 1e-5
        delta_w = (lora_b @ (lora_a * lora_e) * layer.scaling[adapter] / ranknum).reshape(base.weight.shape)
        update = nn.functional.conv2d(
            layer.lora_dropout[adapter](x),
            delta_w,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=base.groups,
        )
        result = (result + update).to(result.dtype)
    return result


def _adalora_patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    if isinstance(layer, _SVD_LINEAR):
        forward = adalora_forward
    elif isinstance(layer, SVDConv2d):
        forward = adalora_conv2d_forward
    else:
        return []  # the 8-bit and GPTQ classes already add out of place
    return [swap_under_transforms(layer, "forward", forward)]


def _is_low_precision(dtype: torch.dtype) -> bool:
    return any(getattr(torch, name, None) == dtype for name in UPCAST_DTYPES)


def _param_path(layer: Any) -> tuple[nn.Module, str]:
    """(the module that owns the wrapped parameter, its key relative to ``layer.base_layer``).
    ParamWrappers nest (one per targeted parameter of a module); the parameter sits on the
    innermost, non-adapter module."""
    owner, prefix = layer.base_layer, ""
    while _is_tuner(owner):
        owner, prefix = owner.base_layer, prefix + "base_layer."
    return owner, prefix + layer.parameter_name


def _is_tuner(module: Any) -> bool:
    return isinstance(module, BaseTunerLayer)


def param_wrapper_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``ParamWrapper.forward`` without its parametrization: PEFT registers
    ``W ↦ W + Σ ΔW_a`` as a ``torch.nn.utils.parametrize`` parametrization on every forward
    (``set_`` on the parameter, ``requires_grad_``), which torch.func transforms refuse. Here the same
    ``W + Σ ΔW_a`` (PEFT's own delta: its factored ``baddbmm`` for one adapter on an expert stack,
    its upcast-add-clamp for float8 parameters) is shown to the base module through
    ``torch.func.functional_call``. Nothing is registered or mutated."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if layer.disable_adapters or layer.merged or not adapters or kwargs.get("adapter_names") is not None:
        return type(layer).forward(layer, x, *args, **kwargs)  # registers nothing (or raises, like PEFT)
    layer._check_forward_args(x, *args, **kwargs)
    owner, key = _param_path(layer)
    if nn.utils.parametrize.is_parametrized(owner, layer.parameter_name):
        raise ValueError(
            f"{type(owner).__name__}.{layer.parameter_name} carries a torch parametrization besides LoRA's; "
            f"funcadapt cannot show LoRA's W + ΔW through it without registering parametrizations; "
            f"remove the other parametrization (torch.nn.utils.parametrize.remove_parametrizations) first"
        )
    weight = getattr(owner, layer.parameter_name)
    if len(adapters) == 1 and layer.num_experts > 1 and not _is_low_precision(weight.dtype):
        proxy: nn.Module = _FactorsProxy(*layer.get_delta_factors(adapters[0]))
    else:
        delta = layer.get_delta_weight(adapters[0])
        for adapter in adapters[1:]:
            delta = delta + layer.get_delta_weight(adapter)
        proxy = _DeltaProxy(delta)
    return torch.func.functional_call(layer.base_layer, {key: proxy(weight)}, (x, *args), kwargs)


_PARAM_INSTALLED = "_funcadapt_param_forward"


def _param_patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    """:func:`param_wrapper_forward` as the layer's forward for the whole call, not only under
    transforms: PEFT's parametrization calls ``set_`` on the base parameter in place on every forward,
    which bumps its autograd version, so a base output computed earlier in the same graph (y0 of
    the output interpolation) could no longer be differentiated. Installed once: a frame already
    applied (an enclosing context, or this frame for another adapter) put it beneath whatever
    wraps it now, and replacing that would drop the enclosing effect."""
    if getattr(layer, _PARAM_INSTALLED, False):
        return []

    def forward(x: Tensor, *a: Any, **kw: Any) -> Tensor:
        return param_wrapper_forward(layer, x, *a, **kw)

    return [Patch(layer, _PARAM_INSTALLED, True), Patch(layer, "forward", forward)]


ADALORA = register(
    Rule(
        name="adalora",
        layer_type=AdaLoraLayer,
        doc=RuleDoc(
            adapter="AdaLoRA",
            layers="Linear, Conv2d",
            linear="ΔW(c) = c·ΔW: E ↦ c·E in ΔW = s·B(A⊙E)/r",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
            quantized="4-bit nf4, 8-bit",
        ),
        linear=_adalora_linear,
        additive=True,
        commutative=True,
        geometric=_adalora_linear,
        patches=_adalora_patches,
        static=lambda layer, a: {"scaling": layer.scaling.get(a), "ranknum": known_value(layer.ranknum[a])},
    )
)

# LoRA on nn.MultiheadAttention (the attention layer and the out_proj layer nested in it): same
# layer class as the rules below, so it must be registered first to win
LORA_MHA = register(LORA_MHA_RULE)

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
            quantized="4-bit nf4 (8-bit: PEFT fails on CPU, pinned)",
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


def _lora_rows(layer: Any, adapter: str, coeffs_for: Callable[[Tensor], Tensor]) -> list[Patch] | None:
    """Per-row and per-token coefficients for vanilla LoRA: PEFT adds ``lora_B(lora_A(dropout(x))) · s``,
    and a bias-free B is linear and acts on each row and token alone, so scaling B's rank-r input by
    c[i] (or c[b, t]) scales that row's (token's) update by it exactly, for the cost of one multiply
    on (batch, …, r). Embedding LoRA (no B module) and ``lora_bias`` (B(c·h) ≠ c·B(h)) use the output
    interpolation instead."""
    lora_b = layer.lora_B[adapter] if adapter in getattr(layer, "lora_B", {}) else None
    if not isinstance(lora_b, nn.Module) or getattr(lora_b, "bias", None) is not None:
        return None

    def wrap(current: Any) -> Any:
        def row_scaled(h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            dtype = torch.promote_types(h.dtype, torch.float32)  # float32 at least, float64 kept
            k = coeffs_for(h).to(device=h.device, dtype=dtype)
            return current((h.to(dtype) * k).to(h.dtype), *args, **kwargs)

        return row_scaled

    return [Patch(lora_b, "forward", wrap, wrap=True)]


LORA = register(
    Rule(
        name="lora",
        layer_type=LoraLayer,
        match=_is_vanilla,
        doc=RuleDoc(
            adapter="LoRA, rsLoRA",
            layers="Linear, Conv1D, Embedding, Conv1d/2d/3d",
            linear="ΔW(c) = c·ΔW: B ↦ c·B (and lora_bias) in ΔW = s·BA",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
            quantized="4-bit nf4, fp4 + double quant (bf16), 8-bit",
        ),
        linear=_lora_linear,
        additive=True,
        commutative=True,
        geometric=_lora_linear,
        static=_lora_static,
        row_scale=_lora_rows,
        scaled_output="scaling",
    )
)

_param_scaling = scaling("lora_B.weight")

LORA_PARAM = register(
    Rule(
        name="lora-param",
        layer_type=ParamWrapper,
        doc=RuleDoc(
            adapter="LoRA on parameters (target_parameters)",
            layers="nn.Parameter of any module (2-d, 3-d expert stacks)",
            linear="y(c) = y0 + c·(y1 − y0) at the module (it may be non-linear in W)",
            linear_exact="exact fallback (output interpolation)",
            geometric="ΔW(c) = c·ΔW: B ↦ c·B (weight space)",
            invert="exact: ΔW ↦ −ΔW (weight space)",
        ),
        linear=None,
        geometric=_param_scaling,
        commutative=True,
        patches=_param_patches,
        static=_lora_static,
    )
)
