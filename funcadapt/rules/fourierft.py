"""FourierFT: ΔW = s·Re(IFFT2(S)), S a dense spectrum holding the trained coefficients at
fixed frequencies. The inverse FFT is linear, so coefficients ↦ c·coefficients gives
ΔW(c) = c·ΔW exactly (additive: geometric = linear, inverse −ΔW).

PEFT scatters the coefficients into a fresh zero spectrum in place, which ``vmap``
refuses for batched coefficients; while a call runs ``get_delta_weight`` is swapped for
the same computation with an out-of-place ``index_put``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.fourierft.layer import FourierFTLayer
from torch import Tensor

from .base import additive_rule, register, swapping


def delta_weight(layer: Any, adapter: str) -> Tensor:
    """PEFT's ``FourierFTLayer.get_delta_weight``, out of place. PEFT computes in float32
    (the FFT has no half-precision kernels); a float64 spectrum stays float64 here."""
    spectrum = layer.fourierft_spectrum[adapter]
    indices = layer.indices[adapter].to(spectrum.device)
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    dense = torch.zeros(layer.out_features, layer.in_features, device=spectrum.device, dtype=dtype)
    dense = dense.index_put((indices[0, :], indices[1, :]), spectrum.to(dtype))
    return (torch.fft.ifft2(dense).real * layer.fourierft_scaling[adapter]).to(spectrum.dtype)


FOURIERFT = register(
    additive_rule(
        name="fourierft",
        layer_type=FourierFTLayer,
        roles=("fourierft_spectrum",),
        adapter="FourierFT",
        layers="Linear",
        linear="ΔW(c) = c·ΔW: spectrum ↦ c·spectrum in ΔW = s·Re IFFT2(S)",
        patches=swapping("get_delta_weight", delta_weight),
    )
)
