"""Sweeps: a metric over a range of coefficients, in vectorised passes, as a tidy result.

``sweep(model, metric, coeffs, batch)`` evaluates ``metric(model output at c)`` for every
``c`` in ``coeffs`` on the same batch, under ``torch.no_grad()``, and returns a
:class:`Sweep` (coefficients, values, ``records()`` / ``to_pandas()`` / ``plot()``).

Methods: ``"vmap"`` (one ``funcadapt.vmap`` forward per chunk of coefficients),
``"rows"`` (one forward on the batch tiled once per coefficient, with one coefficient
per row: :func:`funcadapt.per_row`; linear mode only), ``"loop"`` (one forward per
coefficient). ``"auto"`` tries vmap; if the model or the metric cannot run under vmap
(a data-dependent op, ``.item()``, ...) it tries rows (linear mode, when no adapter
couples the rows of a batch) and then the loop, warning with each reason. Only those
refusals move it on: any other error (the metric's own, a shape error in the batch)
propagates as raised, from the first method that met it. All three give the same values
up to float rounding; the tests check it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .call import call, vmap
from .groups import Groups
from .rows import batch_size, per_row, tile, untile
from .rules.base import rule_named
from .tokens import per_token
from .transform import Mode, transform
from .tree import AdapterTree, extract

Method = Literal["auto", "vmap", "rows", "loop"]
"""How :func:`sweep` evaluates the coefficients (see the module docstring)."""
METHODS: tuple[Method, ...] = get_args(Method)


@dataclass(frozen=True)
class _Scaling:
    """How each coefficient of a sweep scales the adapters: ``tokens`` ([B, L] or [L]): per-token weights,
    coefficient c runs token t of row b at c·tokens[b, t] (:func:`funcadapt.per_token`)."""

    mode: Mode
    groups: Groups | None = None
    tokens: Tensor | None = None

    def coefficient(self, c: Tensor, rows: int | None = None) -> Any:
        """What ``transform`` takes for the sweep's coefficient ``c`` (a scalar, or a group vector); with
        ``rows``, the coefficients ``c`` ([k] or [k, G]) of a batch tiled k times with ``rows`` rows each."""
        if self.tokens is None:
            return c if rows is None else per_row(c, repeat=rows, groups=self.groups)
        weights = self.tokens.to(c.device, c.dtype)
        if rows is not None:  # copy i of the tiled batch at c[i]: [k·B, L(, G)]
            weights = weights.expand(rows, -1) if weights.dim() == 1 else weights
            scaled = c.reshape(len(c), 1, 1, -1) * weights[None, ..., None]
            values = scaled.reshape(-1, *scaled.shape[2:])
        else:
            values = c.reshape(*([1] * weights.dim()), -1) * weights[..., None]
        return per_token(values if self.groups is not None else values[..., 0], groups=self.groups)


@dataclass(frozen=True)
class Sweep:
    """``values[k]`` is the metric at ``coeffs[k]`` (a scalar, or one value per example)."""

    coeffs: Tensor
    values: Tensor
    method: str
    name: str = "metric"

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows: ``{"coeff", "value"}``, plus ``"example"`` when the metric is per example
        (``"coeff"`` is a list, one entry per group, when the sweep ran over coefficient vectors)."""
        out: list[dict[str, Any]] = []
        for c, v in zip(self.coeffs.tolist(), self.values, strict=True):
            if v.dim() == 0:
                out.append({"coeff": c, "value": float(v)})
            else:
                out.extend({"coeff": c, "example": i, "value": float(x)} for i, x in enumerate(v.flatten()))
        return out

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Sweep.to_pandas() needs pandas: pip install pandas (or use Sweep.records())") from e
        return pd.DataFrame.from_records(self.records())

    def plot(self, ax: Any = None, label: str | None = None, **line_kwargs: Any) -> Any:
        """A line of the metric over c (per-example metrics: the mean, with a ±1 std band).
        Marks c = 0 (base model) and c = 1 (trained adapter); over coefficient vectors (groups),
        the x axis is the vector's row in ``coeffs``.

        Like every funcadapt ``plot()``, it returns the matplotlib Figure it drew on (its Axes are
        ``fig.axes``; ``fig.savefig(path)`` saves it). Without ``ax`` that is a new figure with a
        constrained layout, so the axis labels stay inside it when it is saved; a given ``ax`` is
        drawn on and its figure's layout left as it is (overlay sweeps with
        ``b.plot(ax=a.plot().axes[0])``)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
        vectors = self.coeffs.dim() == 2
        x = torch.arange(len(self.coeffs)).float().numpy() if vectors else self.coeffs.float().numpy()
        v = self.values.float().reshape(len(x), -1)
        mean = v.mean(dim=1).numpy()
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label or self.name, **line_kwargs)
        if v.shape[1] > 1:
            std = v.std(dim=1).numpy()
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if vectors:
            ax.set_xlabel("coefficient vector (row of coeffs)")
        else:
            for c in (0.0, 1.0):
                ax.axvline(c, color="0.8", linewidth=0.8, zorder=0)
            ax.set_xlabel("coefficient c")
        if not ax.get_ylabel():
            ax.set_ylabel(self.name)
        return ax.figure

    def __repr__(self) -> str:
        return f"Sweep({self.name}, {len(self.coeffs)} coefficients, values {tuple(self.values.shape)}, {self.method})"


def sweep(
    model: nn.Module,
    metric: Callable[[Any], Tensor],
    coeffs: Tensor | Sequence[float],
    batch: dict[str, Any],
    *,
    method: Method = "auto",
    mode: Mode = "linear",
    groups: Groups | None = None,
    adapter_names: str | Iterable[str] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    name: str | None = None,
    tokens: Tensor | None = None,
) -> Sweep:
    """``metric(output)`` at every coefficient, where ``output = model(**batch)`` with the
    adapters scaled by ``c`` (``op="scale"``, ``mode``).

    With ``groups`` (:func:`funcadapt.layer_groups`), each coefficient is a vector with one entry
    per group: ``coeffs`` has shape ``[N, G]`` and ``values[k]`` is the metric at ``coeffs[k]``.

    With ``tokens`` (per-token weights, ``[B, L]`` for the batch's rows or ``[L]`` for every row), the
    coefficient c runs token t of row b at ``c·tokens[b, t]`` (:func:`funcadapt.per_token`, linear mode):
    a response-only sweep is ``tokens`` 0 on the prompt and 1 after it.

    ``metric`` returns a scalar tensor or one value per example (a tensor of fixed shape).
    ``chunk_size`` coefficients run per forward (default: all at once); ``progress`` shows a
    tqdm bar over chunks (default: when there is more than one chunk). The model runs as it
    is (call ``model.eval()`` first for deterministic values); nothing about it changes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "rows" and mode != "linear":
        raise ValueError("method='rows' (one coefficient per batch row) is defined for mode='linear' only")
    if not isinstance(batch, dict):
        raise TypeError("batch must be a dict of model keyword arguments, e.g. a tokenizer's output")
    cs = coeffs if isinstance(coeffs, Tensor) else torch.tensor(list(coeffs))
    cs = cs.detach().flatten() if groups is None else cs.detach()
    if groups is not None and cs.dim() != 2:
        raise ValueError(
            f"with groups, coeffs is one coefficient vector per row, shape [N, groups]; got {tuple(cs.shape)}"
        )
    if not cs.is_floating_point():
        cs = cs.to(torch.get_default_dtype())
    if len(cs) == 0:
        raise ValueError("coeffs is empty")
    if tokens is not None and mode != "linear":
        raise ValueError("per-token weights (tokens=) are defined for mode='linear' only, as funcadapt.per_token is")
    if tokens is not None and (not isinstance(tokens, Tensor) or tokens.dim() not in (1, 2)):
        raise ValueError("tokens must be a [B, L] or [L] tensor of per-token weights (c·tokens[b, t] at each token)")
    tree = extract(model, adapter_names)
    scaling = _Scaling(mode, groups, None if tokens is None else tokens.detach())
    step = chunk_size or len(cs)
    chunks = list(cs.split(step))
    show = progress if progress is not None else len(chunks) > 1

    from tqdm.auto import tqdm

    values: list[Tensor] = []
    used = method
    with torch.no_grad(), tqdm(total=len(cs), disable=not show, desc=f"sweep ({name or _name(metric)})") as bar:
        for chunk in chunks:
            if used == "auto":
                used, out = _auto(model, tree, metric, chunk, batch, scaling)
            else:
                out = _run(used, model, tree, metric, chunk, batch, scaling)
            values.append(out.detach())
            bar.update(len(chunk))
    return Sweep(cs.cpu(), torch.cat(values).cpu(), used, name or _name(metric))


def _auto(
    model: nn.Module, tree: AdapterTree, metric: Callable[[Any], Tensor], chunk: Tensor, batch: dict, scaling: _Scaling
) -> tuple[Method, Tensor]:
    """vmap; where vmap cannot run the model or the metric, coefficient batches (linear mode, rows
    independent, a batched input); where those cannot be used either, a loop. Any other error is
    the caller's and propagates as raised, without another try."""
    following = "rows" if _rows_apply(tree, batch, scaling.mode) else "loop"
    try:
        return "vmap", _run("vmap", model, tree, metric, chunk, batch, scaling)
    except Exception as e:
        if not vmap_cannot_run(e, len(chunk)):
            raise
        _warn_fallback("vmap", f"failed ({_summary(e)})", following)
    if following == "rows":
        values = _rows_or_refusal(model, tree, metric, chunk, batch, scaling)
        if isinstance(values, Tensor):
            return "rows", values
        _warn_fallback("rows", values, "loop")
    return "loop", _run("loop", model, tree, metric, chunk, batch, scaling)


def _warn_fallback(method: str, why: str, following: str) -> None:
    # stacklevel: this function, _auto, sweep, the caller of sweep
    warnings.warn(f"funcadapt.sweep: method={method!r} {why}; trying method={following!r}", stacklevel=4)


def _summary(error: BaseException) -> str:
    """The error's type and the start of its first line."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _rows_apply(tree: AdapterTree, batch: dict[str, Any], mode: Mode) -> bool:
    """Whether coefficient batches are defined here: linear mode, no adapter that couples the rows
    of a batch, and a batched tensor to tile."""
    coupled = any(rule_named(s.rule).rows_coupled for s in tree.layers)
    return mode == "linear" and not coupled and batch_size(batch) is not None


_VMAP_REFUSALS = (
    "vmap",  # torch.func's own: "vmap: It looks like you're calling .item() ...", "... data-dependent control
    # flow", "vmap: inplace arithmetic ...", "vmap: We do not support batching operators that can output dynamic
    # shape", "vmap over torch.allclose ...", "You tried to vmap over <autograd.Function> ...", and funcadapt's DDP
    "atching rule",  # "Batching rule not implemented for aten::equal. We could not generate a fallback."
    "functorch transforms",  # an autograd.Function without setup_context
    "torch.func transforms",  # funcadapt's own: FSDP1, a trainable parameter inside a quantized layer
    "BatchedTensor",  # "Cannot access storage of BatchedTensorImpl"
    "doesn't have storage",  # .tolist(), .numpy(), .data_ptr() of a batched tensor
    "Can't detach views in-place",  # torch.tensor(t) of a batched tensor
)
"""Substrings of the messages torch 2.13 (and funcadapt) raise when vmap cannot run a function."""

_INPLACE_BROADCAST = re.compile(r"output with shape \[(.*?)\] doesn't match the broadcast shape \[(.*?)\]")


def vmap_cannot_run(error: BaseException, size: int) -> bool:
    """Whether ``error``, raised under a vmap over ``size`` coefficients, is vmap's inability to run
    the function (which another method avoids) rather than an error of the function itself.

    Decided from torch's messages (:data:`_VMAP_REFUSALS`, and an in-place add of a batched
    tensor into an unbatched one), on the error and the errors it was raised from."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (RuntimeError, NotImplementedError, ValueError)):
            message = str(cause)
            if any(s in message for s in _VMAP_REFUSALS) or _inplace_into_unbatched(message, size):
                return True
        cause = cause.__cause__
    return False


