"""Scaled dot-product attention with the vmapped coefficient axis folded into the batch.

torch has no batching rule for its CPU flash-attention kernel, so under ``torch.func.vmap`` every
SDPA call (forward and backward) runs once per coefficient and stacks the results, and prints a
"performance drop" warning; measured on the CPU that costs 25–30 % of each attention's forward and
backward. While a call runs under vmap, funcadapt switches the model's transformers configs that
use ``"sdpa"`` to :data:`FOLDED`, an attention function registered with transformers'
``AttentionInterface`` (adding a name, changing none; its masks are SDPA's, registered with
``AttentionMaskInterface`` under the same name), which moves the vmapped axis of the query,
key, value and mask into the batch axis, runs transformers' own ``sdpa_attention_forward`` once on
the folded batch, and splits the output again. Row ``v·B + b`` of the folded batch is member ``v``'s
row ``b``, so each member computes exactly what it computes alone. With attention dropout in
training the fold is skipped (torch's own loop keeps vmap's ``randomness`` setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .rules.base import Patch

FOLDED = "funcadapt_folded_sdpa"
_functorch = torch._C._functorch
_registered = False


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
    tensors = (query, key, value, attention_mask)
    size = _vmapped_size(tensors, level)
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


def folding_patches(modules: Iterable[nn.Module]) -> list[Patch]:
    """Patches switching the config of every transformers model among ``modules`` that dispatches its
    attention through ``AttentionInterface`` (``_supports_attention_backend``) and uses ``"sdpa"`` to
    :data:`FOLDED` while a frame is applied. Models that test for ``"sdpa"`` in their own code (Falcon,
    Bloom) keep theirs, and so does a config one of them shares."""
    configs = _sdpa_configs(modules)
    if not configs or not _register():
        return []
    return [Patch(config, "_attn_implementation_internal", FOLDED) for config in configs]


def _register() -> bool:
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    # the mask is built by the function registered under the same name: SDPA's
    sdpa_mask = cast(Callable[..., Any], AttentionMaskInterface._global_mapping["sdpa"])
    AttentionMaskInterface.register(FOLDED, sdpa_mask)
    AttentionInterface.register(FOLDED, folded_sdpa)
    _registered = True
    return True


def _sdpa_configs(modules: Iterable[nn.Module]) -> list[Any]:
    dispatching: dict[int, Any] = {}
    own_code: set[int] = set()
    for m in modules:
        flag = getattr(type(m), "_supports_attention_backend", None)
        config = getattr(m, "config", None) if flag is not None else None
        if config is None or not hasattr(config, "_attn_implementation_internal"):
            continue
        if flag:
            dispatching[id(config)] = config
        else:
            own_code.add(id(config))
    return [c for k, c in dispatching.items() if k not in own_code and c._attn_implementation_internal == "sdpa"]
