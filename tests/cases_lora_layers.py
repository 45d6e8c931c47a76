"""Cases for LoRA on layers PEFT handles specially: ``nn.MultiheadAttention`` (PEFT merges its
adapters into the attention's weights around every call) and bare parameters reached through
``target_parameters`` (PEFT's ``ParamWrapper``, a parametrization registered per call).

The tiny Llama has no ``nn.MultiheadAttention``, so the attention case inserts one in every
decoder layer (inside what gradient checkpointing recomputes): the post-attention norm is
followed by a causal, residual, batch-first attention block (``Case.make``).
"""

from __future__ import annotations

from typing import Any

import torch
from cases import Case
from peft import LoraConfig, get_peft_model
from torch import nn


class NormThenAttention(nn.Module):
    """``norm(h)`` followed by a residual causal self-attention (``nn.MultiheadAttention``)."""

    def __init__(self, norm: nn.Module, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm = norm
        self.mha = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
        out, _ = self.mha(h, h, h, attn_mask=causal, need_weights=False)
        return h + out


def with_attention(base: nn.Module, config: Any) -> nn.Module:
    """Every decoder layer gets an attention block; the LoRA factors of its out_proj are made
    non-trivial and then frozen. PEFT's forward adds out_proj's ΔW twice but its backward sees it
    once (huggingface/peft PR #3774), so the generic tests, which compare parameter gradients
    with PEFT's, cannot hold for those factors: funcadapt differentiates what it computes.
    Their values still count in every output compared here; their gradients are checked
    against an independent reference in test_lora_layers.py."""
    for layer in base.model.layers:
        layer.post_attention_layernorm = NormThenAttention(layer.post_attention_layernorm)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if ".out_proj.lora_" in name:
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            p.requires_grad_(False)
    return model


CASES: list[Case] = [
    Case(
        "lora-mha",
        "lora-mha",
        lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]),
        make=with_attention,
    ),
    Case(
        "lora-target-parameters",
        "lora-param",
        lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["down_proj.weight"]),
    ),
]