def _inplace_into_unbatched(message: str, size: int) -> bool:
    """torch's message for ``t += batched`` with ``t`` not batched (``add_`` has no vmap-specific
    one): the broadcast shape is the output's with the vmapped dimension, ``size``, in front.
    The same words for a real shape error name other shapes."""
    match = _INPLACE_BROADCAST.search(message)
    if match is None:
        return False
    out, broadcast = match.groups()
    return broadcast == ", ".join(filter(None, [str(size), out]))


_ROWS_REFUSALS = (
    "per-row coefficient",  # a layer whose output has no row per coefficient, a rule that refuses rows
    "coefficient groups",  # untile: an output that does not split per coefficient
)
"""Substrings of funcadapt's messages for a model or output that coefficient batches cannot serve."""


def rows_refused(error: BaseException) -> bool:
    """Whether ``error`` is funcadapt's refusal of a coefficient batch (which the loop avoids)."""
    return isinstance(error, (ValueError, TypeError)) and any(s in str(error) for s in _ROWS_REFUSALS)


def _rows_or_refusal(
    model: nn.Module, tree: AdapterTree, metric: Callable[[Any], Tensor], chunk: Tensor, batch: dict, scaling: _Scaling
) -> Tensor | str:
    """The values by coefficient batches, or why those cannot give them here: a layer or untile
    refuses, or the output has tensors with no row per input (a batch-mean ``loss``), which the
    metric, seeing one coefficient's part, would not get. The metric only runs when neither
    holds; its errors, and any other, propagate."""
    try:
        parts, unsplit = _rows_parts(model, tree, chunk, batch, scaling)
    except (ValueError, TypeError) as e:
        if not rows_refused(e):
            raise
        return f"failed ({_summary(e)})"
    if unsplit:
        names = ", ".join(repr(n) for n in unsplit)
        return f"cannot be used (the output's {names}: one value over all coefficients' rows, not one per coefficient)"
    return _metric_per_part(metric, parts)


