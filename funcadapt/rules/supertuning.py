"""Super-Tuning / Supra: ΔW = scatter(v) (+ (α/r)·B·A with ``r`` set), v trained values at
fixed positions of the weight (chosen by magnitude), optionally plus a LoRA term.

ΔW is linear in (v, B) jointly, so v ↦ c·v and B ↦ c·B give ΔW(c) = c·ΔW exactly; at
c = 0 the composed weight is W₀ + 0, bit for bit the base layer. Additive: geometric
equals linear, the inverse is ΔW ↦ −ΔW. PEFT's forward is out of place (``scatter_add``
into a copy), so it runs unchanged under torch.func transforms.
"""

from __future__ import annotations

from peft.tuners.supertuning.layer import SupertuningLayer

from .base import additive_rule, register

SUPERTUNING = register(
    additive_rule(
        name="supertuning",
        layer_type=SupertuningLayer,
        roles=("supertuning_values", "supertuning_lora_B.weight"),
        adapter="Super-Tuning (and Supra, with r)",
        layers="Linear",
        linear="ΔW(c) = c·ΔW: values ↦ c·values, B ↦ c·B in ΔW = scatter(v) + (α/r)·BA",
    )
)
