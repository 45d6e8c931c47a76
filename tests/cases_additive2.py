"""Cases for the newer additive / reconstruction families: WaveFT, FRoD, TinyLoRA, PEANuT,
Super-Tuning (and Supra), AdaMSS. Every generic test in tests/ iterates over these."""

from __future__ import annotations

from typing import Any

import pytest
from cases import ATTN, Case
from peft import FrodConfig, PeanutConfig, SupertuningConfig, TinyLoraConfig, WaveFTConfig


def _adamss(arch: str, **kw: Any) -> Any:
    # PEFT builds AdaMSS subspaces with scikit-learn's KMeans (optional dependency); without it
    # neither the config nor the adapter can be created, so the case skips (and only then).
    pytest.importorskip("sklearn", reason="AdaMSS needs scikit-learn (pip install scikit-learn)")
    from peft import AdamssConfig

    return AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules=ATTN[arch], **kw)


CASES: list[Case] = [
    Case(
        "waveft",
        "waveft",
        lambda arch: WaveFTConfig(n_frequency=40, target_modules=ATTN[arch]),
        archs=("llama", "gpt2"),
    ),
    Case(
        "waveft-no-idwt",
        "waveft",
        lambda arch: WaveFTConfig(n_frequency=40, target_modules=ATTN[arch], use_idwt=False),
    ),
    Case(
        "waveft-db4",
        "waveft",
        lambda arch: WaveFTConfig(n_frequency=40, target_modules=ATTN[arch], wavelet_family="db4"),
    ),
    Case(
        "frod",
        "frod",
        lambda arch: FrodConfig(target_modules=ATTN[arch], progressbar=False),
        archs=("llama", "gpt2", "bert"),
        geometric=False,
    ),
    Case(
        "tinylora",
        "tinylora",
        lambda arch: TinyLoraConfig(r=2, u=8, target_modules=ATTN[arch]),
        archs=("llama", "gpt2"),
    ),
    Case(
        "tinylora-tied",
        "tinylora",
        # one v shared by all four layers
        lambda arch: TinyLoraConfig(r=2, u=8, target_modules=ATTN[arch], weight_tying=1.0),
    ),
    Case(
        "tinylora-embedding",
        "tinylora",
        lambda arch: TinyLoraConfig(r=2, u=8, target_modules=["embed_tokens", "q_proj"], weight_tying=0.5),
    ),
    Case(
        "peanut",
        "peanut",
        lambda arch: PeanutConfig(r=4, depth=2, target_modules=ATTN[arch]),
        archs=("llama", "bert"),
    ),
    Case(
        "supertuning",
        "supertuning",
        lambda arch: SupertuningConfig(target_modules=ATTN[arch], sparsity=0.9),
        archs=("llama", "bert"),
    ),
    Case(
        "supertuning-supra",
        "supertuning",
        lambda arch: SupertuningConfig(target_modules=ATTN[arch], sparsity=0.9, r=4, lora_alpha=8),
    ),
    # PEFT bug: AdaMSS's Linear caches ``self.dtype`` at construction, so a model cast with ``.to(bf16)``
    # after get_peft_model fails in PEFT's own forward (pinned in test_rules_additive2.py, which also
    # runs bf16 built the supported way). test_bf16 takes only cases listing "llama", so this case
    # lists "bert" (a Linear with bias: AdaMSS's bias column); the tests that build the default arch
    # still run it on llama in float32.
    Case(
        "adamss",
        "adamss",
        _adamss,
        archs=("bert",),
        # the same PEFT bug in float64: cases.build(dtype=torch.float64) creates the adapter on a float64 base
        notes={"float64_before_peft": "AdaMSS's Linear caches the base weight dtype at construction"},
    ),
]
