"""Sweeps: a metric over a range of coefficients, in vectorised passes, as a tidy result.

``sweep(model, metric, coeffs, batch)`` evaluates ``metric(model output at c)`` for every
``c`` in ``coeffs`` on the same batch, under ``torch.no_grad()``, and returns a
:class:`Sweep` (coefficients, values, ``records()`` / ``to_pandas()`` / ``plot()``).

Methods: ``"vmap"`` (one ``funcadapt.vmap`` forward per chunk of coefficients),
``"rows"`` (one forward on the batch tiled once per coefficient, with one coefficient
per row: :func:`funcadapt.per_row`; linear mode only), ``"loop"`` (one forward per
coefficient). ``"auto"`` tries vmap; if the model or the metric cannot run under vmap
(a data-dependent op, ``.item()``, ...) it tries rows (linear mode, when no adapter
couples the rows of a batch) and then the loop, warning with each reason. All three
give the same values up to float rounding; the tests check it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .call import call, vmap
from .rows import batch_size, per_row, tile, untile
from .rules.base import rule_named
from .transform import Mode, transform
from .tree import AdapterTree, extract

METHODS = ("auto", "vmap", "rows", "loop")


@dataclass(frozen=True)
class Sweep:
    """``values[k]`` is the metric at ``coeffs[k]`` (a scalar, or one value per example)."""

    coeffs: Tensor
    values: Tensor
    method: str
    name: str = "metric"

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows: ``{"coeff", "value"}``, plus ``"example"`` when the metric is per example."""
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
        Marks c = 0 (base model) and c = 1 (trained adapter). Returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        x = self.coeffs.float().numpy()
        v = self.values.float().reshape(len(x), -1)
        mean = v.mean(dim=1).numpy()
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label or self.name, **line_kwargs)
        if v.shape[1] > 1:
            std = v.std(dim=1).numpy()
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        for c in (0.0, 1.0):
            ax.axvline(c, color="0.8", linewidth=0.8, zorder=0)
        ax.set_xlabel("coefficient c")
        if not ax.get_ylabel():
            ax.set_ylabel(self.name)
        return ax

    def __repr__(self) -> str:
        return f"Sweep({self.name}, {len(self.coeffs)} coefficients, values {tuple(self.values.shape)}, {self.method})"


def sweep(
    model: nn.Module,
    metric: Callable[[Any], Tensor],
    coeffs: Tensor | Sequence[float],
    batch: dict[str, Any],
    *,
    method: str = "auto",
    mode: Mode = "linear",
    adapter_names: str | Iterable[str] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    name: str | None = None,
) -> Sweep:
    """``metric(output)`` at every coefficient, where ``output = model(**batch)`` with the
    adapters scaled by ``c`` (``op="scale"``, ``mode``).

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
    cs = cs.detach().flatten()
    if not cs.is_floating_point():
        cs = cs.to(torch.get_default_dtype())
    if len(cs) == 0:
        raise ValueError("coeffs is empty")
    tree = extract(model, adapter_names)
    step = chunk_size or len(cs)
    chunks = list(cs.split(step))
    show = progress if progress is not None else len(chunks) > 1

    from tqdm.auto import tqdm

    values: list[Tensor] = []
    used = method
    with torch.no_grad(), tqdm(total=len(cs), disable=not show, desc=f"sweep ({name or _name(metric)})") as bar:
        for chunk in chunks:
            if used == "auto":
                used, out = _auto(model, tree, metric, chunk, batch, mode)
            else:
                out = _run(used, model, tree, metric, chunk, batch, mode)
            values.append(out.detach())
            bar.update(len(chunk))
    return Sweep(cs.cpu(), torch.cat(values).cpu(), used, name or _name(metric))


_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, ValueError)
"""What vmap (or a coefficient batch) raises when the model or metric cannot run that way; other
errors (a metric returning a non-tensor, a typo) are the caller's and propagate at once."""


def _auto(
    model: nn.Module, tree: AdapterTree, metric: Callable[[Any], Tensor], chunk: Tensor, batch: dict, mode: Mode
) -> tuple[str, Tensor]:
    """vmap; else coefficient batches (linear mode, rows independent); else a loop."""
    rows_ok = mode == "linear" and not any(rule_named(s.rule).rows_coupled for s in tree.layers)
    candidates = ["vmap", "rows", "loop"] if rows_ok else ["vmap", "loop"]
    for method in candidates[:-1]:
        # after vmap failed for a reason of its own, rows can still fail on what the metric reads
        # (a batch-mean loss is not split per coefficient): any error there moves on to the loop
        expected = _FALLBACK_ERRORS if method == "vmap" else (Exception,)
        try:
            return method, _run(method, model, tree, metric, chunk, batch, mode)
        except expected as e:
            following = candidates[candidates.index(method) + 1]
            warnings.warn(
                f"funcadapt.sweep: method={method!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"trying method={following!r}",
                stacklevel=3,
            )
    return candidates[-1], _run(candidates[-1], model, tree, metric, chunk, batch, mode)


def _name(metric: Callable[..., Any]) -> str:
    return getattr(metric, "__name__", "metric").replace("<lambda>", "metric")


def _run(
    method: str,
    model: nn.Module,
    tree: AdapterTree,
    metric: Callable[[Any], Tensor],
    chunk: Tensor,
    batch: dict[str, Any],
    mode: Mode,
) -> Tensor:
    device = next(iter(tree.params.values())).device
    chunk = chunk.to(device)

    def at(c: Tensor) -> Tensor:
        return _as_tensor(metric(call(model, transform(tree, c, mode=mode), **batch)))

    if method == "vmap":
        return vmap(at)(chunk)
    if method == "loop":
        return torch.stack([at(c) for c in chunk])
    rows = _batch_rows(batch)
    out = call(model, transform(tree, per_row(chunk, repeat=rows), mode=mode), **tile(batch, len(chunk)))
    return torch.stack([_as_tensor(metric(part)) for part in untile(out, len(chunk))])


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
