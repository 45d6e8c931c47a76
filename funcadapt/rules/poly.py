"""Poly: a per-task mixture of LoRA "skills" chosen by a learned router.

For example b with task t_b the router gives mixing weights w_b (per split q, skill s), and

    ΔW_b = A_b·B_b / r,   A_b = Σ_s w_{b,q,s}·A_{q,s},   B_b = Σ_s w_{b,q,s}·B_{q,s}

linear:    B ↦ c·B (every skill's B), so B_b ↦ c·B_b and ΔW_b(c) = c·ΔW_b for every task:
           y(c) = y0 + c·(y1 − y0) exactly, whatever the routing. The router is unchanged
           (c scales the routed update, it does not re-route).
geometric: = linear (additive)
invert:    ΔW_b ↦ −ΔW_b

PEFT's forward adds the update in place (``result += ...``), which cannot take a vmapped
update into an unbatched result; under torch.func transforms a math-identical out-of-place
forward is swapped in (:func:`poly_forward`). Task ids reach the layer as PEFT passes them
(``model(..., task_ids=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.poly.layer import Linear as PolyLinear
from peft.tuners.poly.layer import PolyLayer
from torch import Tensor

from ..ops import RuleOp
from .base import Patch, additive_rule, register, swap_under_transforms


def poly_forward(layer: Any, x: Tensor, *args: Any, task_ids: Tensor | None = None, **kwargs: Any) -> Tensor:
    """PEFT's ``poly.Linear.forward`` with ``result = result + ...`` instead of ``result += ...``."""
    if layer.disable_adapters:
        return type(layer).forward(layer, x, *args, task_ids=task_ids, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    for adapter in layer.active_adapters:
        if adapter not in layer.poly_lora_A:
            continue
        r = layer.r[adapter]
        weights = layer.poly_router[adapter](task_ids=task_ids, input_ids=x)
        bs = weights.shape[0]
        a = torch.einsum("bqs,qsdr->bqdr", weights, layer.poly_lora_A[adapter]).reshape(bs, layer.in_features, r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, layer.poly_lora_B[adapter])
        b = b.transpose(1, 2).reshape(bs, r, layer.out_features)
        x = x.to(a.dtype)
        result = result + x.bmm(a).bmm(b) / r
    return result.to(previous_dtype)


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    if not isinstance(layer, PolyLinear):
        return []
    return [swap_under_transforms(layer, "forward", poly_forward)]


POLY = register(
    additive_rule(
        name="poly",
        layer_type=PolyLayer,
        roles=("poly_lora_B",),
        adapter="Poly (routed LoRA skills)",
        layers="Linear",
        linear="ΔW_task(c) = c·ΔW_task: every skill's B ↦ c·B (routing unchanged)",
        patches=_patches,
        static=lambda layer, a: {"r": layer.r[a], "n_tasks": layer.n_tasks[a], "n_skills": layer.n_skills[a]},
    )
)
