"""The rule registry: one :class:`Rule` per adapter family, the single source of truth.

A rule says, for one PEFT layer class (and optionally one variant of it), how the
adapter's effect depends on a coefficient ``c``:

* ``linear(spec, params, c)``: the exact transform for ``mode="linear"``,
  ``y(c) = y0 + c·(y1 − y0)`` at the adapted layer. ``None`` means no exact
  parameter-space transform exists and the layer's output is interpolated instead
  (the *fallback*, exact by construction).
* ``geometric(spec, params, c)``: ``mode="geometric"``, the coefficient scales the
  adapter's generator on its own manifold. ``None``: the family has no such structure
  and asking for it is an error. For additive families it equals ``linear``.
* ``invert(spec, params)``: the exact inverse effect; ``None`` means ``geometric`` at
  ``c = −1``.
* ``patches(layer, adapter, ops)``: attribute swaps installed on the live modules
  while a call runs, for layers whose PEFT forward cannot run under ``torch.func``
  transforms, or that interpret the rule's forward-time ops (:mod:`funcadapt.ops`).

Transforms are pure: they read the tensors they are given and return new ones.
The support table in ``docs/support.md`` is generated from :data:`RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor

from ..ops import Coeff, ForwardOp, Interpolate, RuleOp, ScaleInside

Params = dict[str, Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """One adapter on one layer: what every rule function is given, with the tensors and the
    coefficient. ``keys`` maps a role (``"lora_B.weight"``, ``"ia3_l"``, ...: the parameter's path
    below ``<layer>.<attr>.<adapter>`` with the adapter name removed) to its full key in ``params``."""

    path: str
    adapter: str
    rule: str
    layer_type: str
    keys: Mapping[str, str]
    static: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Effect:
    """What a rule returns for one (layer, adapter): new raw parameters by role, and the
    forward-time ops (:mod:`funcadapt.ops`) the layer runs with."""

    params: Mapping[str, Tensor] = field(default_factory=dict)
    ops: tuple[ForwardOp, ...] = ()


Transform = Callable[[LayerSpec, Mapping[str, Tensor], Coeff], Effect]
"""A rule's transform: (the layer's spec, its adapter tensors by role, the coefficient) -> the effect."""

Inverse = Callable[[LayerSpec, Mapping[str, Tensor]], Effect]
"""A rule's exact inverse: (spec, tensors by role) -> the effect."""


@dataclass(frozen=True)
class Patch:
    """Set ``obj.<attr> = value`` (``obj[attr]`` with ``item=True``) while a call runs;
    restored exactly afterwards. With ``wrap=True``, ``value`` is a callable
    ``current -> new`` that wraps what is there now."""

    obj: Any
    attr: Any
    value: Any
    wrap: bool = False
    item: bool = False
    outside_hooks: bool = False
    """For ``attr="forward"`` of a module with an accelerate hook: wrap the hook itself, not the forward it
    runs after loading the weights (where other forward patches go): for checks that may refuse, so
    that nothing is loaded when they do."""


def under_transforms() -> bool:
    """Inside torch.func.vmap / grad / jvp / ...?"""
    return torch._C._functorch.maybe_current_level() is not None


def transform_safe(replacement: Callable[..., Any]) -> Callable[[Any], Any]:
    """A ``wrap`` value for a forward or method swapped in only so torch.func transforms can run
    it: outside transforms PEFT's own code (whatever is installed now) runs unchanged.

    Where an enclosing frame's swap is already installed underneath what is there now (found through
    ``__wrapped__``: that frame's wrappers, its just-in-time recompute among them, sit around it),
    nothing is installed again: a second swap on top would call the replacement directly under
    transforms and bypass the enclosing frame's wrappers, and with them its effect."""

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        if _swapped_below(current):
            return current

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if under_transforms():
                return replacement(current, *args, **kwargs)
            return current(*args, **kwargs)

        dispatch._funcadapt_swap = True  # type: ignore[attr-defined]
        dispatch.__wrapped__ = current  # type: ignore[attr-defined]
        return dispatch

    return wrap


