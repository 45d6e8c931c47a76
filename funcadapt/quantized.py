"""Quantized base layers: bitsandbytes 4-bit and 8-bit, under ``torch.func`` transforms.

bitsandbytes' ``MatMul4Bit`` / ``MatMul8bitLt`` are ``autograd.Function``s without
``setup_context``, so ``vmap`` (and ``grad``) refuse them, and its kernels have no batching
rule. The quantized weight never depends on the coefficient, so :class:`FoldBatch` (an
``autograd.Function`` with a ``vmap`` rule) runs the real kernel on plain tensors: the
vmapped axis folded into the batch (one call on ``(N·B, ...)`` rows, the same arithmetic per
row), or one call per vmapped member where a row's result depends on the other rows of the
call or might (:func:`one_call_per_member`): then each member's kernel call is exactly the
call a loop over the members makes. Its backward is bitsandbytes' own (the layer runs under
autograd inside the forward and its graph is kept for the backward), so gradients are
bitsandbytes' and nothing is ever dequantized and kept.

LLM.int8 in inference picks its fp16 outlier columns over all rows of a call, so a row's
output depends on which rows share the call. With per-row coefficients, every 8-bit layer
runs each run of rows that share a coefficient as a call of its own (:func:`_by_runs`): a
coefficient batch equals one call per coefficient, as it does on other layers.

bitsandbytes picks its kernel from the call: on a CPU with AVX512-BF16, a 4-bit layer in eval
mode whose input does not require grad converts its weight, for good, to a packed layout that
a bfloat16 inference kernel reads (rounding its absmax to bfloat16), and that kernel has no
gradient with respect to its input. Three rules keep every path exact around it:

* the fold shows the layer an input that requires grad exactly when the unbatched call's input
  would (:func:`tracks_grad`), so a vmapped call picks the kernel a loop picks;
* inside a call with gradients enabled, a layer not yet converted is not converted: it runs its
  float kernel, as a training step does (funcadapt's own extra forwards, such as the switched-off
  pass of an output interpolation, would otherwise convert layers that a plain step never does);
* a converted layer reached by an input that requires grad is refused (:func:`check_packed`):
  bitsandbytes would drop that gradient with a warning only.

Other quantization backends (GPTQ, AWQ, HQQ, torchao, ...) are refused by
:func:`check_supported` with the layer and the backend named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .rows import runs
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
    """``fn(x)`` for a kernel ``fn`` without a batching rule. Under vmap, the vmapped dim is folded
    into dim 0 (one kernel call on every member's rows) or, with ``separate``, the kernel runs once
    per member, on exactly the rows a loop over the members would give it: for kernels whose rows
    are coupled (LLM.int8 picks its fp16 outlier columns over all rows of a call).

    ``needs_grad``: whether the caller's ``x`` requires grad at any transform level (under
    torch.func.grad, x arrives here unwrapped, without requires_grad, and a backward may still
    come); ``fn`` sees an input that requires grad exactly then, and its graph is recorded."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, fn: Callable[[Tensor], Tensor], inner: _Graph, needs_grad: bool, separate: bool) -> Tensor:
        if not needs_grad:
            with torch.no_grad():
                return fn(x.detach())
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
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if ctx.inner is None:  # fn ran without a graph: nothing before it required grad
            return None, None, None, None, None
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
        return grad_x, None, None, None, None

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        x: Tensor,
        fn: Callable[[Tensor], Tensor],
        inner: _Graph,
        needs_grad: bool,
        separate: bool,
    ) -> tuple[Tensor, Any]:
        if in_dims[0] is None:
            return FoldBatch.apply(x, fn, inner, needs_grad, separate), None
        x = x.movedim(in_dims[0], 0)
        if separate:
            return torch.stack([FoldBatch.apply(m, fn, _Graph(), needs_grad, separate) for m in x.unbind(0)]), 0
        n, rows = x.shape[0], x.shape[1]
        y = FoldBatch.apply(x.reshape(n * rows, *x.shape[2:]), fn, inner, needs_grad, separate)
        return y.reshape(n, rows, *y.shape[1:]), 0


