"""Quantized base layers: bitsandbytes 4-bit and 8-bit, under ``torch.func`` transforms.

bitsandbytes' ``MatMul4Bit`` / ``MatMul8bitLt`` are ``autograd.Function``s without
``setup_context``, so ``vmap`` (and ``grad``) refuse them, and its 4-bit inference kernel
has no batching rule. The quantized weight never depends on the coefficient, so a
vmapped input can be folded into the batch dimension around the layer: one call of
the real kernel on ``(B·N, ...)`` rows, exactly the same arithmetic per row, and the
result unfolded. :class:`FoldBatch` does that as an ``autograd.Function`` with a
``vmap`` rule; its backward is bitsandbytes' own (the layer runs under autograd inside
the forward and its graph is kept for the backward), so gradients are bitsandbytes'
and nothing is ever dequantized and kept.

Other quantization backends (GPTQ, AWQ, HQQ, torchao, ...) are refused by
:func:`check_supported` with the layer and the backend named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .rules.base import Patch, under_transforms

try:  # bitsandbytes is optional
    import bitsandbytes as bnb

    BNB_LINEARS: tuple[type, ...] = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
except ImportError:  # pragma: no cover - exercised only without the extra
    BNB_LINEARS = ()


class _Graph:
    """One FoldBatch call's (input, output) graph, handed from forward to setup_context. Not a
    list or tuple: torch.func rebuilds containers among a Function's arguments (pytree), so an
    append inside forward would land in a copy."""

    graph: tuple[Tensor, Tensor] | None = None


class FoldBatch(torch.autograd.Function):
    """``fn(x)`` for a per-row function ``fn``; under vmap, the vmapped dim is folded into dim 0."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, fn: Callable[[Tensor], Tensor], inner: _Graph) -> Tensor:
        # Always record fn's graph: under torch.func.grad, x arrives unwrapped, without
        # requires_grad, and a backward may still come (the graph is freed with the output).
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            y = fn(x_in)
        out = y.detach()
        # The backward needs y's graph, not its values: drop y's reference to the output's
        # storage (a zero-stride stand-in of the same shape), so only the returned tensor
        # keeps it alive, exactly as long as plain PEFT would.
        y.data = y.new_zeros(()).expand(y.shape)
        inner.graph = (x_in, y)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.inner = inputs[2].graph

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        x_in, y = ctx.inner
        if grad.shape != y.shape:
            raise RuntimeError(
                f"a bitsandbytes layer got a gradient of shape {tuple(grad.shape)} for an output of shape "
                f"{tuple(y.shape)}: torch.func.vmap over torch.func.grad cannot run through bitsandbytes layers "
                f"(their kernels have no batching rule, so funcadapt folds the vmapped axis into the batch, which "
                f"the per-member backward does not see). Put the vmap inside the grad (grad of a summed vmapped "
                f"loss), or take gradients with torch.autograd"
            )
        (grad_x,) = torch.autograd.grad(y, x_in, grad, allow_unused=True)
        if grad_x is None:
            raise RuntimeError(
                "a bitsandbytes layer computed its output without a gradient with respect to its input (on CPUs "
                "with AVX512-BF16, bitsandbytes' 4-bit layers in eval mode run a packed inference kernel that has "
                "none), so the gradient of everything before it would be lost. Put the bitsandbytes layers in "
                "train mode (model.train(), or .train() on each bnb.nn.Linear4bit) for a backward through them"
            )
        return grad_x, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, fn: Callable[[Tensor], Tensor], inner: _Graph) -> tuple[Tensor, Any]:
        if in_dims[0] is None:
            return FoldBatch.apply(x, fn, inner), None
        x = x.movedim(in_dims[0], 0)
        n, rows = x.shape[0], x.shape[1]
        y = FoldBatch.apply(x.reshape(n * rows, *x.shape[2:]), fn, inner)
        return y.reshape(n, rows, *y.shape[1:]), 0


def kind(module: nn.Module) -> str | None:
    """``"int8"``, ``"4bit"`` or None for a (base) layer."""
    if BNB_LINEARS and isinstance(module, BNB_LINEARS[1]):
        return "int8"
    if BNB_LINEARS and isinstance(module, BNB_LINEARS[0]):
        return "4bit"
    return None


def fold_batch(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return FoldBatch.apply(x, fn, _Graph())


def _folding(layer: nn.Module) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Wrap the layer's current forward (PEFT's, or an accelerate hook's) with the fold."""

    def wrap(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def folded(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not under_transforms():
                return forward(x, *args, **kwargs)
            if any(p.requires_grad for p in layer.parameters(recurse=False)):
                raise ValueError(
                    f"a trainable parameter inside quantized layer {type(layer).__name__} cannot be differentiated "
                    f"under torch.func transforms; freeze it (requires_grad_(False)) or call without vmap"
                )
            return fold_batch(lambda t: forward(t, *args, **kwargs), x)

        return folded

    return wrap


def patches(linears: Iterable[nn.Module]) -> list[Patch]:
    """Forward swaps for the given bitsandbytes linears (all of a model's, adapted or not)."""
    return [Patch(m, "forward", _folding(m), wrap=True) for m in linears]


_UNSUPPORTED = {
    "auto_gptq": "GPTQ (auto-gptq)",
    "gptqmodel": "GPTQ (gptqmodel)",
    "awq": "AWQ (autoawq)",
    "hqq": "HQQ",
    "torchao": "torchao",
    "optimum": "optimum quantization",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "compressed_tensors": "compressed-tensors",
    "fp_quant": "FP-Quant",
    "awq_ext": "AWQ",
}


def backend_of(module: nn.Module) -> str | None:
    """The name of a quantization backend funcadapt does not handle, if ``module`` (or its weight) is one."""
    candidates: list[type] = [type(module)]
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        candidates.append(type(weight))
    for cls in candidates:
        root = cls.__module__.split(".")[0]
        if root in _UNSUPPORTED:
            return _UNSUPPORTED[root]
        if root == "peft" and any(
            part in cls.__module__.split(".") for part in ("gptq", "awq", "hqq", "torchao", "aqlm", "eetq")
        ):
            return cls.__module__.split(".")[-1].upper()
    return None


def base_of(layer: Any) -> nn.Module:
    """The (innermost) base layer an adapter layer wraps; the layer itself otherwise."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def check_supported(path: str, layer: Any) -> None:
    base = base_of(layer)
    for module in (layer, base):
        backend = backend_of(module)
        if backend is not None:
            raise ValueError(
                f"layer {path!r} has a {backend} quantized base layer ({type(base).__module__}."
                f"{type(base).__name__}), which funcadapt does not support yet (supported: bitsandbytes 4-bit "
                f"and 8-bit, unquantized). Load the base model with bitsandbytes or in full/half precision"
            )
