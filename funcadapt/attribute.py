"""Attribution of an adapter's effect to groups of layers: first-order estimates beside exact effects.

For a scalar ``metric`` of the model's output and a grouping with G groups (coefficient vector
``v``, :mod:`funcadapt.groups`), :func:`attribute` gives for every group g:

* ``grad_at_one[g]  = ∂metric/∂v_g`` at v = 1 (the trained adapter) and ``grad_at_zero[g]`` at
  v = 0 (the base model): attribution patching's first-order estimates;
* ``off[g] = metric(1 − e_g) − metric(1)``: the exact effect of switching group g alone off;
* ``on[g]  = metric(e_g) − metric(0)``: the exact effect of switching group g alone on.

The first-order estimate of ``off[g]`` is ``−grad_at_one[g]`` and of ``on[g]`` is
``grad_at_zero[g]``; where the metric is not linear in v_g they differ, and the result shows by
how much. The 2G + 2 exact evaluations run as one :func:`funcadapt.sweep` over coefficient
vectors (vmap where the model allows it, else a coefficient batch, else a loop); the two
gradients are two forward and backward passes that leave every ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .call import call
from .groups import Groups, resolve
from .sweep import Method, sweep
from .transform import Mode, transform
from .tree import extract


@dataclass(frozen=True)
class Attribution:
    """Per group (in ``groups`` order): gradients at v = 1 and v = 0, exact switch-off and
    switch-on effects; ``at_one``/``at_zero``: the metric with every group on / off."""

    groups: tuple[str, ...]
    grad_at_one: Tensor
    grad_at_zero: Tensor
    off: Tensor
    on: Tensor
    at_one: float
    at_zero: float
    method: str
    name: str = "metric"

    def records(self) -> list[dict[str, Any]]:
        """One tidy row per group: the gradients, each exact effect and its first-order estimate
        (``estimate_off = −grad_at_one``, ``estimate_on = grad_at_zero``)."""
        return [
            {
                "group": g,
                "grad_at_one": float(self.grad_at_one[i]),
                "grad_at_zero": float(self.grad_at_zero[i]),
                "off": float(self.off[i]),
                "estimate_off": -float(self.grad_at_one[i]),
                "on": float(self.on[i]),
                "estimate_on": float(self.grad_at_zero[i]),
            }
            for i, g in enumerate(self.groups)
        ]

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Attribution.to_pandas() needs pandas: pip install pandas (or use records())") from e
        return pd.DataFrame.from_records(self.records())

    def plot(self, axes: Any = None) -> Any:
        """Two bar charts over the groups: switching each group off (exact effect beside its estimate
        −∂metric/∂v_g at v = 1) and switching it on alone (exact beside ∂metric/∂v_g at v = 0).
        Like every funcadapt ``plot()``, it returns the matplotlib Figure it drew on (its two Axes
        are ``fig.axes``); ``axes``: two Axes to draw on instead of a new figure."""
        import matplotlib.pyplot as plt

        if axes is None:
            width = max(6.0, 0.35 * len(self.groups) + 2)
            _, axes = plt.subplots(2, 1, figsize=(width, 5.5), layout="constrained", sharex=True)
        x = torch.arange(len(self.groups)).numpy()
        panels = (
            (self.off, -self.grad_at_one, "switched off alone", "−∂/∂v at v = 1"),
            (self.on, self.grad_at_zero, "switched on alone", "∂/∂v at v = 0"),
        )
        for ax, (exact, estimate, title, est_label) in zip(axes, panels, strict=True):
            ax.bar(x - 0.2, exact.numpy(), width=0.4, label="exact effect")
            ax.bar(x + 0.2, estimate.numpy(), width=0.4, label=f"first-order estimate ({est_label})")
            ax.axhline(0, color="0.6", linewidth=0.8)
            ax.set_title(f"change in {self.name}, each group {title}", fontsize=9)
            ax.legend(fontsize=7)
        axes[-1].set_xticks(x, self.groups, rotation=90 if len(self.groups) > 12 else 0, fontsize=7)
        axes[-1].set_xlabel("layer group")
        return axes[0].figure

    def __repr__(self) -> str:
        return f"Attribution({self.name}, {len(self.groups)} groups, {self.method})"


def attribute(
    model: nn.Module,
    metric: Callable[[Any], Tensor],
    batch: dict[str, Any],
    groups: Groups = "block",
    *,
    mode: Mode = "linear",
    adapter_names: str | Iterable[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
    name: str | None = None,
) -> Attribution:
    """Attribute ``metric(model(**batch))`` to the layer groups: gradients with respect to each
    group's coefficient at v = 1 and v = 0, and the exact effect of switching each group off
    alone and on alone (see :mod:`funcadapt.attribute`). ``metric`` returns a scalar tensor.

    The model runs as it is (call ``model.eval()`` first: dropout would make every value
    random); nothing about it changes, and no parameter's ``.grad`` is touched. ``method``,
    ``chunk_size`` (vectors per vectorised pass; default all 2G + 2 at once) and ``progress`` are
    :func:`funcadapt.sweep`'s, for the exact effects.
    """
    tree = extract(model, adapter_names)
    grouping = resolve(tree, groups)
    names = {g: tuple(p for p, i in grouping.index.items() if i == k) for k, g in enumerate(grouping.names)}
    size = len(grouping)
    device = next(iter(tree.params.values())).device

    def value(v: Tensor) -> Tensor:
        return value_of(metric, call(model, transform(tree, v, mode=mode, groups=names), **batch))

    def gradient(at: float) -> Tensor:
        v = torch.full((size,), at, device=device, requires_grad=True)
        (grad,) = torch.autograd.grad(value(v), v)
        return grad.detach().cpu()

    label = name or getattr(metric, "__name__", "metric").replace("<lambda>", "metric")
    ones, eye = torch.ones(size), torch.eye(size)
    vectors = torch.cat([ones[None], torch.zeros(1, size), ones - eye, eye])
    swept = sweep(
        model,
        lambda out: value_of(metric, out),
        vectors,
        batch,
        method=method,
        mode=mode,
        groups=names,
        chunk_size=chunk_size,
        progress=progress,
        name=label,
    )
    values = swept.values.reshape(-1)
    at_one, at_zero = values[0], values[1]
    return Attribution(
        groups=grouping.names,
        grad_at_one=gradient(1.0),
        grad_at_zero=gradient(0.0),
        off=values[2 : 2 + size] - at_one,
        on=values[2 + size :] - at_zero,
        at_one=float(at_one),
        at_zero=float(at_zero),
        method=swept.method,
        name=label,
    )


def value_of(metric: Callable[[Any], Tensor], out: Any) -> Tensor:
    """The metric as one number, or a clear error."""
    v = metric(out)
    if not isinstance(v, Tensor) or v.numel() != 1:
        raise ValueError(
            "attribute needs a metric that returns one number (a 0-d tensor); average a per-example metric over "
            "the batch"
        )
    return v.reshape(())
