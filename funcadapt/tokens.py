"""Per-token coefficients: a coefficient for every position of every row.

:func:`per_token` marks a tensor of coefficients as *one per token*: ``values[b, t]`` is the
coefficient of row ``b`` at absolute position ``t`` (shape ``[B, L]``), or ``values[t]`` of every
row (shape ``[L]``). Given to :func:`funcadapt.transform`, :class:`funcadapt.AdapterModifier`
or :func:`funcadapt.call` with ``op="scale"`` and ``mode="linear"``, every adapted layer computes,
token by token,

    y[b, t] = y0[b, t] + c[b, t]·(y1[b, t] − y0[b, t])

with y0 the layer's output with the adapter switched off and y1 with it on: the per-layer
interpolation of linear mode (:func:`funcadapt.per_row`), one coefficient per token. A row whose
values are all equal is exactly that row under ``per_row`` (the same operations on the same
numbers, bit for bit).

**Positions are absolute.** A forward that processes T tokens after P tokens already in the KV
cache (the cache's ``get_seq_length()``, or the ``cache_position`` it is given) uses columns
``P … P+T−1``: one ``per_token`` value serves the prefill and every decoding step of
``generate()``. Left padding occupies positions like any token: with a left-padded batch of
prompts of padded length T₀, the first generated token of every row is at position T₀
(:func:`after_prompt` builds such values). A forward that reaches past the last column raises,
naming L and the position. The positions are read where the forward enters the model (the model
and, for a PEFT model, its base model, which ``generate()`` calls): running a submodule alone
with per-token coefficients raises.

Layers whose output is ``[B, T, …]`` take ``c[b, P + t]`` at ``[b, t]``; layers the model runs on
its batch flattened batch-major (``[B·T, …]``, OPT's fc1/fc2, :data:`funcadapt.rows.BATCH_MAJOR`)
take it at row ``b·T + t``. Any other layout is refused with the layer's name (convolutions, a
layer whose output has another first or second axis).

What a forward's first generated token depends on: the logits of position t predict the token at
t + 1, so the first generated token comes from the last prompt position. Values that are 0 on the
prompt and c from position T₀ on leave the first generated token to the base model (and let k
coefficients share one prefill, see docs/per-token.md); ``after_prompt(...,
steer_last_prompt_token=True)`` steers it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .entries import EntryRecorder


@dataclass(frozen=True, eq=False)
class PerToken:
    """One coefficient per token: ``values`` of shape ``[B, L]`` (row, absolute position) or ``[L]``
    (every row), with ``groups`` one vector per token (``[B, L, G]`` or ``[L, G]``). Build it with
    :func:`per_token`."""

    values: Tensor
    groups: Any = None

    @property
    def length(self) -> int:
        """L: the number of positions covered."""
        return int(self.values.shape[self.values.dim() - (1 if self.groups is None else 2)])

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.values.shape)
        return f"PerToken({shape}{', groups' if self.groups is not None else ''})"


def per_token(values: Tensor | Sequence[Any], repeat: int = 1, groups: Any = None) -> PerToken:
    """Coefficients per token: ``values[b, t]`` for row ``b`` at absolute position ``t`` (``[B, L]``),
    or ``values[t]`` for every row (``[L]``). ``values`` may require grad (token-level attribution:
    the gradient of a metric with respect to each position's coefficient).

    ``repeat``: each row repeated ``repeat`` times in a row, as ``generate()`` with ``num_beams=k``
    (or ``num_return_sequences=k``) runs k copies of each row (``[L]`` values need no repeat).
    With ``groups`` (a grouping as :func:`funcadapt.transform` takes it), every token has one
    coefficient per group: ``values`` of shape ``[B, L, G]`` or ``[L, G]``."""
    if isinstance(values, PerToken):
        groups = values.groups if groups is None else groups
        values = values.values
    tensor = values if isinstance(values, Tensor) else torch.tensor(values)
    extra = 0 if groups is None else 1
    if tensor.dim() not in (1 + extra, 2 + extra):
        what = "[B, L] or [L]" if groups is None else "[B, L, G] or [L, G] (one vector per token, G groups)"
        raise ValueError(f"per_token takes coefficients of shape {what}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int (copies of each row), got {repeat!r}")
    if repeat > 1 and tensor.dim() == 2 + extra:
        tensor = tensor.repeat_interleave(repeat, dim=0)
    return PerToken(tensor, groups)


def after_prompt(
    batch: Mapping[str, Any] | Tensor,
    max_new_tokens: int,
    coeff: float | Tensor,
    prompt_coeff: float | Tensor = 0.0,
    *,
    steer_last_prompt_token: bool = False,
) -> PerToken:
    """Per-token coefficients for ``generate(**batch, max_new_tokens=...)``: ``prompt_coeff`` on the
    prompt (padded to its length T₀, left padding included) and ``coeff`` on every generated token,
    positions T₀ … T₀ + max_new_tokens − 1 (``[L]`` values, L = T₀ + max_new_tokens, the same for
    every row: left padding puts each row's first generated token at T₀).

    The first generated token is predicted at the last prompt position (T₀ − 1), which is then at
    ``prompt_coeff``; ``steer_last_prompt_token=True`` gives that position ``coeff`` too, so that
    every generated token comes from the steered model (the KV cache of the prompt is then no
    longer the base model's at that position)."""
    ids = batch if isinstance(batch, Tensor) else batch.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(
            "after_prompt needs the prompt batch (a dict with 'input_ids' of shape [B, T], or that tensor), "
            f"got {type(ids).__name__ if not isinstance(ids, Tensor) else tuple(ids.shape)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompt = int(ids.shape[1])
    start = prompt - 1 if steer_last_prompt_token else prompt
    length = prompt + max_new_tokens
    on = torch.arange(length) >= start
    dtype = next((c.dtype for c in (coeff, prompt_coeff) if isinstance(c, Tensor)), torch.get_default_dtype())
    as_tensor = lambda c: c if isinstance(c, Tensor) else torch.tensor(float(c), dtype=dtype)  # noqa: E731
    return PerToken(torch.where(on, as_tensor(coeff), as_tensor(prompt_coeff)).to(dtype))


@dataclass(frozen=True)
class Span:
    """What one forward processes: ``length`` tokens from absolute position ``start`` in each of ``rows``
    rows; ``keep`` > 0: the output head sees only the last ``keep`` of them (``logits_to_keep``). Layers read
    the start as ``offset``, a 0-d int64 tensor (compiled, a tensor is an input of the graph, where a number
    would be a constant and each decoding step a graph of its own); ``start`` is None where it is known only
    as that tensor (compiled, from ``cache_position``)."""

    start: int | None
    length: int
    rows: int
    keep: int = 0
    offset: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.offset is None:
            object.__setattr__(self, "offset", torch.tensor(self.start or 0))  # (frozen)


class Positions(EntryRecorder[Span]):
    """The positions of the forward running now, recorded where it enters the model
    (:mod:`funcadapt.entries`)."""

    outside = (
        "per-token coefficients are placed by the positions the model's forward processes, read where the "
        "forward enters the model, and this layer ran without them: call the model (or its PEFT wrapper) "
        "itself, not one of its submodules"
    )

    def __init__(self, total: int | None = None) -> None:
        super().__init__()
        self.total = total

    def entering(self, forward: Any, wrapper: bool = False) -> Any:
        total = self.total

        def enter(args: tuple, kwargs: Mapping[str, Any]) -> Span | str:
            span = span_of(args, kwargs)
            if isinstance(span, str) or span.start is None or total is None:
                return span  # (a start known only as a tensor is checked in the layers)
            if span.start + span.length > total:
                return _past_the_values(total, f"positions {span.start}…{span.start + span.length - 1}")
            return span

        return enter


def _past_the_values(total: int, processed: str) -> str:
    return (
        f"the per-token coefficients cover positions 0…{total - 1} (L = {total}), but this forward processes "
        f"{processed}. Give values for every position the model will see: prompt length (with padding) plus "
        f"max_new_tokens for generate()"
    )


def span_of(args: tuple, kwargs: Mapping[str, Any]) -> Span | str:
    """The span a model forward processes, from its arguments: T from ``input_ids`` ([B, T]) or
    ``inputs_embeds`` ([B, T, H]), the start from ``cache_position`` or the KV cache's length (what
    transformers models compute their positions from). A string says why it cannot be known."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor):
        ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    if isinstance(ids, Tensor) and ids.dim() == 2:
        rows, length = int(ids.shape[0]), int(ids.shape[1])
    elif isinstance(embeds, Tensor) and embeds.dim() == 3:
        rows, length = int(embeds.shape[0]), int(embeds.shape[1])
    else:
        return (
            "per-token coefficients need the rows and tokens the forward processes: call the model with "
            "input_ids ([B, T]) or inputs_embeds ([B, T, H])"
        )
    cache_position = kwargs.get("cache_position")
    offset: Tensor | None = None
    start: int | None
    if isinstance(cache_position, Tensor) and cache_position.numel():
        # compiled, the start stays a tensor (a number would make each position a graph of its own)
        offset = cache_position.reshape(-1)[0].to(torch.int64)
        start = None if torch.compiler.is_compiling() else int(offset)
    else:
        start = _past_length(kwargs)
    mask = kwargs.get("attention_mask")
    if start is not None and isinstance(mask, Tensor) and mask.dim() == 2 and int(mask.shape[-1]) != start + length:
        # the mask covers every position so far: a cache funcadapt cannot see would otherwise place the
        # tokens at the wrong positions without a word
        return (
            f"the forward's attention mask covers {int(mask.shape[-1])} positions, but funcadapt finds {start} "
            f"cached and {length} new tokens, so it cannot tell which positions this forward processes. Pass the "
            f"KV cache as past_key_values (or cache_position); if transformers passes it in a way funcadapt "
            f"does not read, please report it"
        )
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, Tensor) or (keep is not None and not isinstance(keep, int)):
        return (
            "per-token coefficients with logits_to_keep given as indices are not supported (the output head's "
            "positions would be those indices); pass an int, or 0 for every position"
        )
    return Span(start, length, rows, keep if isinstance(keep, int) and 0 < keep < length else 0, offset)


def _past_length(kwargs: Mapping[str, Any]) -> int:
    """The number of tokens already in the KV cache the forward is given: transformers' Cache object
    (``past_key_values``, called ``cache`` from transformers 5.25 on; any argument with
    ``get_seq_length``), or the legacy tuple cache; 0 without one."""
    for value in kwargs.values():
        seq_length = getattr(value, "get_seq_length", None)
        if callable(seq_length):
            return int(seq_length())
    past = kwargs.get("past_key_values")
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])  # the legacy tuple cache: (key [B, H, P, D], value) per layer
    return 0


def token_coefficients(
    where: str, c: Tensor, span: Span, y: Tensor, batch_major: bool = False, batch: int | None = None
) -> Tensor:
    """The coefficient of every token of ``y`` (a layer's output, or an activation of the same layout),
    broadcastable to it, for per-token coefficients ``c`` (``[B, L]`` or ``[L]``) and the forward's
    ``span``: ``c[:, P:P+T]`` at ``[b, t]`` of a ``[B, T, …]`` output, at row ``b·T + t`` of a layer the
    model runs on its batch flattened batch-major (``batch_major``; ``batch``: the rows the module
    holding it received)."""
    length, batch_rows = span.length, span.rows
    assert span.offset is not None
    offset = span.offset.to(c.device)
    if span.keep and y.dim() >= 3 and not batch_major and y.shape[1] == span.keep:
        offset, length = offset + (length - span.keep), span.keep  # the output head, on the last positions only
    if span.start is None:  # (compiled: the start is a tensor, checked in the graph; eager, at the entry)
        torch._assert_async(offset + length <= c.shape[-1], f"{where}: {_past_the_values(c.shape[-1], 'more')}")
    k = c.index_select(-1, offset + torch.arange(length, device=c.device))
    rows = int(y.shape[0]) if y.dim() else 0
    per_row = k.dim() == 2
    if per_row and k.shape[0] != batch_rows:
        beams = (
            " If you run generate() with num_beams or num_return_sequences = n, it runs n copies of each row in a "
            "row: give funcadapt.per_token(values, repeat=n)."
            if batch_rows % k.shape[0] == 0
            else ""
        )
        raise ValueError(
            f"{where}: the per-token coefficients have {k.shape[0]} rows, but the model's input has {batch_rows}: "
            f"give one row of values per row of the batch.{beams}"
        )
    if batch_major:
        # row b·T + t is token t of batch row b
        if rows != batch_rows * length or (batch is not None and batch != batch_rows):
            raise _layout(where, y, batch_rows, length, "[B·T, …]")
        k = k.reshape(-1) if per_row else k.repeat(batch_rows)
        return k.reshape(-1, *([1] * (y.dim() - 1)))
    # batch-first, one feature axis at least: [B, T, …] (a 2-d output is one vector per row, not per token)
    if y.dim() < 3 or rows != batch_rows or y.shape[1] != length:
        raise _layout(where, y, batch_rows, length, "[B, T, features…]")
    if not per_row:
        k = k.unsqueeze(0)
    return k.reshape(*k.shape, *([1] * (y.dim() - 2)))


def _layout(where: str, y: Tensor, rows: int, length: int, expected: str) -> ValueError:
    return ValueError(
        f"{where}: it computes on a tensor of shape {tuple(y.shape)}, and per-token coefficients need {expected} "
        f"(B = {rows} rows, T = {length} tokens in this forward) to know which token each entry belongs to. A "
        f"layer that reshapes or routes its tokens (experts, convolutions, attention over another sequence) "
        f"cannot be given per-token coefficients: scale it with one coefficient, or leave it out (adapter_names, "
        f"groups)"
    )
