"""Adaption prompt (LLaMA-Adapter): the gate scales the attention over the learned prompt.

PEFT wraps the top attention modules in ``AdaptedAttention`` (``AdaptedAttentionGPT`` for
GPT-2), whose output is the wrapped attention's plus a gated attention over ``adapter_len``
learned prompt tokens::

    y(g) = attn(x) + o_proj(g · softmax(q·k_pᵀ/√d) · v_p)      (Llama, Mistral)
    y(g) = attn(x) +        g · softmax(q·k_pᵀ/√d) · v_p       (GPT-2: no output projection)

The block (the whole ``AdaptedAttention``) is the adapted layer: y0 is the wrapped attention
alone, exactly what ``disable_adapter()`` swaps back in (``AdaptedAttention.model``).

* ``o_proj`` without a bias (Llama, Mistral, GPT-2): y is linear in the gate and y(0) = y0,
  so ``g ↦ c·g`` gives y0 + c·(y1 − y0) exactly (parameter space). The effect is additive, so
  geometric = linear, and invert is ``g ↦ −g``.
* ``o_proj`` with a bias (``attention_bias=True``): PEFT adds the bias a second time,
  y(g) = attn(x) + g·W·s + b, so gate 0 is *not* the base model (a PEFT bug, pinned in
  tests/test_prompt_learning.py) and scaling the gate would not reach c = 0 == base. There
  funcadapt uses the exact output interpolation at the block, y0 being the wrapped attention,
  in every mode (the bias then counts as part of the adapter's effect, as PEFT's c = 1 has it).

The wrappers are not PEFT tuner layers: only the active adapter's wrappers are in the model
(PEFT swaps them in and out on ``set_adapter`` and ``disable_adapter``), their parameters are
``<attention>.adaption_prompt`` / ``.adaption_gate`` without an adapter name, and the name is
the active adapter of the enclosing ``AdaptionPromptModel``. A :class:`LayerAccess` tells
funcadapt so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG
from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
from peft.tuners.adaption_prompt.model import AdaptionPromptModel
from torch import Tensor

from .base import Coeff, Effect, LayerAccess, LayerSpec, Rule, RuleDoc, interpolated, register, scale

ROLES = ("adaption_prompt", "adaption_gate")


def _adapters(layer: Any, ancestors: Sequence[Any]) -> list[str]:
    parent = ancestors[-1] if ancestors else None
    for owner in reversed(ancestors):
        if isinstance(owner, AdaptionPromptModel):
            name = owner._active_adapter
            if name is not None and any(p is parent for p in owner._parents.get(name, ())):
                return [name]
    raise ValueError(
        f"found an adaption-prompt {type(layer).__name__} outside the AdaptionPromptModel that owns it; the "
        f"adapter's name lives there, so extract from (and call) the PeftModel or its base_model"
    )


def _entries(layer: Any, adapter: str) -> dict[str, tuple[str, Tensor]]:
    return {role: (role, getattr(layer, role)) for role in ROLES}


def _base(layer: Any) -> Any:
    return layer.model  # the wrapped attention, which disable_adapter() swaps back in


def _static(layer: Any, adapter: str) -> dict[str, Any]:
    o_proj = TRANSFORMERS_MODEL_CONFIG[layer.model_type].o_proj_layer
    biased = o_proj is not None and getattr(getattr(layer.model, o_proj), "bias", None) is not None
    return {"o_proj_bias": biased}


def _linear(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    if spec.static["o_proj_bias"]:
        return interpolated(spec, p, c)
    return Effect({"adaption_gate": scale(p["adaption_gate"], c)})


def _invert(spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    return _linear(spec, p, -1.0)


ADAPTION_PROMPT = register(
    Rule(
        name="adaption-prompt",
        layer_type=_BaseAdaptedAttention,
        doc=RuleDoc(
            adapter="Adaption prompt (LLaMA-Adapter)",
            layers="attention blocks (Llama, GPT-2)",
            linear="gate ↦ c·gate (y is linear in the gate); o_proj with bias: output interpolation",
            linear_exact="exact (parameter space); exact fallback with a biased o_proj",
            geometric="= linear (additive)",
            invert="gate ↦ −gate (biased o_proj: y0 − (y1 − y0))",
        ),
        linear=_linear,
        geometric=_linear,
        invert=_invert,
        static=_static,
        additive=True,
        commutative=True,
        access=LayerAccess(adapters=_adapters, entries=_entries, base=_base),
    )
)
