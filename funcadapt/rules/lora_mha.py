"""LoRA on ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``).

PEFT adapts both projections of the attention: the packed in-projection, a bare Parameter,
``W_in ↦ W_in + ΔW_in`` with ΔW_in = s·B·A, and the out-projection, a nested LoRA ``Linear``
around ``out_proj``, ``W_out ↦ W_out + k·ΔW_out``. Neither change goes through a layer's
forward (``nn.MultiheadAttention`` reads the weights directly), so PEFT *merges* them into the
weights around every call, replacing the Parameters and rounding the base weights by
``(W + ΔW) − ΔW`` each time. ``k`` is 2 in PEFT ≤ 0.21: its merge adds out_proj's ΔW once
itself and once more through the nested layer's ``merge`` (huggingface/peft PR #3774), so the
model PEFT runs, and merges, has ``W_out + 2·ΔW_out``. funcadapt reproduces what PEFT runs: ``k``
is read once from PEFT's own merge on a throw-away probe, so the two agree whether or not the fix
has landed.

Here the attention always runs through :func:`mha_forward`: the base attention evaluated by
``torch.func.functional_call`` on the effective weights, computed out of place from the
(possibly transformed) adapter tensors. Nothing is merged, replaced or rounded; it is
vmap-safe; its gradients are those of the function it computes (PEFT's own backward sees
out_proj's ΔW only once, because the second add goes through ``.data``).

* ``mode="linear"``: the attention output is not linear in ΔW (the softmax sees ΔW_in), so the
  output is interpolated, y(c) = y0 + c·(y1 − y0) with y0 the base attention (exact fallback).
  The nested out_proj layer belongs to the same effect: its forward is never called, and its
  tensors are read by the attention's forward, so it takes no part of its own.
* ``mode="geometric"``: ΔW(c) = c·ΔW in both projections: B ↦ c·B (weight space; additive).
* ``invert``: ΔW ↦ −ΔW in both projections, the exact inverse in weight space.

``lora_bias`` follows PEFT: out_proj's bias gains s·b_B; the in-projection's lora_B bias is
ignored (PEFT's merge ignores it). Per-row coefficients are refused (for now also with
``batch_first=True``): the output interpolated is sequence-first by default, so its first axis
is not the batch's.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from torch import Tensor, nn

from ..ops import RuleOp
from .base import Patch, Rule, RuleDoc, scaling, under_transforms


def is_mha_part(layer: Any, adapter: str = "") -> bool:
    """LoRA's attention layer, or the LoRA ``Linear`` PEFT nests inside it around ``out_proj``
    (the only place a ``NonDynamicallyQuantizableLinear`` is used)."""
    if isinstance(layer, LoraMultiheadAttention):
        return True
    base = getattr(layer, "base_layer", None)
    return isinstance(layer, LoraLinear) and isinstance(base, nn.modules.linear.NonDynamicallyQuantizableLinear)


@functools.cache
def out_proj_multiplicity() -> int:
    """How many times PEFT's merge (and so its forward) adds out_proj's ΔW: read from PEFT's own
    ``merge`` on a throw-away attention with W_out = 0 and ΔW_out = 0.5 everywhere. Computed once,
    when this module is imported: the probe's random initialisation cannot run under
    ``vmap(randomness="different")``, and it leaves the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        return _probe_multiplicity()


def _probe_multiplicity() -> int:
    from peft import LoraConfig, inject_adapter_in_model

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(2, 1, bias=False)

    probe = Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["mha"]), probe)
        layer: Any = probe.mha
        out = layer.get_base_layer().out_proj
        with torch.no_grad():
            for part in (layer, out):
                part.lora_A["default"].weight.fill_(1.0)
                part.lora_B["default"].weight.fill_(0.5)
            out.get_base_layer().weight.zero_()
        layer.merge()
        k = out.get_base_layer().weight[0, 0].item() / 0.5
    if k not in (1.0, 2.0):
        raise RuntimeError(f"funcadapt: PEFT's MultiheadAttention merge adds out_proj's ΔW {k} times; expected 1 or 2")
    return int(k)


OUT_PROJ_MULTIPLICITY = out_proj_multiplicity()
"""Read at import, outside any torch.func transform, and a constant to torch.compile (which would trace
the probe, forking the RNG, if the forward called the function)."""


def _delta(part: Any, adapter: str, fan_in_fan_out: bool = False) -> Tensor:
    """s·B·A as PEFT's ``get_delta_weight`` computes it (half precision on CPU goes through float32),
    without its write-back of the factors."""
    b, a = part.lora_B[adapter].weight, part.lora_A[adapter].weight
    upcast = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
    product = b.float() @ a.float() if upcast else b @ a
    if fan_in_fan_out:
        product = product.T
    delta = product * part.scaling[adapter]
    return delta.to(b.dtype) if upcast else delta


