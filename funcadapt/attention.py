"""Scaled dot-product attention with the vmapped coefficient axis folded into the batch.

torch has no batching rule for its CPU flash-attention kernel, so under ``torch.func.vmap`` every
SDPA call (forward and backward) runs once per coefficient and stacks the results, and prints a
"performance drop" warning; measured on the CPU that costs 25–30 % of each attention's forward and
backward. While a call runs under vmap, ``torch.nn.functional.scaled_dot_product_attention`` is
:func:`folded_sdpa`, which moves the vmapped axis of the query, key, value and mask into the batch
axis (the first: SDPA's inputs are ``[..., L, E]`` with the same leading axes), runs torch's own
SDPA once on the folded batch, and splits the output again. Row ``v·B + b`` of the folded batch is
member ``v``'s row ``b``, so each member computes exactly what it computes alone. Every caller that
looks the function up on ``torch.nn.functional`` when it runs gets it: transformers' ``"sdpa"``
attention, diffusers' attention processors and its native attention backend, a model's own code.
Called with no tensor batched at the current vmap level (any other model, any other thread) it *is*
torch's function. With attention dropout the fold is skipped (torch's own loop keeps vmap's
``randomness`` setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules.base import Patch

_functorch = torch._C._functorch
_SDPA = torch._C._nn.scaled_dot_product_attention
"""torch's own function (what ``F.scaled_dot_product_attention`` is unless something replaced it)."""


def folded_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> Tensor:
    """torch's ``scaled_dot_product_attention`` with the current vmap level's axis folded into the batch."""
    level = _functorch.maybe_current_level()
    inputs = (query, key, value, attn_mask)
    size = _vmapped_size(inputs, level)
    batch = _common_batch(inputs) if size is not None and not dropout_p else None
    if batch is None:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
    assert level is not None and size is not None
    rank = query.dim()
    q, k, v = (_fold(t, level, size, batch, rank) for t in (query, key, value))
    mask = attn_mask
    if attn_mask is not None and (attn_mask.dim() == rank or _batched_at(attn_mask, level)):
        mask = _fold(attn_mask, level, size, batch, rank)  # (a shared mask with fewer axes broadcasts)
    out = _SDPA(q, k, v, mask, dropout_p, is_causal, **kwargs)
    return _functorch._add_batch_dim(out.reshape(size, batch, *out.shape[1:]), 0, level)


def _common_batch(inputs: Iterable[Tensor | None]) -> int | None:
    """The batch the inputs share on the query's first axis, each given the query's number of axes (leading
    ones added, as SDPA broadcasts them): every size there 1 or that batch. None where they do not line up
    that way (a key or value with more axes than the query, a query without a batch axis): torch's loop."""
    query, *rest = (t for t in inputs if t is not None)
    rank = query.dim()
    if rank < 3 or any(t.dim() > rank for t in rest):
        return None
    sizes = {int(t.shape[0]) if t.dim() == rank else 1 for t in (query, *rest)}
    sizes.discard(1)
    return sizes.pop() if len(sizes) == 1 else 1 if not sizes else None


def _batched_at(t: Tensor, level: int | None) -> bool:
    return level is not None and _functorch.is_batchedtensor(t) and _functorch.maybe_get_level(t) == level


def _vmapped_size(tensors: Iterable[Tensor | None], level: int | None) -> int | None:
    """The size of the vmap axis at ``level`` of the first tensor batched there (None: none is)."""
    if level is None:
        return None
    for t in tensors:
        if t is not None and _batched_at(t, level):
            physical, dim = _functorch._unwrap_batched(t, level)
            if dim is not None:
                return int(physical.shape[dim])
    return None


def _fold(t: Tensor, level: int, size: int, batch: int, rank: int) -> Tensor:
    """``t`` as ``[size·batch, ...]`` with ``rank`` axes: member v's row r at ``v·batch + r``; first given
    ``rank`` logical axes (leading ones added) and its first axis (1 or ``batch``) expanded to ``batch``. A
    tensor not batched at ``level`` is shared by every member."""
    physical, dim = _functorch._unwrap_batched(t, level)
    physical = physical.unsqueeze(0).expand(size, *physical.shape) if dim is None else physical.movedim(dim, 0)
    if physical.dim() - 1 < rank:
        physical = physical.reshape(size, *([1] * (rank - physical.dim() + 1)), *physical.shape[1:])
    if physical.shape[1] != batch:  # (1: broadcast over the batch)
        physical = physical.expand(size, batch, *physical.shape[2:])
    return physical.reshape(size * batch, *physical.shape[2:])


def folding_patches() -> list[Patch]:
    """A patch making ``torch.nn.functional.scaled_dot_product_attention`` :func:`folded_sdpa` while a frame
    is applied, where it is torch's own (none where it is not: another library's replacement is kept).
    Several frames at once, in any threads, are fine: each restores the entry only if it is still
    :func:`folded_sdpa`, and that is the same function, exact for every caller."""
    namespace = vars(F)

    def folded(current: Callable[..., Any]) -> Callable[..., Any]:
        return folded_sdpa if current is _SDPA else current

    if namespace.get("scaled_dot_product_attention") not in (_SDPA, folded_sdpa):
        return []
    return [Patch(namespace, "scaled_dot_product_attention", folded, item=True)]
