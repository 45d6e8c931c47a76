"""Coefficient batches: one coefficient per row of the batch, no vmap needed.

``model.generate()`` cannot be vmapped (data-dependent stopping, a mutable KV cache),
yet a steering researcher wants text at several coefficients side by side from one
batch. :func:`per_row` marks a coefficient vector as *one coefficient per batch row*;
given to :func:`funcadapt.transform` or :class:`funcadapt.AdapterModifier` with
``op="scale"`` and ``mode="linear"``, every adapted layer computes, row by row,

    y[i] = y0[i] + c[i]·(y1[i] − y0[i])

which is exactly what running row ``i`` alone at coefficient ``c[i]`` gives in linear
mode (that mode is defined by this per-layer interpolation, and each row's result
depends only on that row). The batch is tiled with :func:`tile`, so rows
``k·B … (k+1)·B − 1`` carry coefficient ``coeffs[k]``::

    coeffs = funcadapt.per_row(torch.tensor([-1.0, 0.0, 1.0]), repeat=len(prompts))
    with funcadapt.AdapterModifier(model, "scale", coeffs):
        out = model.generate(**funcadapt.tile(batch, 3))

Cost: for additive families (LoRA, ...) the base layer's output is computed once and
reused as ``y0``; for the others each adapted layer runs with and without the adapter.

The row axis is the first axis of every adapted layer's output, which is the batch
axis for transformers models (also during generation with a KV cache). Models that
reshape the batch away before an adapted layer (MoE experts routing tokens) are caught
when the first axis does not have exactly one entry per coefficient; rules whose rows
are coupled (Lily's batch-averaging router, LoRA on ``nn.MultiheadAttention``) refuse
per-row coefficients with their reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import models


@dataclass(frozen=True, eq=False)
class PerRow:
    """One coefficient per batch row (a 1-D floating tensor), or with ``groups`` one coefficient
    vector per row (``[rows, G]``, see :mod:`funcadapt.groups`). Build it with :func:`per_row`."""

    values: Tensor
    groups: Any = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        shown = self.values.tolist() if len(self) <= 8 else f"{len(self)} rows"
        return f"PerRow({shown}{', groups' if self.groups is not None else ''})"


def per_row(coeffs: PerRow | Tensor | Sequence[Any], repeat: int = 1, groups: Any = None) -> PerRow:
    """Coefficients for a batch tiled with :func:`tile`: each of ``coeffs`` repeated ``repeat``
    times in a row, ``[c0]*repeat + [c1]*repeat + …``. With ``repeat=1``, one per row as given.
    ``coeffs`` may be a :class:`PerRow` itself: each of its rows then repeated (``generate()`` with
    ``num_beams=k`` runs k copies of each row in a row: ``per_row(rows, repeat=k)``).

    With ``groups`` (a grouping as :func:`funcadapt.transform` takes it), each of ``coeffs`` is a
    coefficient vector, one entry per group: ``coeffs`` has shape ``[N, G]`` and row ``i`` of the
    tiled batch runs with vector ``coeffs[i // repeat]``.

    ``coeffs`` may require grad (the gradient reaches it through every row that uses it).
    """
    if isinstance(coeffs, PerRow):
        groups = coeffs.groups if groups is None else groups
        coeffs = coeffs.values
    values = coeffs if isinstance(coeffs, Tensor) else torch.tensor(list(coeffs))
    want = 1 if groups is None else 2
    if values.dim() != want:
        what = "a 1-D sequence of coefficients" if groups is None else "a 2-D [N, groups] tensor of coefficient vectors"
        raise ValueError(f"per_row takes {what}, got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int (rows per coefficient), got {repeat!r}")
    if repeat > 1:
        values = values.repeat_interleave(repeat, dim=0)
    return PerRow(values, groups)


def tile(batch: Any, times: int) -> Any:
    """``batch`` repeated ``times`` times along the first axis: rows ``k·B … (k+1)·B − 1``
    are copy ``k``. Works on a tensor, a dict / ``BatchEncoding`` (returned as a dict), and
    lists or tuples of those. The batch size B is the largest first axis among the tensors;
    tensors whose first axis is not B (a broadcast ``position_ids`` of shape (1, T), a
    scalar) and other values (flags, ``None``) pass through unchanged."""
    if not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be a positive int, got {times!r}")
    rows = batch_size(batch)
    return _tile(batch, times, rows)


def _tile(batch: Any, times: int, rows: int | None) -> Any:
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] != rows:
            return batch
        return batch.repeat(times, *([1] * (batch.dim() - 1)))
    if isinstance(batch, Mapping):
        return {k: _tile(v, times, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_tile(v, times, rows) for v in batch)
    return batch


def batch_size(batch: Any) -> int | None:
    """The largest first axis among the tensors in ``batch`` (None when there is none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        sizes = [s for s in (batch_size(v) for v in batch) if s is not None]
        return max(sizes) if sizes else None
    return None


def untile(out: Any, times: int) -> list[Any]:
    """Split a model output over a tiled batch back into ``times`` parts (the inverse of
    :func:`tile` on the first axis). Tensors are split along their first axis; mappings
    and ``ModelOutput``s keep only the entries that split (a KV cache object and a
    batch-mean ``loss`` are dropped: compute per-coefficient losses from the logits)."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] % times:
            raise ValueError(
                f"cannot split an output of shape {tuple(out.shape)} into {times} coefficient groups along "
                f"its first axis; the metric should see per-row outputs (e.g. logits, not a batch-mean loss)"
            )
        return list(out.chunk(times, dim=0))
    if isinstance(out, Mapping):
        # entries that cannot be split per coefficient (a batch-mean loss) are left out
        parts = {k: untile(v, times) for k, v in out.items() if _splittable(v, times)}
        make = type(out) if _rebuildable(out) else dict
        return [make(**{k: v[i] for k, v in parts.items()}) for i in range(times)]
    if isinstance(out, (list, tuple)):
        columns = [untile(v, times) for v in out if _has_tensor(v)]
        container = list if isinstance(out, list) else tuple
        return [container(col[i] for col in columns) for i in range(times)]
    raise TypeError(f"cannot split a {type(out).__name__} into coefficient groups")


def _splittable(v: Any, times: int) -> bool:
    if isinstance(v, Tensor):
        return v.dim() > 0 and v.shape[0] % times == 0
    return _has_tensor(v)


def _has_tensor(v: Any) -> bool:
    if isinstance(v, Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def _rebuildable(out: Mapping) -> bool:
    return type(out) is not dict and hasattr(type(out), "__dataclass_fields__")


def runs(columns: Sequence[Tensor]) -> tuple[int, ...]:
    """The lengths of the runs of consecutive rows that share every coefficient, given one per-row
    coefficient vector per layer group (``columns``, each of length R). A batch tiled with
    :func:`tile` at ``per_row(coeffs, repeat=B)`` has runs of B rows, one per coefficient."""
    rows = int(columns[0].shape[0])
    cut = torch.zeros(max(rows - 1, 0), dtype=torch.bool)
    for column in columns:
        c = column.detach().cpu()
        cut |= c[1:] != c[:-1]
    bounds = [0, *(int(i) + 1 for i in cut.nonzero().flatten()), rows]
    return tuple(b - a for a, b in itertools.pairwise(bounds) if b > a)


BATCH_MAJOR: dict[str, frozenset[str]] = {
    # OPTDecoderLayer.forward: hidden_states.reshape(-1, hidden_states.size(-1)) before fc1 and fc2
    "transformers.models.opt.modeling_opt.OPTDecoderLayer": frozenset({"fc1", "fc2"}),
}
"""Layers that their model runs on the batch flattened with the sequence, batch-major (``[B·T, …]``,
row ``b·T + t`` is token t of batch row b), by the class of the module holding them and their
attribute there, as read from the model's code. A per-row coefficient reaches such a layer's rows
as ``c.repeat_interleave(T)``; elsewhere a layer whose output has a multiple of the coefficients'
rows is refused, since its row order cannot be known."""


SEQUENCE_FIRST: dict[str, str] = {
    # XLNetModel.forward: input_ids.transpose(0, 1) — every layer below runs on [T, B, …]
    "transformers.models.xlnet.modeling_xlnet.XLNetModel": "XLNet runs its layers sequence-first ([T, B, …])",
    # FSMT's encoder and decoder layers: x = x.transpose(0, 1) (fairseq's T x B x C)
    "transformers.models.fsmt.modeling_fsmt.FSMTModel": "FSMT runs its layers sequence-first ([T, B, …])",
    # Longformer's and LED's self-attention: hidden_states.transpose(0, 1) before query/key/value
    "transformers.models.longformer.modeling_longformer.LongformerSelfAttention": (
        "Longformer's self-attention projects its input sequence-first ([T, B, …])"
    ),
    "transformers.models.led.modeling_led.LEDEncoderSelfAttention": (
        "LED's encoder self-attention projects its input sequence-first ([T, B, …])"
    ),
}
"""Modules under which the model runs its layers on the sequence first (``[T, B, …]``), by the class of the
holding module, as read from the model's code. Coefficients that vary over the batch (per row, per token)
are refused on the layers below them: with as many rows as tokens the first axis would pass for the batch."""


def sequence_first(path: str, modules: Mapping[str, Any]) -> str:
    """Why the layer at ``path`` runs sequence-first (see :data:`SEQUENCE_FIRST`), or ``""``."""
    parts = path.split(".")
    for i in range(len(parts), -1, -1):
        holder = modules.get(".".join(parts[:i]))
        if holder is not None:
            reason = SEQUENCE_FIRST.get(models.qualified(type(holder)), "")
            if reason:
                return reason
    return ""


def row_coefficients(where: str, c: Tensor, rows: int, batch_major: bool = False, batch: int | None = None) -> Tensor:
    """The coefficient of each of the ``rows`` rows of a layer's output, for per-row coefficients
    ``c`` (one per batch row): ``c`` itself, or each repeated T times on a layer the model runs on
    its batch flattened batch-major (``batch_major``, see :data:`BATCH_MAJOR`; ``batch``: the rows of
    the batch the module holding it received, which must be one per coefficient)."""
    n = int(c.shape[0])
    if rows == n:
        return c
    if rows > n and rows % n == 0:
        if batch_major:
            if batch is not None and batch != n:
                raise rows_mismatch(where, batch, n)
            return c.repeat_interleave(rows // n)
        k = rows // n
        raise ValueError(
            f"{where}: its output has {rows} rows, {k} for each of the {n} per-row coefficients. If you run "
            f"generate() with num_beams or num_return_sequences = {k}, it runs {k} copies of each row in a row: "
            f"give each coefficient {k} times as many rows, e.g. funcadapt.per_row(coeffs, repeat={k} * "
            f"len(prompts)) where you had repeat=len(prompts) (or funcadapt.per_row(per_row_coeffs, "
            f"repeat={k})). Otherwise the model flattens the batch at this layer (batch and sequence in one "
            f"axis, or tokens routed to experts) in an order funcadapt cannot know, so no row can be given its "
            f"coefficient there: run one call per coefficient, or funcadapt.vmap over the coefficients"
        )
    raise rows_mismatch(where, rows, n)


def rows_mismatch(where: str, got: int, expected: int) -> ValueError:
    """The error for a layer whose output does not have one row per coefficient."""
    return ValueError(
        f"{where}: its output has {got} rows but {expected} per-row coefficients were given; give exactly one "
        f"coefficient per row of the batch the model runs on: for a batch of B rows tiled with "
        f"funcadapt.tile(batch, len(coeffs)), funcadapt.per_row(coeffs, repeat=len(batch['input_ids'])) "
        f"gives len(coeffs)·B"
    )
