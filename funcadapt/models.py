"""Model modules (outside PEFT) whose forward torch.func transforms cannot run, and the same math in
plain ops, swapped in under transforms only (outside them the model's own code runs).

torch.func.vmap and grad refuse an ``autograd.Function`` without ``setup_context``. Where a model
computes a plain function through one, the same function in plain differentiable ops gives the same
values and, through autograd, the derivative the Function's hand-written backward implements (to
float rounding). ``nn.GroupNorm`` (diffusers' UNets) fails under vmap on an input laid out neither
contiguous nor channels-last ("NYI: querying is_contiguous inside of vmap"): under transforms it
normalises a contiguous copy, the same values. Other such Functions are reported by
:func:`funcadapt.vmap` with the module named (see :func:`custom_function_error`).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

PLAIN_FORWARDS: dict[str, tuple[str, str]] = {
    # GeLUFunction: the tanh-approximated GELU x·½·(1 + tanh(0.79788456·x·(1 + 0.044715·x²)))
    "transformers.models.bloom.modeling_bloom.BloomGelu": (
        "transformers.models.bloom.modeling_bloom",
        "bloom_gelu_forward",
    ),
}
"""Module class (``module.qualname``) -> (module, function) computing its forward from its input."""


def qualified(cls: type) -> str:
    """``module.qualname`` of the class a module was built as: torch.distributed's in-place wrappers
    (``fully_shard``, composable ``replicate``, ``replicate_with_fsdp``) swap in a subclass of (their marker
    class, that class), which lookups by class name must see through."""
    while len(cls.__bases__) == 2 and any(_is_marker(c) for c in cls.__bases__[0].__mro__):
        cls = cls.__bases__[1]
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_marker(cls: type) -> bool:
    """FSDP2's ``FSDPModule`` (``replicate_with_fsdp``'s ``ReplicateModule`` derives from it) or composable
    ``replicate``'s ``DDP``, defined in torch.distributed."""
    return cls.__name__ in ("FSDPModule", "DDP") and cls.__module__.startswith("torch.distributed.")


def _group_norm(module: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x.contiguous(), module.num_groups, module.weight, module.bias, module.eps)


def plain_forward(module: nn.Module) -> Callable[..., Any] | None:
    """``fn(module, *args)``: the module's forward in plain ops, if it is registered."""
    if type(module) is nn.GroupNorm:
        return _group_norm
    found = PLAIN_FORWARDS.get(qualified(type(module)))
    if found is None:
        return None
    function = getattr(importlib.import_module(found[0]), found[1])

    def forward(_: nn.Module, x: Tensor) -> Tensor:
        return function(x)

    return forward


def custom_function_error(error: BaseException) -> RuntimeError | None:
    """For torch's refusal of an ``autograd.Function`` under torch.func transforms: the error naming the
    innermost module whose forward was running, and what works instead (None for other errors)."""
    if "setup_context" not in str(error):
        return None
    module: nn.Module | None = None
    tb: types.TracebackType | None = error.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and tb.tb_frame.f_code.co_name in ("forward", "_call_impl"):
            module = candidate
        tb = tb.tb_next
    where = f"module {qualified(type(module))}" if module is not None else "a module of the model"
    return RuntimeError(
        f"{where} computes through an autograd.Function without setup_context, which torch.func.vmap cannot "
        f"run (torch: {str(error).splitlines()[0]}). Evaluate the coefficients without vmap, as a coefficient "
        f"batch in one forward: with funcadapt.AdapterModifier(model, 'scale', funcadapt.per_row(coeffs, "
        f"repeat=len(batch['input_ids']))): out = model(**funcadapt.tile(batch, len(coeffs))); or one "
        f"AdapterModifier pass per coefficient; funcadapt.sweep(model, metric, coeffs, batch) picks for you"
    )