def _name(metric: Callable[..., Any]) -> str:
    return getattr(metric, "__name__", "metric").replace("<lambda>", "metric")


def _run(
    method: str,
    model: nn.Module,
    tree: AdapterTree,
    metric: Callable[[Any], Tensor],
    chunk: Tensor,
    batch: dict[str, Any],
    scaling: _Scaling,
) -> Tensor:
    chunk = _on_adapter_device(tree, chunk)

    def at(c: Tensor) -> Tensor:
        params = transform(tree, scaling.coefficient(c), mode=scaling.mode, groups=scaling.groups)
        return _as_tensor(metric(call(model, params, **batch)))

    if method == "vmap":
        return vmap(at)(chunk)
    if method == "loop":
        return torch.stack([at(c) for c in chunk])
    parts, _ = _rows_parts(model, tree, chunk, batch, scaling)
    return _metric_per_part(metric, parts)


def _rows_parts(
    model: nn.Module, tree: AdapterTree, chunk: Tensor, batch: dict[str, Any], scaling: _Scaling
) -> tuple[list[Any], list[str]]:
    """The output on the batch tiled once per coefficient (coefficient ``i`` on copy ``i``), split
    back into one part per coefficient; and the names of its tensors that do not split (a batch
    mean), which the parts leave out."""
    k = len(chunk)
    coeffs = scaling.coefficient(_on_adapter_device(tree, chunk), rows=_batch_rows(batch))
    out = call(model, transform(tree, coeffs, mode=scaling.mode, groups=scaling.groups), **tile(batch, k))
    return untile(out, k), _unsplit_tensors(out, k)