def effective_weights(layer: Any, adapters: list[str]) -> dict[str, Tensor]:
    """The attention's weights with ``adapters`` added the way PEFT merges them, keyed for
    ``functional_call`` on ``layer.get_base_layer()``. Out of place; reads the live tensors
    (those a funcadapt call shows)."""
    mha = layer.get_base_layer()
    out = mha.out_proj
    out_base = out.get_base_layer()
    if out.base_layer is not out_base:
        raise ValueError(f"out_proj of {type(mha).__name__} is wrapped by several adapter layers; unsupported")
    dtype = out_base.weight.dtype
    k = OUT_PROJ_MULTIPLICITY
    w_in, w_out, b_out = mha.in_proj_weight, out_base.weight, out_base.bias
    for adapter in adapters:
        w_in = w_in + _delta(layer, adapter).to(dtype)
        d_out = _delta(out, adapter, out.fan_in_fan_out).to(dtype)
        for _ in range(k):
            w_out = w_out + d_out
        if out.lora_bias.get(adapter, False):
            b_out = b_out + out.lora_B[adapter].bias * out.scaling[adapter]
    weights = {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}
    if b_out is not out_base.bias:
        weights["out_proj.base_layer.bias"] = b_out
    return weights


def mha_forward(layer: Any, query: Tensor, *args: Any, **kwargs: Any) -> Any:
    """PEFT's forward of LoRA on ``nn.MultiheadAttention``, computed without merging: the base
    attention run by ``torch.func.functional_call`` on :func:`effective_weights`. The adapters
    are the attention layer's active ones, for both projections (y0 of the output
    interpolation switches them off on the attention layer only)."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, query, *args, **kwargs)  # no merge happens on these paths
    layer._check_forward_args(query, *args, **kwargs)
    mha = layer.get_base_layer()
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    stray = [a for a in adapters if a not in mha.out_proj.active_adapters]
    if stray:
        raise ValueError(
            f"adapter(s) {stray} are active on {type(mha).__name__} but not on its out_proj; set the same "
            f"active adapters on both (model.set_adapter(...))"
        )
    # torch's fused fast path (eval, batch_first, no grad needed) has neither a batching rule nor a
    # derivative; under torch.func transforms the attention takes the composite path instead
    # (torch.compile cannot trace that switch and takes the composite path itself)
    switch = under_transforms() and not torch.compiler.is_compiling()
    fast = torch.backends.mha.get_fastpath_enabled() if switch else True
    if switch:
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        if adapters:
            result = torch.func.functional_call(mha, effective_weights(layer, adapters), (query, *args), kwargs)
        else:
            result = mha(query, *args, **kwargs)
    finally:
        if switch:
            torch.backends.mha.set_fastpath_enabled(fast)
    dtype = query.dtype
    return result[0].to(dtype), (result[1].to(dtype) if result[1] is not None else None)


_INSTALLED = "_funcadapt_mha_forward"


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    """:func:`mha_forward` as the layer's forward, once: a frame already applied (an enclosing
    context, or this frame for another adapter) has installed it beneath whatever wraps it now
    (an output interpolation), and replacing that would drop the enclosing effect."""
    if not isinstance(layer, LoraMultiheadAttention):
        return []  # the nested out_proj layer: its forward is never called
    if getattr(layer, _INSTALLED, False):
        return []

    def forward(query: Tensor, *a: Any, **kw: Any) -> Any:
        return mha_forward(layer, query, *a, **kw)

    return [Patch(layer, _INSTALLED, True), Patch(layer, "forward", forward)]


def _static(layer: Any, adapter: str) -> dict[str, Any]:
    return {
        "part": "attention" if isinstance(layer, LoraMultiheadAttention) else "out_proj",
        "scaling": layer.scaling.get(adapter),
        "r": layer.r.get(adapter),
    }


_scale_b = scaling("lora_B.weight", "lora_B.bias")

LORA_MHA = Rule(
    name="lora-mha",
    # LoraLayer, not PEFT's attention class: the rule also claims the nested out_proj LoRA Linear;
    # funcadapt.rules.lora registers it before DoRA and plain LoRA, so it wins on that class
    layer_type=LoraLayer,
    match=is_mha_part,
    doc=RuleDoc(
        adapter="LoRA on nn.MultiheadAttention",
        layers="MultiheadAttention (in_proj + out_proj)",
        linear="y(c) = y0 + c·(y1 − y0) at the attention output; per_row, per_token, per_image refused",
        linear_exact="exact fallback (output interpolation)",
        geometric="ΔW(c) = c·ΔW in both projections: B ↦ c·B",
        invert="exact: ΔW ↦ −ΔW (weight space)",
    ),
    linear=None,
    geometric=_scale_b,
    commutative=True,
    patches=_patches,
    static=_static,
    rows_coupled=(
        "LoRA on nn.MultiheadAttention is interpolated at the attention output, whose first axis is the "
        "sequence by default (batch_first=False), not the batch; funcadapt does not give attention modules "
        "per-row coefficients yet"
    ),
)
