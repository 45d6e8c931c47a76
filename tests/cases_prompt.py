"""Cases for adaption prompt (LLaMA-Adapter), the one prompt method with a per-layer effect.

PEFT zero-initialises the gate; ``build`` randomises every trainable tensor, so the gate and
the prompt act. Three forms: Llama (bias-free ``o_proj``: exact gate scaling), GPT-2 (no
output projection: exact gate scaling) and a Llama whose ``o_proj`` has a (non-zero) bias,
where PEFT's gate 0 is not the base model and funcadapt interpolates the block's output.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from cases import Case
from peft import AdaptionPromptConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM


def adaption_prompt_config(arch: str) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)


def biased_o_proj(base: nn.Module) -> nn.Module:
    """A Llama like ``base`` whose attention projections have biases, ``o_proj``'s non-zero."""
    config = copy.deepcopy(base.config)
    config.attention_bias = True
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.o_proj.bias
            bias.copy_(0.5 * torch.randn(bias.shape, generator=g))
    return model


def _biased_make(base: nn.Module, config: Any) -> nn.Module:
    return get_peft_model(biased_o_proj(base), config)


NOTES = {"float32_inside": "PEFT's AdaptedAttention takes the prompt's softmax in float32 (and its gradient)"}

CASES: list[Case] = [
    Case("adaption-prompt", "adaption-prompt", adaption_prompt_config, archs=("llama", "gpt2"), notes=NOTES),
    Case("adaption-prompt-o-bias", "adaption-prompt", adaption_prompt_config, make=_biased_make, notes=NOTES),
]
