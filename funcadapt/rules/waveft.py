"""WaveFT: ΔW = s·IDWT2(S) (or s·S with ``use_idwt=False``), S a dense coefficient matrix
holding the trained wavelet coefficients at fixed random positions (centred in a padded
grid, the reconstruction cropped back to the layer's shape). Scattering, the inverse
wavelet transform (transposed convolutions with fixed filters) and the crop are all
linear, so coefficients ↦ c·coefficients gives ΔW(c) = c·ΔW exactly (additive:
geometric = linear, inverse −ΔW).

PEFT writes the coefficients into a fresh zero matrix in place, which ``vmap`` refuses
for batched coefficients; under torch.func transforms ``get_delta_weight`` is swapped for
the same computation with an out-of-place ``index_put`` (outside transforms PEFT's own
code runs).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
from peft.tuners.waveft.layer import WaveFTLayer
from peft.tuners.waveft.waverec2d import WaveletDetailTuple2d, waverec2d
from torch import Tensor

from .base import additive_rule, register, swapping


def delta_weight(layer: Any, adapter: str) -> Tensor:
    """PEFT's ``WaveFTLayer.get_delta_weight`` with the scatter out of place (vmap-safe)."""
    spectrum = layer.waveft_spectrum[adapter]
    indices = layer.waveft_indices[adapter].to(spectrum.device)
    out_f, in_f = layer.out_features, layer.in_features
    scale = layer.waveft_scaling[adapter]
    if not layer.waveft_use_idwt[adapter]:
        dense = torch.zeros(out_f, in_f, device=spectrum.device, dtype=spectrum.dtype)
        return dense.index_put((indices[0], indices[1]), spectrum) * scale

    family = layer.waveft_wavelet_family[adapter]
    extra_rows, extra_cols = WAVELET_REDUCTIONS[family]
    rows, cols = out_f + extra_rows, in_f + extra_cols
    rows, cols = rows + rows % 2, cols + cols % 2
    row_idx = indices[0] + (rows - out_f) // 2
    col_idx = indices[1] + (cols - in_f) // 2
    keep = ((row_idx < rows) & (col_idx < cols)).nonzero().squeeze(1)  # from fixed indices only
    dense = torch.zeros(rows, cols, device=spectrum.device, dtype=spectrum.dtype)
    dense = dense.index_put((row_idx[keep], col_idx[keep]), spectrum.index_select(0, keep))
    h, w = rows // 2, cols // 2
    bands = (dense[:h, :w], WaveletDetailTuple2d(dense[:h, w:], dense[h:, :w], dense[h:, w:]))
    delta = waverec2d(bands, family) * scale
    if delta.shape != (out_f, in_f):
        top, left = (delta.shape[0] - out_f) // 2, (delta.shape[1] - in_f) // 2
        delta = delta[top : top + out_f, left : left + in_f]
    return delta


WAVEFT = register(
    additive_rule(
        name="waveft",
        layer_type=WaveFTLayer,
        roles=("waveft_spectrum",),
        adapter="WaveFT",
        layers="Linear, Conv1D",
        linear="ΔW(c) = c·ΔW: coefficients ↦ c·coefficients in ΔW = s·IDWT2(S)",
        patches=swapping("get_delta_weight", delta_weight),
    )
)