def _on_adapter_device(tree: AdapterTree, chunk: Tensor) -> Tensor:
    return chunk.to(next(iter(tree.params.values())).device)


def _unsplit_tensors(out: Any, k: int) -> list[str]:
    if not isinstance(out, Mapping):
        return []  # a tensor or tuple output that does not split makes untile raise instead
    return [name for name, v in out.items() if isinstance(v, Tensor) and (v.dim() == 0 or v.shape[0] % k)]


def _metric_per_part(metric: Callable[[Any], Tensor], parts: list[Any]) -> Tensor:
    return torch.stack([_as_tensor(metric(part)) for part in parts])


def _as_tensor(v: Any) -> Tensor:
    if not isinstance(v, Tensor):
        hint = (
            " (with method='rows' the metric sees each coefficient's part of the output; a batch-mean out.loss "
            "is not split per coefficient: compute the metric from per-row outputs such as logits)"
            if v is None
            else ""
        )
        raise TypeError(
            f"the metric must return a tensor (a scalar or one value per example), got {type(v).__name__}{hint}"
        )
    return v


def _batch_rows(batch: dict[str, Any]) -> int:
    rows = batch_size(batch)
    if rows is None:
        raise ValueError("method='rows' needs at least one batched tensor in batch (e.g. input_ids)")
    return rows
