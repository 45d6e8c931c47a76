"""Pure transforms of an :class:`AdapterTree`'s parameters.

``transform(tree, coeff, op, mode)`` returns a :class:`Transformed`: a typed, registered
pytree holding the source tree and, per adapted layer, a :class:`LayerEffect`: how that
layer's adapter tensors follow from the tensors it holds (``recompute``, with its
coefficient, the amount shifted or the tensors given by ``replace``) and its forward-time
ops (``ops``, typed values from :mod:`funcadapt.ops`: the exact fallback's output
interpolation, per-row coefficients, a rule's own forward arguments). Nothing is mutated and nothing is
computed that the call does not need: :func:`funcadapt.call` applies each layer's effect
*when that layer runs*, to whatever tensors it holds then (what FSDP all-gathered or
accelerate loaded), so the coefficient is exact under any engine that places weights
just in time. A ``Transformed`` is also a read-only ``Mapping`` from parameter keys to
the transformed tensors (computed on first read, from the tree's tensors as they are then;
a read after they changed in place raises), for inspection; it is not a ``dict``, so
``torch.func.functional_call``, which would drop the forward-time ops, refuses it
loudly.

A ``Transformed`` describes an effect, not a snapshot of tensors: params computed before
an ``optimizer.step()`` apply to the stepped weights when called, for every op (the
tensors a ``replace`` gives do not depend on the weights).

Ops (``mode`` applies to ``scale``):

* ``scale``   coefficient c. ``mode="linear"``: y(c) = y0 + c·(y1 − y0) at each adapted
  layer, per adapter. ``mode="geometric"``: c scales the adapter's generator.
* ``invert``  the exact inverse effect (geometric c = −1 where that is exact).
* ``disable`` c = 0: exactly the base model.
* ``shift``   raw parameters + value (a number, ``{adapter: number}`` or ``{key: tensor}``).
* ``replace`` raw parameters replaced by ``{key: tensor}``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .engines import flat_shard, is_sharded, local_shard
from .groups import LAYOUTS, Groups, Varying, check_vector, per_layer, resolve
from .images import PerImage
from .ops import ForwardOp, Interpolate, InterpolateImages, InterpolateRows, InterpolateTokens
from .rows import PerRow
from .rules.base import Coeff, Effect, Rule, Scaling, is_number, rule_named, same_coeff
from .rules.base import Transform as RuleTransform
from .tokens import PerToken
from .tree import AdapterTree, LayerSpec

Op = Literal["scale", "invert", "disable", "shift", "replace"]
Mode = Literal["linear", "geometric"]
OPS: tuple[Op, ...] = get_args(Op)
MODES: tuple[Mode, ...] = get_args(Mode)

OpT = TypeVar("OpT")

Recompute = Callable[[LayerSpec, Mapping[str, Tensor], Any], Effect]
"""(spec, the layer's adapter tensors by role, coeff) -> the new tensors by role (``Effect.params``)."""


@dataclass(frozen=True, eq=False)
class LayerEffect:
    """What a call does at one adapted layer for one adapter.

    ``recompute(spec, p, coeff).params`` gives the adapter's new tensors (by role) from the
    tensors ``p`` the layer holds when it runs; None: its tensors are used as they are.
    ``ops``: what the layer does differently while it runs (:mod:`funcadapt.ops`)."""

    spec: LayerSpec
    recompute: Recompute | None = None
    coeff: Any = None
    ops: tuple[ForwardOp, ...] = ()


@dataclass(frozen=True, eq=False)
class Transformed(Mapping[str, Tensor]):
    """The result of :func:`transform`: what :func:`funcadapt.call` runs a model on.

    ``tree``: the source :class:`AdapterTree`; ``effects``: one :class:`LayerEffect` per
    (layer, adapter) the transform changes. As a ``Mapping`` it reads like the old flat
    dict: every key of ``tree.params``, the transformed tensor where the op changes it and
    the tree's own tensor elsewhere. Where some effect acts at forward time (output
    interpolation, per-row coefficients, ...), iterating it (``dict(params)``) raises, since
    the tensors alone would run c = 1 there; ``params[key]`` still reads single tensors."""

    tree: AdapterTree
    effects: tuple[LayerEffect, ...] = ()
    _eager: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    """Tensors a rule already computed while validating (so the Mapping view does not recompute them)."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def _values(self) -> dict[str, Tensor]:
        """The Mapping view: computed from the tree's tensors on first read, all keys at once. A
        read after one of them changed in place (an optimizer step, or writing values into the model
        key by key) raises instead of mixing old and new; the call always recomputes from what each
        layer holds when it runs, so it never needs this."""
        versions = tuple(_version(t) for t in self.tree.params.values())
        values = self._cache.get("values")
        if values is not None:
            if self._cache["versions"] != versions:
                raise RuntimeError(
                    "the tree's tensors changed in place since these transformed values were read (an optimizer "
                    "step, or values written into the model one key at a time); take them again from a new "
                    "funcadapt.transform(...), and read every value before writing any "
                    "({k: params[k] for k in params.tree.params}). funcadapt.call always uses the current tensors"
                )
            return values
        eager = self._eager if self._cache.get("eager_versions") == versions else {}
        values = self._computed(eager)
        self._cache.update(versions=versions, values=values)
        return values

    def _computed(self, eager: Mapping[str, Tensor]) -> dict[str, Tensor]:
        source = self.tree.params
        out = {**source, **eager}
        batched: dict[float, list[str]] = {}  # number c -> keys of tensors to multiply by c
        for e in self.effects:
            if e.recompute is None or any(key in eager for key in e.spec.keys.values()):
                continue
            if isinstance(e.recompute, Scaling) and isinstance(e.coeff, float):
                keys = [key for role, key in e.spec.keys.items() if role in e.recompute.roles]
                batched.setdefault(e.coeff, []).extend(keys)
                continue
            p = {role: source[key] for role, key in e.spec.keys.items()}  # each effect reads the tree's tensors
            for role, tensor in e.recompute(e.spec, p, e.coeff).params.items():
                out[e.spec.keys[role]] = tensor
        for number, keys in batched.items():  # one foreach op instead of a multiply per layer; same values
            out.update(zip(keys, torch._foreach_mul([source[k] for k in keys], number), strict=True))
        return out

    def __getitem__(self, key: str) -> Tensor:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        """The parameter keys; refused when some effect acts at forward time, because the natural
        next step, ``dict(params)``, would silently drop it (``call`` on that dict runs c = 1 there)."""
        forward = self._op_kinds()
        if forward:
            raise TypeError(
                f"this Transformed has forward-time effects ({', '.join(forward)} at "
                f"{sum(bool(e.ops) for e in self.effects)} layers) that a plain dict of tensors cannot carry; "
                f"pass it to funcadapt.call or AdapterModifier as it is. Single tensors can still be read with "
                f"params[key]; the keys are those of params.tree.params"
            )
        return iter(self.tree.params)

    def __len__(self) -> int:
        return len(self.tree.params)

    def __contains__(self, key: object) -> bool:
        return key in self.tree.params

    def ops_of(self, kind: type[OpT]) -> dict[tuple[str, str], OpT]:
        """``{(layer path, adapter): op}`` for the forward-time ops of one kind (``funcadapt.ops.Interpolate``, ...)."""
        return {(e.spec.path, e.spec.adapter): op for e in self.effects for op in e.ops if isinstance(op, kind)}

    def _op_kinds(self) -> list[str]:
        return sorted({type(op).__name__ for e in self.effects for op in e.ops})

    def __repr__(self) -> str:
        kinds = self._op_kinds()
        recomputed = sum(e.recompute is not None for e in self.effects)
        return (
            f"Transformed({len(self.effects)} layer effects: {recomputed} recompute tensors, forward-time "
            f"{kinds or 'none'})"
        )


def _version(t: Tensor) -> int:
    """Autograd's in-place version counter (−1 where a tensor has none: inference or wrapped tensors)."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):
        return -1


def _flatten(t: Transformed) -> tuple[list[Any], Any]:
    children = [t.tree, [e.coeff for e in t.effects], [e.ops for e in t.effects]]
    return children, tuple((e.spec, e.recompute) for e in t.effects)


def _unflatten(children: Any, context: Any) -> Transformed:
    tree, coeffs, ops = children
    effects = tuple(
        LayerEffect(spec, recompute, c, tuple(o)) for (spec, recompute), c, o in zip(context, coeffs, ops, strict=True)
    )
    return Transformed(tree, effects)


pytree.register_pytree_node(Transformed, _flatten, _unflatten, serialized_type_name="funcadapt.Transformed")


_SEVERAL = (
    "to evaluate several coefficients at once, torch.func.vmap over a 1-d tensor of them (funcadapt.vmap), "
    "give one coefficient per batch row with funcadapt.per_row(...), or use funcadapt.sweep"
)


def _check_coeff(c: Any, where: str) -> Coeff | Varying:
    if isinstance(c, Varying):
        layout = LAYOUTS[type(c)]
        if c.values.dim() not in layout.dims:
            raise ValueError(
                f"{layout.name} coefficients{where} have shape {tuple(c.values.shape)}: plain {layout.name} "
                f"coefficients are given as {layout.plain}, and one vector per {layout.unit} needs groups= "
                f"({layout.build})"
            )
        _check_finite(c.values, where)
        return c
    if is_number(c):
        if torch.compiler.is_compiling():
            _warn_compiled_number()
        _check_finite(c, where)
        return float(c)
    if isinstance(c, Tensor):
        if c.dim() != 0:
            raise ValueError(
                f"coefficient{where} must be a number or a 0-d tensor, got shape {tuple(c.shape)}; {_SEVERAL}; "
                f"for one coefficient per layer group, pass groups= (funcadapt.layer_groups)"
            )
        if not c.is_floating_point():
            c = c.to(torch.get_default_dtype())
        _check_finite(c, where)
        return c
    if isinstance(c, (list, tuple)):
        raise TypeError(
            f"coefficient{where} must be a number or a 0-d tensor, got a {type(c).__name__}; {_SEVERAL}; for "
            f"one coefficient per layer group, pass groups= (funcadapt.layer_groups)"
        )
    raise TypeError(f"coefficient{where} must be a number or a 0-d tensor, got {type(c).__name__}")


_WARNED_COMPILED_NUMBER = False


def _warn_compiled_number() -> None:
    global _WARNED_COMPILED_NUMBER
    if not _WARNED_COMPILED_NUMBER:
        _WARNED_COMPILED_NUMBER = True
        warnings.warn(
            "funcadapt.transform got a Python number as its coefficient inside a torch.compile'd function: "
            "Dynamo specialises on its value, so every new coefficient compiles again (until the recompile "
            "limit, then it runs uncompiled). Pass a 0-d tensor instead (torch.tensor(c)): it compiles once",
            UserWarning,
            stacklevel=3,
        )


def _check_finite(c: Any, where: str) -> None:
    """NaN or ±inf turns every output NaN; refused wherever the value can be read. Under torch.func
    transforms (vmap, grad) and while torch.compile traces, the value is symbolic and not checked."""
    if torch.compiler.is_compiling():
        return
    if isinstance(c, Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(c) or c.device.type == "meta":
            return
        finite = bool(torch.isfinite(c.detach()).all())
    else:
        finite = math.isfinite(c)
    if not finite:
        shown = c.detach().tolist() if isinstance(c, Tensor) else c
        raise ValueError(
            f"coefficient{where} is not finite ({shown}): NaN or ±inf would make every output NaN; give a "
            f"finite coefficient"
        )


def _check_adapters(tree: AdapterTree, names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(tree.adapters))
    for name in unknown:
        if name in tree.left_out:
            raise ValueError(f"coefficient given for adapter {name!r}, which is {tree.left_out[name]}")
    if unknown:
        raise ValueError(f"coefficients given for unknown adapter(s) {unknown}; the tree has {list(tree.adapters)}")


def _per_adapter(tree: AdapterTree, coeff: Any, check: Callable[[Any, str], Any]) -> Callable[[str], Any]:
    """adapter name -> its checked coefficient (None: leave that adapter unchanged)."""
    if isinstance(coeff, Mapping):
        _check_adapters(tree, coeff)
        converted: dict[int, Any] = {}  # one object given for several adapters stays one object
        checked = {}
        for a, c in coeff.items():
            if id(c) not in converted:
                converted[id(c)] = check(c, f" for adapter {a!r}")
            checked[a] = converted[id(c)]
        return checked.get
    c = check(coeff, "")
    return lambda adapter: c


CoeffOf = Callable[[LayerSpec], "Coeff | Varying | None"]
"""(layer, adapter) -> its coefficient; None leaves it unchanged (c = 1)."""


def _coefficients(tree: AdapterTree, coeff: Any, groups: Groups | None) -> CoeffOf:
    """Each (layer, adapter)'s coefficient: its adapter's, or with ``groups`` entry g of its
    adapter's vector, g the layer's group (layers in no group: None)."""
    groups = _groups_given(coeff, groups)
    if groups is None:
        per_adapter = _per_adapter(tree, coeff, _check_coeff)
        return lambda spec: per_adapter(spec.adapter)
    grouping = resolve(tree, groups)
    vectors = _per_adapter(tree, coeff, lambda v, where: check_vector(v, grouping, where, _check_entry))
    return per_layer(grouping, vectors)


def _groups_given(coeff: Any, groups: Groups | None) -> Groups | None:
    """``groups``, or the grouping the per-row vectors carry (funcadapt.per_row(..., groups=)):
    the same one wherever both are given."""
    given = coeff.values() if isinstance(coeff, Mapping) else [coeff]
    for g in (c.groups for c in given if isinstance(c, Varying) and c.groups is not None):
        if groups is None:
            groups = g
        elif g is not groups and g != groups:
            raise ValueError(
                "per-row coefficients were built with one grouping (funcadapt.per_row(..., groups=)) and "
                "transform was given another; give the grouping once"
            )
    return groups


def _check_entry(c: Any, where: str) -> None:
    """A coefficient vector's entries: finite, and a number inside compiled code warns."""
    if is_number(c) and torch.compiler.is_compiling():
        _warn_compiled_number()
    _check_finite(c, where)


def _refuse(rule: Rule, spec: LayerSpec, what: str) -> ValueError:
    reason = rule.no_geometric_reason or f"{rule.doc.adapter} has no group structure"
    return ValueError(
        f"layer {spec.path!r} adapter {spec.adapter!r} ({rule.doc.adapter}): {what} is undefined: {reason}. "
        f"Use mode='linear' (op='scale' with coeff=-1.0 gives the exact antiparallel effect)"
    )


def _chosen(rule: Rule, spec: LayerSpec, mode: str) -> RuleTransform | None:
    """The rule's transform for this layer in ``mode``; None means the output interpolation
    (linear mode) or undefined (geometric mode). On a bitsandbytes base (4-bit or int8), adapters
    acting on the base layer's input interpolate: the int8 kernel quantises its input, and the
    4-bit kernel rounds its output to a bfloat16 grid on some CPUs (AVX512-BF16), so neither is
    linear in its input and a parameter transform there would be exact on one CPU only."""
    if mode == "linear":
        return None if spec.static.get("quantized") and rule.acts_on_input(spec) else rule.linear
    return rule.geometric


def _scaled(rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff, mode: str) -> Effect:
    """The effect of ``scale`` at ``c`` on one (layer, adapter): the rule's transform, or the
    output interpolation (linear mode without an exact transform)."""
    fn = _chosen(rule, spec, mode)
    if fn is not None:
        return fn(spec, p, c)
    if mode == "linear":
        return Effect(ops=(Interpolate(c),))
    raise _refuse(rule, spec, "mode='geometric'")


def _inverted(rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    if rule.invert is not None:
        return rule.invert(spec, p)
    if rule.geometric is None:
        raise _refuse(rule, spec, "op='invert'")
    return rule.geometric(spec, p, -1.0)


def _replacements(tree: AdapterTree, value: Any) -> list[LayerEffect]:
    """``replace``: the given tensors in place of the tree's, one effect per layer, shown when the
    layer runs (a key shared by several layers wherever it is used)."""
    if not isinstance(value, Mapping):
        raise TypeError("op='replace' takes a dict {parameter key: tensor} (a subset of tree.params)")
    _check_known_keys(tree, value, "replace")
    given = {}
    for key, v in value.items():
        old = tree.params[key]
        given[key] = v = torch.as_tensor(v, device=old.device) if not isinstance(v, Tensor) else v
        if not flat_shard(old):  # an FSDP1 shard's shape is checked when the layer shows the full tensor
            _check_shape("replace", key, old.shape, v.shape, broadcast=False)
    effects = []
    for spec in tree.layers:
        new = {role: given[key] for role, key in spec.keys.items() if key in given}
        if new:
            effects.append(LayerEffect(spec, _replacing, new))
    return effects


def _replacing(spec: LayerSpec, p: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> Effect:
    """The given tensors, in the held tensors' dtype (and device)."""
    for role, t in new.items():
        _check_shape("replace", spec.keys[role], p[role].shape, t.shape, broadcast=False)
    return Effect(params={role: t.to(device=p[role].device, dtype=p[role].dtype) for role, t in new.items()})


def _check_known_keys(tree: AdapterTree, value: Mapping[str, Any], op: str) -> None:
    unknown = sorted(set(value) - set(tree.params))
    if unknown:
        raise ValueError(f"{op}: unknown parameter key(s) {unknown[:3]}; keys must come from tree.params")


def _shifts(tree: AdapterTree, value: Any) -> list[LayerEffect]:
    """``shift``: W ↦ W + δ for the chosen tensors, one effect per layer, applied when the layer
    runs (to the tensors it holds then), like every other op. ``value``: a number or 0-d tensor
    for every adapter tensor, ``{adapter: δ}``, or ``{parameter key: tensor}`` (broadcast to the
    tensor's shape). A key shared by several layers is shifted wherever it is used."""
    if isinstance(value, Mapping) and value and set(value) <= set(tree.params):
        by_key = dict(value)
        for key, v in by_key.items():
            old = tree.params[key]
            if isinstance(v, Tensor) and not flat_shard(old):
                _check_shape("shift", key, old.shape, v.shape, broadcast=True)
        deltas = lambda spec: {role: by_key[k] for role, k in spec.keys.items() if k in by_key}  # noqa: E731
    else:
        if isinstance(value, Mapping) and any(k in tree.params for k in value):
            _check_known_keys(tree, value, "shift")
        if isinstance(value, Mapping):
            _check_shift_keys(tree, value)
        per_adapter = _per_adapter(tree, value, _check_coeff)

        def deltas(spec: LayerSpec) -> dict[str, Any]:
            d = per_adapter(spec.adapter)
            if isinstance(d, Varying):
                what = {PerRow: "per_row", PerToken: "per_token", PerImage: "per_image"}[type(d)]
                raise ValueError(
                    f"op='shift' changes raw parameters, which all rows and tokens share; {what} is for op='scale'"
                )
            return {} if d is None else dict.fromkeys(spec.keys, d)

    effects = []
    for spec in tree.layers:
        d = deltas(spec)
        if d:
            effects.append(LayerEffect(spec, _shifted, d))
    return effects


def _check_shift_keys(tree: AdapterTree, value: Mapping[str, Any]) -> None:
    """``shift`` takes ``{adapter: amount}`` or ``{parameter key: tensor}``: a key that is neither is
    named with both readings."""
    unknown = sorted(k for k in value if k not in tree.adapters and k not in tree.left_out and k not in tree.params)
    if unknown:
        example = next(iter(tree.params), "")
        raise ValueError(
            f"shift: {unknown} is neither an adapter name nor a parameter key. op='shift' takes "
            f"{{adapter: amount}} (this tree's adapters: {list(tree.adapters)}) or {{parameter key: tensor}} "
            f"(keys of tree.params, such as {example!r})"
        )


def _shifted(spec: LayerSpec, p: Mapping[str, Tensor], deltas: Mapping[str, Any]) -> Effect:
    """W + δ, in W's dtype and on its device."""
    out = {}
    for role, d in deltas.items():
        if isinstance(d, Tensor):
            _check_shape("shift", spec.keys[role], p[role].shape, d.shape, broadcast=True)
            d = d.to(device=p[role].device, dtype=p[role].dtype)
        out[role] = p[role] + d
    return Effect(params=out)


def _check_shape(op: str, key: str, held: torch.Size, given: torch.Size, broadcast: bool) -> None:
    try:
        fits = (torch.broadcast_shapes(held, given) if broadcast else given) == held
    except RuntimeError:
        fits = False
    if not fits:
        how = "does not broadcast to it" if broadcast else "must have that shape"
        raise ValueError(f"{op}: {key!r} has shape {tuple(held)}; the tensor given, of shape {tuple(given)}, {how}")


def transform(
    tree: AdapterTree, coeff: Any = None, op: Op = "scale", mode: Mode = "linear", groups: Groups | None = None
) -> Transformed:
    """Pure: the tree's parameters with ``op`` applied at coefficient ``coeff``, as a :class:`Transformed`.

    ``coeff``: a number, a 0-d tensor (may require grad, may be vmapped), one coefficient
    per batch row (:func:`funcadapt.per_row`, linear mode), or a dict ``{adapter_name: coeff}``
    (adapters left out are unchanged). For ``shift`` the amount
    added (number, ``{adapter: number}`` or ``{key: tensor}``); for ``replace`` a dict
    ``{key: tensor}``; unused by ``invert`` and ``disable``.

    ``groups`` (``op="scale"``): one coefficient per group of layers (:mod:`funcadapt.groups`):
    ``coeff`` is then a vector ``v`` (a 1-d tensor or a sequence of numbers, one entry per
    group; per-row vectors ``[rows, G]``; or ``{adapter: v}``), and each layer in group ``g``
    gets exactly what the scalar ``v[g]`` gives it. Layers in no group are unchanged.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if groups is not None and op != "scale":
        raise ValueError(
            f"groups= gives one coefficient per layer group, for op='scale'; op={op!r} takes no coefficient per "
            f"group (to switch groups off, scale them by 0: a vector with zeros where they are off)"
        )
    if op in ("shift", "replace"):
        if coeff is None:
            raise ValueError(f"op={op!r} needs a value")
        given = _replacements(tree, coeff) if op == "replace" else _shifts(tree, coeff)
        return Transformed(tree, tuple(given))
    if op == "scale":
        if coeff is None:
            raise ValueError("op='scale' needs a coefficient")
        if groups is None and type(coeff) in (int, float) and coeff == 1.0 and not torch.compiler.is_compiling():
            return Transformed(tree, ())  # every layer's identity, bit for bit (compiled, a number warns below)
        coeff_of = _coefficients(tree, coeff, groups)
    elif coeff is not None:
        raise ValueError(f"op={op!r} takes no coefficient (got {coeff!r}); use op='scale' for a coefficient")

    shared = _jointly_interpolated(tree, coeff_of if op == "scale" else None, op, mode)
    effects: list[LayerEffect] = []
    eager: dict[str, Tensor] = {}
    for spec in tree.layers:
        rule = rule_named(spec.rule)
        if op == "scale":
            c = coeff_of(spec)
            if c is None or (is_number(c) and c == 1.0):
                continue  # identity, bit for bit
            varying = isinstance(c, Varying)
            plain = _plain_scaling(rule, spec, mode) if not varying and spec.path not in shared else None
            if plain is not None:  # ΔW linear in some tensors: nothing to validate, computed when needed
                if not any(role in plain.roles for role in spec.keys):
                    raise RuntimeError(
                        f"layer {spec.path!r} adapter {spec.adapter!r}: the {rule.name!r} rule scales "
                        f"{list(plain.roles)}, but the layer's tensors are {list(spec.keys)}; the coefficient "
                        f"would change nothing. Please report this (layer type {spec.layer_type})"
                    )
                effects.append(LayerEffect(spec, plain, c))
                continue
            recompute: Recompute = functools.partial(_scale_effect, rule, mode=mode, joint=spec.path in shared)
            operand: Any = c
        elif op == "disable":
            recompute, operand = functools.partial(_scaled, rule, mode="linear"), 0.0
        else:
            recompute, operand = functools.partial(_inverted_effect, rule), None
        # run once on the tree's tensors: validates (a bad mode or value raises here, before any call)
        # and gives the forward-time ops, which depend on the spec and coefficient only.
        # Sharded tensors (FSDP2's DTensors) are validated on their local shards, without a graph,
        # and the values are not kept: the call recomputes them from the gathered tensors.
        p = {role: tree.params[key] for role, key in spec.keys.items()}
        if any(is_sharded(t) for t in p.values()):
            with torch.no_grad():
                effect = recompute(spec, {role: local_shard(t) for role, t in p.items()}, operand)
        else:
            effect = recompute(spec, p, operand)
            eager.update((spec.keys[role], t) for role, t in effect.params.items())
        effects.append(LayerEffect(spec, recompute if effect.params else None, operand, effect.ops))
    if torch.compiler.is_compiling():  # the Mapping view is not read in compiled code
        return Transformed(tree, tuple(effects))
    if not eager:
        return Transformed(tree, tuple(effects))
    versions = tuple(_version(t) for t in tree.params.values())
    return Transformed(tree, tuple(effects), _eager=eager, _cache={"eager_versions": versions})


def _inverted_effect(rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor], _: Any) -> Effect:
    return _inverted(rule, spec, p)


def _scale_effect(
    rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff | Varying, mode: str, joint: bool
) -> Effect:
    if isinstance(c, Varying):
        layout = LAYOUTS[type(c)]
        if mode != "linear":
            raise ValueError(
                f"{layout.name} coefficients are defined for mode='linear' only: the per-layer interpolation "
                f"y0 + c·(y1 − y0) is what can differ {layout.unit} by {layout.unit}. For geometric mode, "
                f"{layout.instead}"
            )
        if rule.rows_coupled:
            raise ValueError(
                f"layer {spec.path!r} adapter {spec.adapter!r} ({rule.doc.adapter}): {layout.name} coefficients are "
                f"refused because {rule.rows_coupled}, so no {layout.unit}'s output is its own layer's "
                f"interpolation. Give this adapter one coefficient (a dict per adapter, or adapter_names), or "
                f"{layout.instead}"
            )
        return Effect(ops=(_VARYING_OPS[type(c)](c.values),))
    if joint:
        return Effect(ops=(Interpolate(c),))
    return _scaled(rule, spec, p, c, mode)


_VARYING_OPS: dict[type, Callable[[Tensor], ForwardOp]] = {
    PerRow: InterpolateRows,
    PerToken: InterpolateTokens,
    PerImage: InterpolateImages,
}


def _plain_scaling(rule: Rule, spec: LayerSpec, mode: str) -> Scaling | None:
    """The rule's transform here, when it is a :class:`Scaling` (ΔW linear in some tensors)."""
    fn = _chosen(rule, spec, mode)
    return fn if isinstance(fn, Scaling) else None


def _jointly_interpolated(tree: AdapterTree, coeff_of: CoeffOf | None, op: str, mode: str) -> set[str]:
    """Layers whose adapters must be interpolated together.

    With one coefficient for several adapters on a layer, linear mode promises
    y(c) = y0 + c·(y1 − y0) for the layer as a whole. Per-adapter transforms give that
    only when the adapters' effects add (LoRA family); stacked multiplicative or
    rotation adapters (IA3·IA3, OFT∘OFT, LoRA then DoRA, which renormalises what came
    before) would make the layer polynomial in c, so those layers use the exact output
    interpolation for all their adapters at once. ``invert`` on such a layer is only
    exact when the adapters commute (the inverse of A∘B is B⁻¹∘A⁻¹).
    """
    by_layer: dict[str, list[LayerSpec]] = {}
    for spec in tree.layers:
        by_layer.setdefault(spec.path, []).append(spec)
    joint: set[str] = set()
    for path, specs in by_layer.items():
        if len(specs) < 2:
            continue
        rules = [rule_named(s.rule) for s in specs]
        if op == "invert":
            if not all(r.commutative for r in rules):
                raise ValueError(
                    f"layer {path!r} has several adapters ({[s.adapter for s in specs]}) whose effects do not "
                    f"commute, so inverting each does not invert their composition; invert them one at a time "
                    f"(adapter_names=[...]) or use op='scale' with coeff=-1.0"
                )
            continue
        if op != "scale" or mode != "linear" or all(r.additive for r in rules) or coeff_of is None:
            continue
        coeffs = [coeff_of(s) for s in specs]
        if all(same_coeff(c, coeffs[0]) for c in coeffs[1:]):
            joint.add(path)
    return joint
