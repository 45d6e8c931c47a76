"""Cases for X-LoRA (funcadapt/rules/xlora.py): a mixture of LoRA experts gated per token by a
classifier that reads the base model's hidden states.

X-LoRA is built from saved LoRA experts, not from a config alone: ``make`` saves two random
tiny-Llama LoRA experts to a temporary directory and builds the X-LoRA model on them (PEFT
loads the expert weights into memory, the directory can go).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cases
import torch
from cases import Case, tiny_llama
from peft import LoraConfig, XLoraConfig, get_peft_model
from torch import nn


def save_lora_experts(directory: str, n: int = 2) -> dict[str, str]:
    """``n`` random LoRA experts for the tiny Llama, saved under ``directory``: X-LoRA's ``adapters``.

    PEFT surprise: X-LoRA loads the experts under the names "0", "1", ... but activates the
    dict's keys, so any other keys silently switch every expert off; the keys must be those."""
    experts = {}
    for i in range(n):
        torch.manual_seed(10 + i)
        expert = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        cases.randomize_adapters(expert, seed=20 + i)  # bound late: cases.py imports this file first
        path = str(Path(directory) / f"expert{i}")
        expert.save_pretrained(path)
        experts[str(i)] = path
    return experts


def xlora_config(arch: str) -> XLoraConfig:
    return XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, xlora_depth=1, adapters={}, use_trainable_adapters=True)


def make_xlora(base: nn.Module, config: XLoraConfig) -> nn.Module:
    state = torch.random.get_rng_state()  # the experts' seeds must not change what build() draws next
    with tempfile.TemporaryDirectory() as directory:
        config.adapters = save_lora_experts(directory)
        torch.random.set_rng_state(state)
        base.config.use_cache = False  # X-LoRA refuses a KV cache
        model = get_peft_model(base, config)
    with torch.no_grad():  # transformers installs its hidden-state capturing hooks on the first forward
        model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    return model


NOTES = {
    # PEFT bug (0.21), pinned by test_special_tuners.test_xlora_peft_bf16_cast_fails: the classifier
    # records the model's dtype when it is created and makes the scaling pass's dummy scalings in it,
    # so after model.to(bfloat16) float32 scalings meet bf16 experts and PEFT's own forward raises.
    "peft_bf16_bug": "PEFT's X-LoRA forward raises after model.to(bfloat16) (stale classifier dtype)",
    # PEFT bug (0.21), pinned by test_special_tuners.test_xlora_peft_checkpointing_fails: the scalings
    # reach the layers through forward pre-hooks that exist only while the forward runs, so the
    # checkpointed recompute runs the experts without them and saves other tensors.
    "peft_checkpointing_bug": "PEFT's X-LoRA recompute under gradient checkpointing lacks the scalings",
    # the gating classifier is trainable, but no coefficient acts on it: not in the tree (see the rule)
    "trainable_outside_tree": "X-LoRA's classifier (internal_xlora_classifier)",
}

CASES: list[Case] = [
    Case("xlora", "xlora", xlora_config, make=make_xlora, notes=NOTES),
]
