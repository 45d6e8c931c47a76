"""``AdapterModifier``: the stateful shell over extract → transform → frame.

Inside the context every adapted layer, when it runs, computes with the transformed
tensors (recomputed from the tensors it holds then, so FSDP's gathered or accelerate's
loaded weights; see :mod:`funcadapt.call`), so a plain ``model(**batch)`` builds an
autograd graph through the transform back to the original Parameters. Between forwards
the model shows its own Parameters, inside the context too; on exit every patch is
removed, bit for bit. The graph keeps the transformed tensors alive, so ``backward()``
after the context gives the gradients of the math that ran. Contexts nest (the inner
one transforms what the outer one shows; a ``funcadapt.call`` inside a context does
too) and must be exited in reverse order, by the thread that entered them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn

from .call import entry_modules, frame
from .groups import Groups
from .structure import reusing_structure
from .swap import Frame
from .transform import MODES, OPS, Mode, Op, transform
from .tree import AdapterTree, extract


class AdapterModifier:
    """Temporarily apply ``op`` (``"scale"``, ``"invert"``, ``"disable"``, ``"shift"``,
    ``"replace"``) with ``value`` to the model's adapters.

    >>> with AdapterModifier(model, "scale", -1.0):
    ...     loss = model(**batch).loss          # the antiparallel adapter
    >>> loss.backward()                          # exact gradients, after exit

    Everything is computed on entry: a bad op, mode, value or adapter raises before the
    model is touched. Not reentrant: one ``with`` per instance at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        op: Op,
        value: Any = None,
        *,
        adapter_names: str | Iterable[str] | None = None,
        mode: Mode = "linear",
        groups: Groups | None = None,
    ) -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.model = model
        self.op = op
        self.value = value
        self.adapter_names = adapter_names
        self.mode = mode
        self.groups = groups
        self.tree: AdapterTree | None = None
        self._frame: Frame | None = None

    def __enter__(self) -> AdapterModifier:
        if self._frame is not None:
            raise RuntimeError("this AdapterModifier is already active; create one per `with` block")
        with reusing_structure(self.model):  # extract and frame read the model's structure once
            tree = extract(self.model, self.adapter_names)
            params = transform(tree, self.value, self.op, self.mode, groups=self.groups)
            f = frame(self.model, params, live_checked=True)  # extract just checked every adapter is live
        # (the label is made when first shown: a tensor's repr costs more than the rest of the entry)
        settings = functools.partial(_settings, self.op, self.value, self.mode, self.groups)
        f.watch(lambda: f"AdapterModifier({settings()})", ("funcadapt", "contextlib"), entry_modules(self.model))
        f.apply()
        self.tree, self._frame = tree, f
        return self

    def __exit__(self, *exc: object) -> None:
        f = self._frame
        if f is not None:
            f.unapply()  # raises, leaving this context active, when exited out of order
            f.entered_in = None  # a graph may keep the frame (checkpoint replay), not the caller's locals
            self._frame = None
            if exc[0] is None:  # what ran in the context may not have met its coefficients (a schedule's steps)
                for state in f.states:
                    state.finished()

    def __repr__(self) -> str:
        state = "active" if self._frame is not None else "inactive"
        return f"AdapterModifier({self._settings()}, {state})"

    def _settings(self) -> str:
        return _settings(self.op, self.value, self.mode, self.groups)


def _settings(op: str, value: Any, mode: str, groups: Groups | None) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    grouped = "" if groups is None else f", groups={groups if isinstance(groups, str) else '...'}"
    return f"op={op!r}, value={shown}, mode={mode!r}{grouped}"