def kind(module: nn.Module) -> str | None:
    """``"int8"``, ``"4bit"`` or None for a (base) layer."""
    if BNB_LINEARS and isinstance(module, BNB_LINEARS[1]):
        return "int8"
    if BNB_LINEARS and isinstance(module, BNB_LINEARS[0]):
        return "4bit"
    return None


def fold_batch(fn: Callable[[Tensor], Tensor], x: Tensor, separate: bool = False) -> Tensor:
    """``fn(x)`` through :class:`FoldBatch` (``separate``: one kernel call per vmapped member)."""
    return FoldBatch.apply(x, fn, _Graph(), tracks_grad(x), separate)


def tracks_grad(x: Tensor) -> bool:
    """Whether ``x`` requires grad at any level: itself, or a tensor that a torch.func wrapper
    (vmap's batched tensor, grad's tracking tensor) wraps. A batched tensor reports False
    even where the tensor it wraps is part of an autograd graph."""
    unwrap = torch._C._functorch.get_unwrapped
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    t = x
    while True:
        if t.requires_grad:
            return True
        if not wrapped(t):
            return False
        t = unwrap(t)


def packed_for_cpu(layer: nn.Module) -> bool:
    """A 4-bit layer whose weight bitsandbytes converted to its CPU inference layout."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def check_packed(path: str, layer: nn.Module, x: Tensor) -> None:
    """Refuse a forward that would lose the gradient with respect to ``x`` in bitsandbytes'
    packed CPU kernel (see the module docstring)."""
    if torch.is_grad_enabled() and packed_for_cpu(layer) and tracks_grad(x):
        raise RuntimeError(
            f"bitsandbytes 4-bit layer {path!r} runs bitsandbytes' packed CPU inference kernel, which has no "
            f"gradient with respect to its input, on an input that requires grad: every gradient from before this "
            f"layer would be lost (bitsandbytes only warns). bitsandbytes converted the layer to that kernel, for "
            f"good, in an earlier eval-mode forward without gradients (on CPUs with AVX512-BF16). Load the model "
            f"again and, before any forward without gradients (generate, evaluation), put its 4-bit layers in train "
            f"mode, which changes nothing else about them: "
            f"[m.train() for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]"
        )


def would_convert(layer: nn.Module, x: Tensor) -> bool:
    """Whether this call may convert a 4-bit layer to bitsandbytes' packed CPU inference kernel
    (eval mode, CPU input that does not require grad, not converted yet)."""
    return (
        kind(layer) == "4bit"
        and not layer.training
        and x.device.type == "cpu"
        and not packed_for_cpu(layer)
        and not tracks_grad(x)
    )


def _in_train_mode(layer: nn.Module, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``forward`` with the layer in train mode while it runs (a 4-bit layer's only use of the flag is
    choosing whether to convert itself to the packed kernel)."""

    def run(*args: Any, **kwargs: Any) -> Tensor:
        layer.training = True
        try:
            return forward(*args, **kwargs)
        finally:
            layer.training = False

    return run


def rows_coupled(layer: nn.Module, x: Tensor) -> bool:
    """Whether one row's output depends on the other rows of the call: LLM.int8 (outlier
    ``threshold`` > 0) picks its fp16 outlier columns over all rows, except in train mode on the
    CPU and XPU, where bitsandbytes runs a dequantising kernel instead (on CUDA train mode too
    runs the outlier kernel)."""
    if kind(layer) != "int8" or float(getattr(getattr(layer, "state", None), "threshold", 0.0) or 0.0) <= 0:
        return False
    return not (layer.training and x.device.type in ("cpu", "xpu"))


def one_call_per_member(layer: nn.Module, x: Tensor) -> bool:
    """Whether a vmapped call runs the kernel once per member instead of once on the folded rows:
    where rows are coupled (:func:`rows_coupled`), and for 4-bit layers in eval mode on the CPU,
    which bitsandbytes may route to its bfloat16 inference kernel, whose rounding is only known to
    be independent of the number of rows, not guaranteed (one call per member is what a loop runs,
    and costs that kernel nothing extra: it reads the packed weight, it does not dequantize it)."""
    if rows_coupled(layer, x):
        return True
    return kind(layer) == "4bit" and not layer.training and x.device.type == "cpu"


