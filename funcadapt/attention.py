"""Scaled dot-product attention with the vmapped coefficient axis folded into the batch.

torch has no batching rule for its CPU flash-attention kernel, so under ``torch.func.vmap`` every
SDPA call (forward and backward) runs once per coefficient and stacks the results, and prints a
"performance drop" warning; measured on the CPU that costs 25–30 % of each attention's forward and
backward. While a call runs under vmap, transformers' attention registry (``AttentionInterface``)
maps ``"sdpa"`` to :func:`folded_sdpa`, which moves the vmapped axis of the query, key, value and
mask into the batch axis, runs transformers' own ``sdpa_attention_forward`` once on the folded
batch, and splits the output again. Row ``v·B + b`` of the folded batch is member ``v``'s row ``b``,
so each member computes exactly what it computes alone; called with no tensor batched at the
current vmap level (any other model, any other thread) it *is* ``sdpa_attention_forward``. The
implementation's name stays ``"sdpa"``, so models that test for it in their own code (sparse
attention, KV sharing) keep their branches. Only transformers' own SDPA entry is replaced, never one
a user registered; with attention dropout in training the fold is skipped (torch's own loop keeps
vmap's ``randomness`` setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .rules.base import Patch

_functorch = torch._C._functorch


def folded_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """transformers' ``sdpa_attention_forward`` with the current vmap level's axis folded into the batch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    level = _functorch.maybe_current_level()
    size = _vmapped_size((query, key, value, attention_mask), level)
    if size is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    assert level is not None
    batch = query.shape[0]
    q, k, v = (_fold(t, level, size, batch) for t in (query, key, value))
    mask = None if attention_mask is None else _fold(attention_mask, level, size, batch)
    out, weights = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, **kwargs)
    return _functorch._add_batch_dim(out.reshape(size, batch, *out.shape[1:]), 0, level), weights


def _vmapped_size(tensors: Iterable[Tensor | None], level: int | None) -> int | None:
    """The size of the vmap axis at ``level`` of the first tensor batched there (None: none is)."""
    if level is None:
        return None
    for t in tensors:
        if t is not None and _functorch.is_batchedtensor(t) and _functorch.maybe_get_level(t) == level:
            physical, dim = _functorch._unwrap_batched(t, level)
            if dim is not None:
                return int(physical.shape[dim])
    return None


def _fold(t: Tensor, level: int, size: int, batch: int) -> Tensor:
    """``t`` (logical shape ``[b, ...]``, b = batch or 1) as ``[size·batch, ...]``: member v's row r at
    ``v·batch + r``; a tensor not batched at ``level`` is shared by every member."""
    physical, dim = _functorch._unwrap_batched(t, level)
    physical = physical.unsqueeze(0).expand(size, *physical.shape) if dim is None else physical.movedim(dim, 0)
    if physical.shape[1] != batch:  # a mask broadcast over the batch
        physical = physical.expand(size, batch, *physical.shape[2:])
    return physical.reshape(size * batch, *physical.shape[2:])


def folding_patches() -> list[Patch]:
    """A patch mapping ``"sdpa"`` in transformers' attention registry to :func:`folded_sdpa` while a
    frame is applied, where it maps to transformers' own function (none where it does not: a user's
    own registration is kept, and transformers without the registry gets nothing). Several frames at
    once, in any threads, are fine: each restores only its own entry, and every one of them is the
    same function, exact for every caller."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    mapping = AttentionInterface._global_mapping

    def folded(current: Callable[..., Any]) -> Callable[..., Any]:
        return folded_sdpa if current is sdpa_attention_forward else current

    if mapping.get("sdpa") not in (sdpa_attention_forward, folded_sdpa):
        return []
    return [Patch(mapping, "sdpa", folded, item=True)]
