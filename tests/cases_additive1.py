"""Cases for C3A, SHiRA, VB-LoRA, GraLoRA, Lily and Uni-LoRA (appended to cases.CASES).

Architectures are those PEFT supports for each family: C3A, SHiRA and Lily only adapt
``nn.Linear`` (not GPT-2's Conv1D); VB-LoRA, GraLoRA and Uni-LoRA also Conv1D. None of
them adapts Embedding or Conv2d. Sizes: llama's v_proj is 32 → 16, so block sizes and
vector lengths divide 16.
"""

from __future__ import annotations

from typing import Any

import peft.tuners.c3a.layer
import torch
from cases import ATTN, FFN, Case
from peft import C3AConfig, GraloraConfig, LilyConfig, ShiraConfig, UniLoraConfig, VBLoRAConfig
from torch import Tensor


class ExactBlockCircularConvolution:
    """PEFT's C3A ``BlockCircularConvolution`` (same forward) with autograd's exact gradients
    instead of its hand-written backward, whose input gradient is wrong (PEFT 0.21.2; see
    test_rules_additive1.py). Written independently of funcadapt, for references."""

    @staticmethod
    def apply(x: Tensor, w: Tensor) -> Tensor:
        _, n, b = w.shape
        mixed = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x.reshape(*x.shape[:-1], n, b)), torch.fft.fft(w))
        y = torch.fft.fft(mixed).real
        return y.reshape(*y.shape[:-2], -1)


def fix_c3a_backward(monkeypatch: Any) -> None:
    """Make PEFT's C3A forward differentiate exactly (for a reference computed by PEFT itself)."""
    monkeypatch.setattr(peft.tuners.c3a.layer, "BlockCircularConvolution", ExactBlockCircularConvolution)


CASES: list[Case] = [
    Case(
        "c3a",
        "c3a",
        lambda arch: C3AConfig(block_size=8, target_modules=ATTN[arch]),
        archs=("llama", "bert"),
        # PEFT's own backward is wrong for C3A: gradient references must use the corrected one
        notes={
            "reference_fixes": (fix_c3a_backward,),
            "float32_inside": "PEFT computes C3A's circular convolution in float32",
        },
    ),
    Case("shira", "shira", lambda arch: ShiraConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case(
        "vblora",
        "vblora",
        lambda arch: VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=2, target_modules=ATTN[arch]),
        archs=("llama", "gpt2", "bert"),
    ),
    Case(
        "gralora",
        "gralora",
        lambda arch: GraloraConfig(r=4, alpha=8, gralora_k=2, target_modules=ATTN[arch]),
        archs=("llama", "gpt2", "bert"),
    ),
    Case(
        "gralora-hybrid",
        "gralora",
        lambda arch: GraloraConfig(r=4, hybrid_r=2, alpha=8, gralora_k=2, target_modules=ATTN[arch] + FFN[arch]),
        archs=("llama", "gpt2"),
    ),
    Case(
        "lily",
        "lily",
        lambda arch: LilyConfig(r=4, stride_A=2, num_B=2, scaling=2.0, target_modules=ATTN[arch]),
        archs=("llama", "bert"),
        # the router averages over the whole batch: rows are not independent (see test_rules_additive1.py)
        notes={"per_row_refused": True},
    ),
    Case(
        "unilora",
        "unilora",
        lambda arch: UniLoraConfig(r=4, theta_d_length=64, target_modules=ATTN[arch]),
        archs=("llama", "gpt2", "bert"),
    ),
]