def _swapped_below(fn: Any) -> bool:
    """Whether a :func:`transform_safe` swap is installed in the ``__wrapped__`` chain below ``fn``."""
    for _ in range(64):  # (a bound on the chain's length, should one ever be cyclic)
        if fn is None:
            return False
        if getattr(fn, "_funcadapt_swap", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def replacing(fn: Callable[..., Any], layer: Any) -> Callable[..., Any]:
    """Adapt ``fn(layer, *args)`` to :func:`transform_safe`'s ``replacement(current, *args)``."""

    def replacement(current: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(layer, *args, **kwargs)

    return replacement


def swap_under_transforms(obj: Any, attr: str, fn: Callable[..., Any]) -> Patch:
    """While a call runs, ``obj.<attr>(...)`` is ``fn(obj, ...)`` under torch.func transforms and
    whatever is installed now otherwise: for PEFT methods that cannot run under vmap (in-place
    adds, ``.data`` writes, custom autograd Functions) but are fine as they are outside it."""
    return Patch(obj, attr, transform_safe(replacing(fn, obj)), wrap=True)


Patches = Callable[[Any, str, tuple[RuleOp, ...]], list[Patch]]
"""A rule's ``patches``: (layer, adapter, the rule's forward-time ops for it) -> attribute swaps."""


def swapping(attr: str, fn: Callable[..., Any]) -> Patches:
    """A rule's ``patches`` that is just :func:`swap_under_transforms` of one layer method."""

    def patches(layer: Any, adapter: str, ops: tuple[RuleOp, ...]) -> list[Patch]:
        return [swap_under_transforms(layer, attr, fn)]

    return patches


def same_coeff(a: object, b: object) -> bool:
    """The same coefficient: one object, equal numbers, or equal plain (non-vmapped) tensors that
    do not require grad."""
    if a is b:
        return True
    if is_number(a) and is_number(b):
        return a == b
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if wrapped(a) or wrapped(b) or a.shape != b.shape or a.device != b.device:
            return False
        if a.requires_grad or b.requires_grad:
            return False  # two leaves with equal values still need their own gradients
        return bool(torch.equal(a.to(b.dtype), b))
    return False


@dataclass(frozen=True)
class RuleDoc:
    """Human-facing description; the support table is rendered from these fields."""

    adapter: str
    layers: str
    linear: str
    linear_exact: str  # "exact (parameter space)" / "exact fallback (output interpolation)" / ...
    geometric: str
    invert: str
    quantized: str = "not tested"
    """The bitsandbytes variants the test suite runs this rule on (tests/test_quantized.py keeps it honest)."""


@dataclass(frozen=True)
class LayerAccess:
    """How to read an adapter layer that is not a PEFT tuner layer (``BaseTunerLayer``), for a
    rule whose ``layer_type`` is such a class. PEFT's adaption prompt, for one, wraps a whole
    attention module and swaps the wrapper in and out of the model instead of keeping
    per-adapter dicts; extraction, the structure cache and the output interpolation read
    these functions where they would read a tuner layer's attributes."""

    adapters: Callable[[Any, Sequence[Any]], list[str]]
    """(layer, its ancestors from the root down to its parent) -> the adapters the layer holds."""
    entries: Callable[[Any, str], dict[str, tuple[str, Tensor]]]
    """(layer, adapter) -> role -> (parameter key below the layer, tensor)."""
    base: Callable[[Any], Any]
    """layer -> the submodule whose output, while the layer runs, is the layer's output with its
    adapters switched off (y0 of the output interpolation). It is captured from that one run, not
    recomputed, so state the submodule updates (a KV cache) is updated once."""
    active: Callable[[Any, list[str]], list[str]] = lambda layer, adapters: adapters
    """(layer, the adapters it holds) -> the active ones (default: all of them)."""
    disabled: Callable[[Any], bool] = lambda layer: False
    """Whether the layer's adapters are switched off as a whole (``disable_adapter()``)."""


@dataclass(frozen=True)
class Rule:
    name: str
    layer_type: type
    doc: RuleDoc
    linear: Transform | None
    geometric: Transform | None = None
    invert: Inverse | None = None
    match: Callable[[Any, str], bool] = lambda layer, adapter: True
    static: Callable[[Any, str], dict[str, Any]] = lambda layer, adapter: {}
    patches: Patches | None = None
    no_geometric_reason: str = ""
    additive: bool = False
    """Effects of several adapters of additive rules on one layer add up (ΔW_a + ΔW_b)."""
    commutative: bool = False
    """Effects on one layer commute with each other, so inverting each inverts the composition."""
    row_scale: Callable[[Any, str, Callable[[Tensor], Tensor]], list[Patch] | None] | None = None
    """Fast path for coefficients that vary over the batch (:func:`funcadapt.per_row`,
    :func:`funcadapt.per_token`): patches that scale the adapter's effect by each row's (token's)
    coefficient inside the layer: (layer, adapter, ``coeffs_for``) -> patches, or None where it does
    not apply to this layer; ``coeffs_for(h)`` gives the coefficient of each row (token) of ``h``, an
    activation laid out like the layer's output, broadcastable to h (or raises, naming the layer,
    where they cannot be known). Without it (or on None) the layer output is interpolated."""
    rows_coupled: str = ""
    """Why one row's output depends on the other rows of the batch (Lily's router averages over
    it); non-empty means per-row coefficients (funcadapt.per_row) are refused with this reason."""
    unsupported: str = ""
    """Non-empty: this layer type is recognised but has no honest per-layer coefficient; extract
    refuses it with this explanation (and what to do instead)."""
    not_deployable: str = ""
    """Non-empty: :func:`funcadapt.export` and :func:`funcadapt.merge` refuse this rule with this reason,
    even where its effect is a parameter map (PEFT cannot save, reload or merge the adapter on its own)."""
    acts_on_input: Callable[[LayerSpec], bool] = lambda spec: False
    """The adapter changes the base layer's *input* (feed-forward IA3, OFT). Its exact linear
    transform relies on the base layer being linear in its input; bitsandbytes kernels are not
    (int8 quantises its input; 4-bit rounds to a bfloat16 grid on some CPUs), so on those bases
    linear mode falls back to output interpolation."""
    access: LayerAccess | None = None
    scaled_output: str = ""
    """The layer's per-adapter dict of output multipliers, where the rule's :class:`Scaling` is exactly that
    entry times c (PEFT LoRA's ``scaling``: Δy = B(A·x)·s, and c·B gives B(A·x)·(c·s)). A call multiplies
    the entry instead of recomputing the tensors when it can (see :mod:`funcadapt.interpret`)."""
    """For a ``layer_type`` that is not a PEFT tuner layer: how to read its adapters."""


def additive_rule(
    *,
    name: str,
    layer_type: type,
    roles: tuple[str, ...],
    adapter: str,
    layers: str,
    linear: str,
    quantized: str = "not tested",
    **rule: Any,
) -> Rule:
    """The rule of an additive family whose ΔW is linear in the tensors playing ``roles``:
    ΔW(c) = c·ΔW exactly in parameter space (each of them ↦ c·it), geometric mode the same
    (an additive effect's generator is ΔW itself), invert ΔW ↦ −ΔW; several adapters of
    such families on one layer add up and commute. ``linear`` is the table's description."""
    transform = scaling(*roles)
    doc = RuleDoc(
        adapter=adapter,
        layers=layers,
        linear=linear,
        linear_exact="exact (parameter space)",
        geometric="= linear (additive)",
        invert="exact: ΔW ↦ −ΔW",
        quantized=quantized,
    )
    return Rule(
        name=name,
        layer_type=layer_type,
        doc=doc,
        linear=transform,
        geometric=transform,
        additive=True,
        commutative=True,
        **rule,
    )


RULES: list[Rule] = []
_BY_NAME: dict[str, Rule] = {}

ADAPTER_LAYERS: tuple[type, ...] = (BaseTunerLayer, ModulesToSaveWrapper)
"""What counts as an adapter layer: PEFT's tuner layers and its modules_to_save wrapper.
(The trainable-tokens wrapper delegates to a tuner layer inside it.)"""


_access_cache: tuple[list[Rule], int, tuple[type, ...]] | None = None


def _access_types() -> tuple[type, ...]:
    """Layer classes that rules read through a :class:`LayerAccess` (cached per registry list and length)."""
    global _access_cache
    cached = _access_cache
    if cached is not None and cached[0] is RULES and cached[1] == len(RULES):
        return cached[2]
    found = tuple(dict.fromkeys(r.layer_type for r in RULES if r.access is not None))
    _access_cache = (RULES, len(RULES), found)
    return found


def is_adapter_layer(module: object) -> bool:
    return isinstance(module, (*ADAPTER_LAYERS, *_access_types()))


def access_of(layer: object) -> LayerAccess | None:
    """The :class:`LayerAccess` that reads ``layer``; None for PEFT tuner layers."""
    if isinstance(layer, ADAPTER_LAYERS):
        return None
    for r in RULES:
        if r.access is not None and isinstance(layer, r.layer_type):
            return r.access
    return None


def register(rule: Rule) -> Rule:
    """Add a rule. For layers of one class, rules registered earlier win, so register
    variants (DoRA) before the plain form (LoRA)."""
    if any(r.name == rule.name for r in RULES):
        raise ValueError(f"a rule named {rule.name!r} is already registered")
    RULES.append(rule)
    _BY_NAME[rule.name] = rule
    return rule


def rule_named(name: str) -> Rule:
    return _BY_NAME[name]


def find_rule(layer: Any, adapter: str) -> Rule | None:
    """The matching rule whose layer class is nearest in ``type(layer)``'s MRO (a rule for
    AdaLoRA's layer beats one for its base, LoRA's); ties go to the rule registered first."""
    mro = type(layer).__mro__
    best: Rule | None = None
    best_depth = len(mro)
    for r in RULES:
        if r.layer_type in mro and mro.index(r.layer_type) < best_depth and r.match(layer, adapter):
            best, best_depth = r, mro.index(r.layer_type)
    return best


# ----------------------------------------------------------------------------
# Numeric helpers shared by the rules. Transforms compute in float32 (float64 when
# the parameter is float64) and cast back, so bf16 adapters lose nothing extra.


def known_value(t: Tensor) -> float | None:
    """A one-element tensor's value, or None where it has none to read here (offloaded to ``meta``
    by accelerate, which loads it only when its layer runs)."""
    return None if t.device.type == "meta" else float(t.item())


def is_number(c: object) -> bool:
    return isinstance(c, Number) and not isinstance(c, bool)


def compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def as_compute(c: Coeff, like: Tensor) -> Coeff:
    """A coefficient ready to combine with ``like`` in its compute dtype."""
    if isinstance(c, Tensor):
        return c.to(device=like.device, dtype=compute_dtype(like))
    return c


def scaled_inside(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    """A transform that changes no tensor and scales the adapter's forward-built part on this layer
    (:class:`~funcadapt.ops.ScaleInside`, interpreted by the rule's ``patches``): for adapters whose
    scalable part is built at forward time from tensors shared between layers."""
    return Effect(ops=(ScaleInside(c),))


def interpolated(spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
    """The exact fallback as a transform: interpolate the layer output, y(c) = y0 + c·(y1 − y0)
    (for rules that choose it in geometric mode or invert too, where it is the same map)."""
    return Effect(ops=(Interpolate(c),))


@dataclass(frozen=True)
class Scaling:
    """The transform of an additive family whose ΔW is linear in the tensors playing ``roles``:
    each of them present is multiplied by c, so ΔW(c) = c·ΔW. (A class, not a closure, so that
    :func:`funcadapt.transform` can batch all of a model's scalings into one foreach op.)"""

    roles: tuple[str, ...]

    def __call__(self, spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff) -> Effect:
        return Effect({role: scale(t, c) for role, t in p.items() if role in self.roles})


def scaling(*roles: str) -> Scaling:
    """:class:`Scaling` of ``roles``: ΔW(c) = c·ΔW."""
    return Scaling(roles)


def scale(p: Tensor, c: Coeff) -> Tensor:
    """``c · p`` in p's dtype (one rounding)."""
    if not isinstance(c, Tensor):
        return p * c
    if c.dtype is p.dtype and p.dtype in (torch.float32, torch.float64) and c.device == p.device:
        return p * c  # already the compute dtype and device: the same product, without two no-op casts
    return (p.to(compute_dtype(p)) * as_compute(c, p)).to(p.dtype)


def scaled_multiplier(s: Any, c: Coeff) -> Any:
    """s·c for an output multiplier s (PEFT's float ``scaling``, or a tensor an enclosing call left there)
    and a coefficient c."""
    if isinstance(s, Tensor):
        return scale(s, c)
    return c * s


def lerp(start: Tensor, end: Tensor, c: Coeff) -> Tensor:
    """``start + c·(end − start)`` (``torch.lerp``), evaluated so that c = 0 gives ``start`` and
    c = 1 gives ``end`` bit for bit, also when c is a tensor (a coefficient vector of ones must
    reproduce the trained adapter exactly, not to rounding)."""
    return torch.lerp(start, end, c.to(device=end.device, dtype=end.dtype) if isinstance(c, Tensor) else c)


def exact_at_one(c: Coeff, new: Tensor, old: Tensor) -> Tensor:
    """``new`` (a tensor computed from c and ``old``), except that where c = 1 its value is ``old``
    bit for bit, with the derivatives of ``new`` (with respect to c and to ``old`` alike):
    ``(new − new.detach()) + old.detach()`` there. For transforms that re-encode their parameters
    (a round trip that rounds), so that c = 1 as a tensor is the trained adapter exactly, as it
    is as a number."""
    if not isinstance(c, Tensor):
        return old if c == 1 else new
    pinned = (new - new.detach()) + old.detach()
    return torch.where(c.to(new.device) == 1, pinned, new)


def lerp_from_one(p: Tensor, c: Coeff) -> Tensor:
    """``1 + c·(p − 1)``: the linear path from the identity multiplier to ``p``."""
    q = p.to(compute_dtype(p))
    return lerp(torch.ones_like(q), q, c).to(p.dtype)


def power(p: Tensor, c: Coeff) -> Tensor:
    """``p ** c`` for positive p (the geometric path of a multiplier)."""
    q = p.to(compute_dtype(p))
    return torch.pow(q, as_compute(c, p)).to(p.dtype)


def require_positive(t: Tensor, what: str, path: str, adapter: str) -> None:
    if bool((t <= 0).any()):
        raise ValueError(
            f"layer {path!r} adapter {adapter!r}: {what} has non-positive entries, so its "
            f"geometric power is undefined; use mode='linear'"
        )


PI = math.pi