class Runs:
    """The lengths of the runs of rows that share their per-row coefficients (:func:`funcadapt.rows.runs`),
    computed when a row-coupled layer first needs them: one read of the coefficients, none otherwise."""

    def __init__(self, columns: Sequence[Tensor]) -> None:
        self.columns = columns
        self._value: tuple[int, ...] | None = None

    def value(self, path: str) -> tuple[int, ...]:
        if self._value is None:
            if any(torch._C._functorch.is_functorch_wrapped_tensor(c) for c in self.columns):
                raise ValueError(
                    f"bitsandbytes 8-bit layer {path!r} runs under torch.func transforms with per-row coefficients "
                    f"that are themselves transformed (vmapped): LLM.int8 couples the rows of a call, and funcadapt "
                    f"splits them by their coefficients, which it cannot read here. vmap over plain coefficients "
                    f"instead (funcadapt.vmap(f)(torch.tensor([...]))), or run the per-row batch without vmap"
                )
            self._value = runs(self.columns)
        return self._value


def _by_runs(
    path: str,
    forward: Callable[..., Tensor],
    x: Tensor,
    runs: tuple[int, ...],
    batch_major: bool,
    args: tuple,
    kwargs: dict,
) -> Tensor:
    """``forward`` run on each run of rows that share their coefficients alone (``runs``: their lengths,
    in rows of the batch; a layer its model runs on the batch flattened batch-major sees a multiple of
    each), as one call per coefficient would run it."""
    n, total = (x.shape[0] if x.dim() else 0), sum(runs)
    if n != total and not (batch_major and n and n % total == 0):
        raise ValueError(
            f"bitsandbytes 8-bit layer {path!r} got {n} rows with {total} per-row coefficients: LLM.int8 picks its "
            f"outlier columns over all rows of a call, so the rows of each coefficient must run alone for the "
            f"batch to equal one call per coefficient, and which of these {n} rows belong to which batch row is "
            f"not known (the model routes or reshapes tokens before this layer). Run one call per coefficient, or "
            f"funcadapt.vmap over the coefficients, which runs this kernel on each coefficient's batch alone"
        )
    scale = n // total
    return torch.cat([forward(block, *args, **kwargs) for block in x.split([r * scale for r in runs])])


def _folding(
    path: str, layer: nn.Module, runs: Runs | None, batch_major: bool
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Wrap the layer's current forward (PEFT's, or an accelerate hook's): refuse a packed kernel that
    would drop a gradient; with per-row coefficients (``runs``), run a row-coupled kernel on each run
    of rows sharing a coefficient alone; under torch.func transforms, fold the vmapped axis (see
    :class:`FoldBatch`)."""

    def wrap(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def folded(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            check_packed(path, layer, x)
            split = runs is not None and rows_coupled(layer, x)
            kernel = _in_train_mode(layer, forward) if torch.is_grad_enabled() and would_convert(layer, x) else forward

            def run(t: Tensor) -> Tensor:
                if split and runs is not None and len(lengths := runs.value(path)) > 1:
                    return _by_runs(path, kernel, t, lengths, batch_major, args, kwargs)
                return kernel(t, *args, **kwargs)

            if not under_transforms():
                return run(x)
            if any(p.requires_grad for p in layer.parameters(recurse=False)):
                raise ValueError(
                    f"a trainable parameter inside quantized layer {type(layer).__name__} cannot be differentiated "
                    f"under torch.func transforms; freeze it (requires_grad_(False)) or call without vmap"
                )
            return fold_batch(run, x, separate=one_call_per_member(layer, x))

        return folded

    return wrap


def patches(linears: Iterable[tuple[str, nn.Module, bool]], columns: Sequence[Tensor] = ()) -> list[Patch]:
    """Forward swaps for the given bitsandbytes linears, (path, module, whether its model runs it on
    the batch flattened batch-major) (all of a model's, adapted or not); ``columns``: the call's
    per-row coefficient vectors, if any. Installed outside an accelerate hook on the layer, so that
    a refusal comes before the hook loads anything."""
    shared = Runs(columns) if columns else None
    return [
        Patch(m, "forward", _folding(path, m, shared, batch_major), wrap=True, outside_hooks=True)
        for path, m, batch_major in linears
    ]


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
