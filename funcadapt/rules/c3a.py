"""C3A: ΔW = C(k) / d_in, a block-circulant matrix built from the trained kernel k by FFTs
(each block is the circular convolution with one length-b kernel vector).

C(k) is linear in k, so k ↦ c·k gives ΔW(c) = c·ΔW exactly; with one C3A adapter on a
layer geometric equals linear and the inverse is ΔW ↦ −ΔW. (With several chained on one
layer, geometric mode still scales each kernel, so the layer is no longer linear in c
there; linear mode interpolates the layer jointly.)

Several C3A adapters on one layer do not add up in PEFT: its forward feeds each adapter
the previous adapter's *output* (``x = conv(x, k) / d``), so two adapters give
W·x + Δ₁x + Δ₂Δ₁x. The rule is therefore not ``additive`` (one coefficient for several
C3A adapters on a layer uses the exact output interpolation of the layer) and not
``commutative`` (inverting such a layer is refused).

PEFT computes the convolution with ``BlockCircularConvolution``, an ``autograd.Function``
whose hand-written backward returns a wrong gradient for the layer *input* (the kernel's
is right; PEFT 0.21.2, see ``tests/test_rules_additive1.py``), so every gradient that
flows back through a C3A layer, to earlier adapters and to c, is wrong in PEFT. The
Function also lacks ``setup_context`` (torch.func transforms refuse it), and PEFT adds in
place (``result += ...``), which ``vmap`` refuses for a batched update. While a call runs,
the layer's forward is therefore swapped for :func:`c3a_forward`: the same operations in
plain differentiable ops, out of place. Its values are bit-identical to PEFT's; its
gradients are the exact ones (autograd through the FFTs), so funcadapt's gradients for
C3A models differ from what PEFT's own backward gives. PEFT computes the convolution in
float32 whatever the kernel's dtype, and so does this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.c3a.layer import C3ALayer
from torch import Tensor

from ..ops import RuleOp
from .base import Patch, Rule, RuleDoc, register, scaling

_linear = scaling("c3a_kernel")


def circular_convolution(x: Tensor, kernel: Tensor) -> Tensor:
    """``BlockCircularConvolution.forward`` in plain differentiable ops: kernel (m, n, b),
    x (..., n·b) -> (..., m·b)."""
    _, n, b = kernel.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    mixed = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(blocks), torch.fft.fft(kernel))
    y = torch.fft.fft(mixed).real
    return y.reshape(*y.shape[:-2], -1)


def c3a_forward(layer: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's ``C3ALinear.forward``, out of place and without the custom autograd.Function
    (same values, exact gradients). Like PEFT, each adapter acts on the previous adapter's
    output (see the module docstring)."""
    if layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    x = x.to(torch.float32)
    for adapter in layer.active_adapters:
        if adapter not in layer.c3a_kernel:
            continue
        kernel = layer.c3a_kernel[adapter].to(torch.float32)
        x = circular_convolution(x, kernel) / x.size(-1)
        result = result + x.to(result.dtype)
    return result.to(previous_dtype)


_INSTALLED = "_funcadapt_c3a_forward"


def _patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
    """PEFT's forward is replaced once, at the bottom of the layer's forward chain: wrappers
    that enclosing calls installed above it (output interpolation) stay in place, and
    :func:`c3a_forward` reads the kernels live, so nested calls see their own."""

    def wrap(current: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if getattr(layer, _INSTALLED, False):  # an enclosing call or another adapter of this layer did it
            return current
        return lambda x, *a, **kw: c3a_forward(layer, x, *a, **kw)

    return [Patch(layer, "forward", wrap, wrap=True), Patch(layer, _INSTALLED, True)]


C3A = register(
    Rule(
        name="c3a",
        layer_type=C3ALayer,
        doc=RuleDoc(
            adapter="C3A (circular convolution)",
            layers="Linear",
            linear="ΔW(c) = c·ΔW: kernel ↦ c·kernel in ΔW = C(k)/d_in (exact gradients; PEFT's backward is wrong)",
            linear_exact="exact (parameter space)",
            geometric="kernel ↦ c·kernel (= linear with one C3A adapter per layer)",
            invert="exact: ΔW ↦ −ΔW (refused for several C3A adapters on one layer: PEFT chains them)",
        ),
        linear=_linear,
        geometric=_linear,
        patches=_patches,
        static=lambda layer, a: {"block_size": layer.block_size[a]},
    )
)
