"""Cases for the special tuners: LN Tuning and Poly.

Poly's layers need per-example task ids at every forward (``model(..., task_ids=...)``),
which the shared harness does not pass. Its case therefore builds the model through
``Case.make``: each Poly layer gets a forward pre-hook that supplies ``task_ids`` when the
caller does not: one task for every row, so that a row's output does not depend on
its position (coefficient batches tile the rows). Per-task routing (different tasks in
one batch, explicit ``task_ids``) is tested in test_special_tuners.py.
"""

from __future__ import annotations

from typing import Any

import torch
from cases import ATTN, Case
from peft import LNTuningConfig, PolyConfig, get_peft_model
from peft.tuners.poly.layer import PolyLayer
from torch import nn

POLY_TASKS = 3


DEFAULT_TASK = 1


def default_task_ids(batch: int) -> torch.Tensor:
    return torch.full((batch,), DEFAULT_TASK)


def _task_ids_hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("task_ids") is None:
        x = args[0] if args else kwargs["x"]
        kwargs["task_ids"] = default_task_ids(x.shape[0])
    return args, kwargs


def with_default_task_ids(model: nn.Module) -> nn.Module:
    """Every Poly layer gets ``task_ids`` = DEFAULT_TASK for each row unless the caller passed some (PEFT's own
    hooks, installed per forward by ``model(..., task_ids=...)``, run later and win). Installed on
    the layers, not on the model, because PEFT's per-forward hooks are gone when a gradient
    checkpoint recomputes a layer during backward (a PEFT bug: Poly cannot backward through
    checkpointed layers, pinned in test_special_tuners.py)."""
    for module in model.modules():
        if isinstance(module, PolyLayer):
            module.register_forward_pre_hook(_task_ids_hook, with_kwargs=True)
    return model


def poly_config(arch: str) -> PolyConfig:
    return PolyConfig(task_type="CAUSAL_LM", r=4, n_tasks=POLY_TASKS, n_skills=2, n_splits=2, target_modules=ATTN[arch])


def _poly_make(base: nn.Module, config: Any) -> nn.Module:
    return with_default_task_ids(get_peft_model(base, config))


LN_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],  # RMSNorm: weight only
    "gpt2": ["ln_1", "ln_2", "ln_f"],  # LayerNorm: weight and bias
    "bert": ["LayerNorm"],
}

CASES: list[Case] = [
    Case(
        "ln-tuning",
        "ln-tuning",
        lambda arch: LNTuningConfig(target_modules=LN_TARGETS[arch]),
        archs=("llama", "gpt2", "bert"),
    ),
]

CASES.append(Case("poly", "poly", poly_config, make=_poly_make))
