"""AdaMSS: ΔW̃ = P·[B₁A₁; …; B_K A_K]·N, with N the frozen projection onto the base
weight's top-r singular directions (``adamss_newB``; a bias column is appended to the
input when the base layer has a bias, so ΔW̃ updates weight and bias together), A_k, B_k
the trained factors of subspace k and P the fixed scatter of the subspaces' output rows.

ΔW̃ is linear in the B_k jointly, so every B_k ↦ c·B_k gives ΔW̃(c) = c·ΔW̃ exactly;
additive, so geometric equals linear and the inverse is ΔW̃ ↦ −ΔW̃. PEFT's forward is out
of place (``scatter`` into fresh zeros), so it runs unchanged under torch.func
transforms. Building an AdaMSS adapter needs scikit-learn (PEFT clusters with KMeans);
the transform itself does not.

PEFT's ``Linear`` caches the base weight's dtype when the adapter is created and casts the
input to it, so after ``model.to(torch.bfloat16)`` / ``model.double()`` its own forward
fails (dtype mismatch in the base layer). While a funcadapt call runs, that cached dtype
is set to the base weight's current dtype: where PEFT works the two are equal and nothing
changes, where PEFT raises the layer computes in the model's dtype as intended.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peft.tuners.adamss.layer import AdamssLayer
from torch import Tensor

from ..ops import RuleOp
from .base import Coeff, Effect, LayerSpec, Patch, Rule, RuleDoc, register, scale


def _linear(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    """Every subspace's B (roles ``adamss_B.<k>``) ↦ c·B."""
    return Effect({role: scale(t, c) for role, t in p.items() if role.startswith("adamss_B.")})


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    return [Patch(layer, "dtype", layer.get_base_layer().weight.dtype)]


ADAMSS = register(
    Rule(
        name="adamss",
        layer_type=AdamssLayer,
        doc=RuleDoc(
            adapter="AdaMSS",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: every B_k ↦ c·B_k in ΔW = P·[B_k A_k]·N",
            linear_exact="exact (parameter space)",
            geometric="= linear (additive)",
            invert="exact: ΔW ↦ −ΔW",
        ),
        linear=_linear,
        geometric=_linear,
        patches=_patches,
        additive=True,
        commutative=True,
    )
)
