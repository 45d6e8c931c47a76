"""How a frame's forward-time ops run at each layer: plain tensor code that Dynamo traces.

:func:`funcadapt.call.frame` assembles, for every layer a call touches, the patches built here:

* :func:`output_builders`: the output interpolation of :class:`~funcadapt.ops.Interpolate`,
  :class:`~funcadapt.ops.InterpolateRows` and :class:`~funcadapt.ops.InterpolateTokens`
  (``y = y0 + c·(y1 − y0)``, one c, one per row or one per token), or a rule's own patches for
  coefficients that vary over the batch where it has them (``Rule.row_scale``);
* :func:`jit_patches`: the adapter tensors recomputed *just in time* from what the layer holds
  when it runs (what FSDP all-gathered, accelerate loaded, an enclosing context showed).

The rules' own ops (:data:`~funcadapt.ops.RuleOp`) are interpreted by their ``patches``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from . import engines, models
from .images import Passes, image_coefficients
from .ops import Coeff, ForwardOp, Interpolate, InterpolateImages, InterpolateRows, InterpolateTokens, OutputOp
from .rows import BATCH_MAJOR, row_coefficients, sequence_first
from .rules.base import (
    Patch,
    Rule,
    Scaling,
    access_of,
    is_number,
    rule_named,
    same_coeff,
    scale,
    scaled_multiplier,
    under_transforms,
)
from .swap import current_thread, other_thread, run_undo
from .tokens import Positions, token_coefficients
from .transform import LayerEffect

Builder = Callable[[], list[Patch]]
"""Makes a layer's patches when the frame is applied."""


def output_builders(
    path: str,
    layer: Any,
    per_adapter: Mapping[str, Sequence[ForwardOp]],
    rule_of: Callable[[str], Rule | None],
    modules: Mapping[str, nn.Module],
    positions: Positions | None = None,
    passes: Passes | None = None,
) -> list[Builder]:
    """The output interpolation (one coefficient, one per row, per token or per image) of the adapters that
    ask for it. ``positions``, ``passes``: the forward's positions and denoiser pass, where any op is per
    token or per image."""
    found: dict[type, dict[str, Coeff]] = {}
    for adapter, ops in per_adapter.items():
        for op in ops:
            if isinstance(op, OutputOp):
                found.setdefault(type(op), {})[adapter] = _interpolated_coeff(op)
    if len(found) > 1:
        given = "; ".join(f"adapters {sorted(v)} have {_KINDS[kind]}" for kind, v in found.items())
        raise ValueError(
            f"layer {path!r}: {given}. All are interpolated at the layer output, so give them the same kind of "
            f"coefficient (or modify them in separate calls)"
        )
    if not found:
        return []
    kind, coeffs = found.popitem()
    seq_first = sequence_first(path, modules) if kind is not Interpolate else ""
    if seq_first:
        raise ValueError(
            f"layer {path!r}: {_KINDS[kind]} are refused here because {seq_first}, so the first axis of its output "
            f"is not the batch. Give its adapters one coefficient, or run one call per coefficient"
        )
    by_batch = kind is not Interpolate and batch_major(path, modules)
    # on a layer its model runs on the batch flattened, the rows of the batch its holder receives
    seen: list[int] = []
    watch = [_watching_batch(modules[path.rpartition(".")[0]], seen)] if by_batch else []
    place: Place | None = None
    if kind is InterpolateRows:
        place = functools.partial(_place_rows, f"layer {path!r}", by_batch, seen)
    elif kind is InterpolateTokens:
        _check_token_layout(path, layer)
        assert positions is not None
        place = functools.partial(_place_tokens, f"layer {path!r}", by_batch, seen, positions)
    elif kind is InterpolateImages:
        assert passes is not None
        place = functools.partial(_place_images, f"layer {path!r}", passes)
    fast = _varying_scaling(path, layer, coeffs, rule_of, place) if place is not None else None
    if fast is not None:
        return [functools.partial(list, fast), *watch]
    interpolation = Interpolation(
        path,
        layer,
        coeffs,
        place=place,
        reuse_base=place is not None and _reusable_base(layer, set(coeffs), rule_of),
        main_only=kind is InterpolateTokens,
        kind="coefficients" if kind is Interpolate else _KINDS[kind],
    )
    return [interpolation.patches, *watch]


_KINDS: dict[type, str] = {
    Interpolate: "one coefficient for the whole batch",
    InterpolateRows: "per-row coefficients",
    InterpolateTokens: "per-token coefficients",
    InterpolateImages: "per-image coefficients",
}


def _interpolated_coeff(op: OutputOp) -> Coeff:
    if isinstance(op, Interpolate):
        return op.coeff
    return op.coeffs if isinstance(op, InterpolateRows) else op.values


Place = Callable[[Tensor, Tensor], Tensor]
"""(coefficients varying over the batch, ``y``: a layer's output or an activation laid out like it) ->
the coefficient of each of y's rows or tokens, broadcastable to y."""


def _place_rows(where: str, by_batch: bool, seen: Sequence[int], c: Tensor, y: Tensor) -> Tensor:
    k = row_coefficients(where, c, y.shape[0] if y.dim() else 0, by_batch, seen[-1] if seen else None)
    return k.reshape(-1, *([1] * (y.dim() - 1)))


def _place_tokens(
    where: str, by_batch: bool, seen: Sequence[int], positions: Positions, c: Tensor, y: Tensor
) -> Tensor:
    return token_coefficients(where, c, positions.current(where), y, by_batch, seen[-1] if seen else None)


def _place_images(where: str, passes: Passes, c: Tensor, y: Tensor) -> Tensor:
    return image_coefficients(where, c, passes.current(where), y)


def _check_token_layout(path: str, layer: Any) -> None:
    """Refuse per-token coefficients, before anything runs, on a layer whose output is not laid out by token."""
    base = getattr(layer, "get_base_layer", lambda: layer)()
    if isinstance(base, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.MultiheadAttention):
        raise ValueError(
            f"layer {path!r} is a {type(base).__name__}, whose output is not laid out as [batch, tokens, …], so "
            f"per-token coefficients cannot be placed on it: scale it with one coefficient, or leave it out "
            f"(adapter_names, groups)"
        )


class Interpolation:
    """The exact fallback at one layer: ``y = y0 + c·(y1 − y0)``, y0 with these adapters switched off.

    ``place``: ``c`` varies over the batch, one coefficient per row (:func:`funcadapt.per_row`) or per
    token (:func:`funcadapt.per_token`), and ``place(c, y)`` gives each of y's rows or tokens its
    coefficient, broadcastable to y (see :data:`Place`). ``main_only``: only the layer's main output
    (the first floating tensor) is interpolated, the rest of a tuple output (an attention module's
    weights) is y1's: per-token coefficients, which such side outputs are not laid out for. ``reuse_base``: every
    adapter on the layer is interpolated and all are additive (``y1 = base_layer(x) + Δ(x)``), so
    y0 is the base layer's output captured while y1 runs and the base layer runs once instead of
    twice. Layers read through a :class:`~funcadapt.rules.base.LayerAccess` (adaption prompt)
    always take y0 that way, from their access's ``base`` submodule: running them twice would
    update a KV cache twice.
    """

    def __init__(
        self,
        path: str,
        layer: Any,
        coeffs: Mapping[str, Coeff],
        place: Place | None = None,
        reuse_base: bool = False,
        main_only: bool = False,
        kind: str = "coefficients",
    ) -> None:
        values = list(coeffs.values())
        if not all(same_coeff(v, values[0]) for v in values[1:]):
            raise ValueError(
                f"layer {path!r} has several adapters interpolated at its output ({sorted(coeffs)}) and they were "
                f"given different {kind}; the output interpolation can only scale them together. Give them one "
                f"coefficient, or modify them in separate calls"
            )
        self.path, self.layer, self.c = path, layer, values[0]
        self.adapters = set(coeffs)
        self.place, self.reuse_base, self.main_only = place, reuse_base, main_only
        self.access = access_of(layer)
        # the outputs of a LayerAccess's base while the layer runs (recorded by a patch on the base's
        # forward, applied with the frame: a hook registered inside the forward cannot be compiled)
        self.recording: list[bool] = [False]
        self.recorded: list[Any] = []

    def patches(self) -> list[Patch]:
        if self.access is None:
            return [Patch(self.layer, "forward", self.wrap, wrap=True)]
        return [
            Patch(self.access.base(self.layer), "forward", self.record, wrap=True, outside_hooks=True),
            Patch(self.layer, "forward", self.wrap, wrap=True),
        ]

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def interpolated(*args: Any, **kwargs: Any) -> Any:
            return self.run(forward, args, kwargs)

        interpolated.__wrapped__ = forward  # type: ignore[attr-defined]  # (see rules.base.transform_safe)
        return interpolated

    def run(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"layer {self.path!r}: PEFT's mixed-adapter batch (adapter_names=...) routes rows to adapters "
                f"itself, and this layer's coefficient works by switching its adapters off for y0, which that "
                f"routing ignores. Give each row its coefficient with funcadapt.per_row instead (0 for rows that "
                f"should not use the adapter)"
            )
        compiling = torch.compiler.is_compiling()
        if not compiling and self.place is None and is_number(self.c) and self.c == 0.0:
            # (compiled, the lerp below gives y0 exactly at 0 too, and no value of c gets its own graph)
            return self.without(forward, args, kwargs)
        y0: Any = None
        if self.access is not None:
            y1, y0 = self.captured(forward, args, kwargs)
        elif self.reuse_base and not compiling:
            # (compiled, y0 is computed again below: the graph's common-subexpression elimination
            # shares the base layer's run, and hooks and version counters are not traced)
            y1, y0 = self.with_base(forward, args, kwargs)
            y0 = y0.to(y1.dtype) if y0 is not None and isinstance(y1, Tensor) else None
        else:
            y1 = forward(*args, **kwargs)
        if y0 is None:
            y0 = self.without(forward, args, kwargs)
        if not self.main_only:
            return pytree.tree_map(self.lerp, y0, y1)
        leaves0, _ = pytree.tree_flatten(y0)
        leaves1, spec = pytree.tree_flatten(y1)
        first = next((i for i, t in enumerate(leaves0) if isinstance(t, Tensor) and t.is_floating_point()), None)
        if first is not None:
            leaves1[first] = self.lerp(leaves0[first], leaves1[first])
        return pytree.tree_unflatten(leaves1, spec)

    def without(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """y0: the layer's output with these adapters switched off."""
        if self.access is not None:
            return self.captured(forward, args, kwargs)[1]
        layer = self.layer
        saved = layer._active_adapter
        layer._active_adapter = [a for a in layer.active_adapters if a not in self.adapters]
        try:
            return forward(*args, **kwargs)
        finally:
            layer._active_adapter = saved

    def with_base(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """(y1, the base layer's output if it ran exactly once, on this very input)."""
        y1, seen = _watching(self.layer.base_layer, forward, args, kwargs)
        if len(seen) == 1 and args:
            inputs, out, version = seen[0]
            # PEFT layers that add their update in place (``result += …``) modify the base output
            if inputs and inputs[0] is args[0] and version >= 0 and _version(out) == version:
                return y1, out
        return y1, None

    def record(self, base_forward: Callable[..., Any]) -> Callable[..., Any]:
        def recorded_forward(*args: Any, **kwargs: Any) -> Any:
            out = base_forward(*args, **kwargs)
            if self.recording[0]:
                self.recorded.append(out)
            return out

        return recorded_forward

    def captured(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """(y1, y0) from one run of a layer read through a LayerAccess: y0 is its base's output."""
        self.recorded.clear()
        self.recording[0] = True
        try:
            y1 = forward(*args, **kwargs)
        finally:
            self.recording[0] = False
        outs = list(self.recorded)
        self.recorded.clear()
        if len(outs) != 1:
            raise RuntimeError(f"layer {self.path!r}: its base ran {len(outs)} times in one forward, expected once")
        return y1, outs[0]

    def lerp(self, y0: Any, y1: Any) -> Any:
        if not isinstance(y0, Tensor) or not y0.is_floating_point():
            return y1
        if y0.dtype in (torch.float16, torch.bfloat16):  # interpolate in float32, round once
            return self.lerp(y0.float(), y1.float()).to(y0.dtype)
        c = self.c
        k = c.to(device=y0.device, dtype=y0.dtype) if isinstance(c, Tensor) else c
        if self.place is not None:
            assert isinstance(k, Tensor)
            k = self.place(k, y0)
        # torch.lerp is y0 + k·(y1 − y0), evaluated so that k = 0 gives y0 and k = 1 gives y1 bit for bit
        return torch.lerp(y0, y1, k)


def batch_major(path: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the model runs the layer at ``path`` on its batch flattened batch-major (see
    :data:`funcadapt.rows.BATCH_MAJOR`)."""
    parent, _, attr = path.rpartition(".")
    holder = modules.get(parent)
    return holder is not None and attr in BATCH_MAJOR.get(models.qualified(type(holder)), ())


def _watching_batch(holder: nn.Module, seen: list[int]) -> Callable[[], list[Patch]]:
    """A patch recording the rows of the hidden states ``holder`` receives (its first argument)."""

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.get("hidden_states")
            seen[:] = [int(hidden.shape[0])] if isinstance(hidden, Tensor) and hidden.dim() else []
            return forward(*args, **kwargs)

        watched.__wrapped__ = forward  # type: ignore[attr-defined]
        return watched

    return lambda: [Patch(holder, "forward", wrap, wrap=True)]


def _varying_scaling(
    path: str,
    layer: Any,
    coeffs: Mapping[str, Any],
    rule_of: Callable[[str], Rule | None],
    place: Place,
) -> list[Patch] | None:
    """The rules' own patches for every adapter on this layer given coefficients that vary over the batch
    (per row or per token), or None (then the layer output is interpolated)."""
    patches: list[Patch] = []
    for adapter, c in coeffs.items():
        rule = rule_of(adapter)
        if rule is None or rule.row_scale is None:
            return None
        found = rule.row_scale(layer, adapter, functools.partial(place, c))
        if found is None:
            return None
        patches.extend(found)
    return patches


def _watching(
    module: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
) -> tuple[Any, list[tuple[tuple, Any, int]]]:
    """``forward(*args, **kwargs)``, and every call of ``module`` meanwhile: (inputs, output, its version)."""
    seen: list[tuple[tuple, Any, int]] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append((a, out, _version(out))))
    try:
        return forward(*args, **kwargs), seen
    finally:
        handle.remove()


def _version(t: Any) -> int:
    """Autograd's in-place version counter of ``t``; −1 when it has none (inference tensors)."""
    try:
        return int(t._version) if isinstance(t, Tensor) else -1
    except RuntimeError:
        return -1


def _reusable_base(layer: Any, adapters: set[str], rule_of: Callable[[str], Rule | None]) -> bool:
    """y0 is exactly ``base_layer(x)`` when all active adapters are interpolated and additive."""
    if not isinstance(getattr(layer, "base_layer", None), nn.Module):
        return False
    for adapter in layer.active_adapters:
        if adapter not in adapters:
            return False
        rule = rule_of(adapter)
        if rule is None or not rule.additive:
            return False
    return True


_CHAIN = "_funcadapt_jit"
"""On a layer while frames touch it: their effects, outermost frame first (see :func:`jit_patches`)."""


class _Recomputed:
    """One frame's just-in-time work on a layer: its effects, each with the (role, key) pairs it reads
    (a scaling reads only the tensors it scales), where each key is reached (tree key -> its
    (owner, name)s, the layer's own path first), and the offloaded tensors to load.

    ``factors`` (attribute name, {adapter: c}, the device of the adapter's tensors): set where every
    effect is a scaling, of the layer itself (not of an adapter layer nested in it), by a rule with a
    ``scaled_output`` dict (LoRA's ``scaling``), and nothing is loaded; then, when every frame on the
    layer has them, the layer runs with those entries multiplied by the coefficients instead of with
    recomputed tensors (:func:`_run_scaled`): the same map, Δy(c) = c·Δy, without touching a tensor."""

    __slots__ = ("factors", "loads", "owners", "steps")

    def __init__(
        self,
        recipes: tuple[LayerEffect, ...],
        owners: Mapping[str, list[tuple[nn.Module, str]]],
        loads: tuple[tuple[nn.Module, str], ...],
        layer: Any,
        path: str,
    ) -> None:
        self.owners = owners
        self.loads = loads
        self.steps: list[tuple[LayerEffect, tuple[tuple[str, str], ...]]] = []
        for e in recipes:
            reads = e.recompute.roles if isinstance(e.recompute, Scaling) else e.spec.keys
            self.steps.append((e, tuple((role, key) for role, key in e.spec.keys.items() if role in reads)))
        self.factors = None if loads else _factors(path, layer, recipes, owners)

    def show(self, shown: dict[str, Tensor], undo: list[Callable[[], None]]) -> None:
        """Recompute this frame's tensors from what the frames outside it show (``shown``, else the
        layer's own), each effect reading the same tensors (a tensor several layers share is
        transformed once, not once per layer), and show them under every name they have."""
        for owner, name in self.loads:
            engines.live(owner, name, undo)
        outer = dict(shown)
        for e, reads in self.steps:
            p = {}
            for role, key in reads:
                t = outer.get(key)
                if t is None:  # read where this layer reaches it
                    owner, name = self.owners[key][0]
                    t = outer[key] = shown[key] = engines.live(owner, name, undo)
                p[role] = t
            recompute = e.recompute
            assert recompute is not None
            if isinstance(recompute, Scaling):  # c·t for each tensor read: the same values, no Effect built
                new = {role: scale(t, e.coeff) for role, t in p.items()}
            else:
                new = dict(recompute(e.spec, p, e.coeff).params)
            for role, tensor in new.items():
                key = e.spec.keys[role]
                shown[key] = tensor
                for owner, name in self.owners[key]:  # under every name it has
                    engines.put(owner, name, tensor, undo)


def _factors(
    path: str, layer: Any, recipes: tuple[LayerEffect, ...], owners: Mapping[str, list[tuple[nn.Module, str]]]
) -> tuple[str, dict[str, Coeff], torch.device] | None:
    """(the dict's name, {adapter: c}, the adapter tensors' device) where every effect scales an entry of
    one ``scaled_output`` dict of the layer at ``path`` itself."""
    names = {rule_named(e.spec.rule).scaled_output if isinstance(e.recompute, Scaling) else "" for e in recipes}
    if len(names) != 1 or "" in names or any(e.spec.path != path for e in recipes):
        return None
    name = names.pop()
    store = getattr(layer, name, None)
    if not isinstance(store, dict) or any(e.spec.adapter not in store for e in recipes):
        return None
    owner, attr = owners[next(iter(recipes[0].spec.keys.values()))][0]
    tensor = getattr(owner, attr, None)
    if not isinstance(tensor, Tensor):
        return None
    return name, {e.spec.adapter: e.coeff for e in recipes}, tensor.device


def _run_scaled(
    layer: Any, chain: tuple[_Recomputed, ...], forward: Callable[..., Any], args: tuple, kwargs: dict
) -> Any:
    """``forward`` with each adapter's output multiplier times the product of its coefficients over the
    frames of ``chain`` (all with :attr:`_Recomputed.factors` on one dict), restored on return."""
    name, total, device = chain[0].factors  # type: ignore[misc]
    if len(chain) > 1:
        total = dict(total)
        for entry in chain[1:]:
            assert entry.factors is not None
            for adapter, c in entry.factors[1].items():
                total[adapter] = c if adapter not in total else scaled_multiplier(total[adapter], c)
    store = getattr(layer, name)
    saved = {adapter: store[adapter] for adapter in total}
    try:
        for adapter, c in total.items():
            if isinstance(c, Tensor) and c.device != device:  # (PEFT multiplies its output by the entry)
                c = c.to(device)
            store[adapter] = scaled_multiplier(saved[adapter], c)
        return forward(*args, **kwargs)
    finally:
        store.update(saved)


def jit_patches(
    path: str,
    layer: Any,
    recipes: tuple[LayerEffect, ...],
    owners: Mapping[str, list[tuple[nn.Module, str]]],
    loads: tuple[tuple[nn.Module, str], ...] = (),
    guard: str | None = None,
) -> Builder | None:
    """The layer's effects applied just in time: when the layer runs, each effect recomputes its
    adapter tensors from the tensors the layer holds *then* (what FSDP all-gathered, accelerate
    loaded, or an enclosing frame showed), and those are shown to PEFT's forward until it returns.
    Nested frames add their effects to one chain on the layer, applied outermost first, so an
    inner context transforms what the outer one shows. ``loads``: offloaded tensors loaded for the
    layer's run. The layer refuses other threads, as every module the call changes does (see
    :func:`funcadapt.swap.thread_guarded`): with ``guard`` (the layer's name in the error) the check is
    made here, in the same wrapper, instead of by a second one. None where there is nothing to do; the
    layer's record is made once per frame, its patches each time the frame is applied."""
    if not recipes and not loads:
        return None
    entry = _Recomputed(recipes, owners, loads, layer, path)
    chained = functools.partial(_chained, entry)
    wrapper = functools.partial(_just_in_time, layer, guard)

    def patches() -> list[Patch]:
        chain = Patch(layer, _CHAIN, chained, wrap=True)
        if _CHAIN in layer.__dict__:
            return [chain]
        # a "forward" patch goes inside an accelerate hook on the layer itself (after it loaded the weights)
        return [chain, Patch(layer, "forward", wrapper, wrap=True)]

    return patches


def _all_factors(chain: tuple[_Recomputed, ...]) -> bool:
    return all(e.factors is not None for e in chain)


def _chained(entry: _Recomputed, chain: tuple[_Recomputed, ...] | None) -> tuple[_Recomputed, ...]:
    return (*(chain or ()), entry)


def _just_in_time(layer: Any, guard: str | None, forward: Callable[..., Any]) -> Callable[..., Any]:
    owner = current_thread()

    def applied(*args: Any, **kwargs: Any) -> Any:
        if guard is not None and current_thread() is not owner:
            raise other_thread(guard, owner)
        chain: tuple[_Recomputed, ...] = layer.__dict__.get(_CHAIN, ())
        # (compiled or under torch.func transforms the tensors are recomputed: the graph has no Python
        # dict to write, and a batched coefficient stays on the tensors it batches)
        scaled = chain and (chain[0].factors is not None if len(chain) == 1 else _all_factors(chain))
        if scaled and not torch.compiler.is_compiling() and not under_transforms():
            return _run_scaled(layer, chain, forward, args, kwargs)
        undo: list[Callable[[], None]] = []
        try:
            shown: dict[str, Tensor] = {}
            for entry in chain:
                entry.show(shown, undo)
            return forward(*args, **kwargs)
        finally:
            if undo:
                run_undo(undo)

    applied.__wrapped__ = forward  # type: ignore[attr-defined]  # (see rules.base.transform_safe)
    return applied
