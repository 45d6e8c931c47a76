"""Pure transforms of an :class:`AdapterTree`'s parameters.

``transform(tree, coeff, op, mode)`` returns a new ``dict[str, Tensor]``: the tree's
keys, with new tensors where the op changes something and the tree's own tensors
elsewhere. Nothing is mutated. Where an adapter has no exact parameter-space form for
the requested coefficient, the result also carries a forward-time entry under a key
``"@funcadapt.<name>.<adapter>.<layer path>"``; :func:`funcadapt.call` turns those into
the exact fallback. Passing such params straight to ``torch.func.functional_call``
fails loudly (``@funcadapt`` is not a submodule) instead of silently dropping them.

Ops (``mode`` applies to ``scale``):

* ``scale``   coefficient c. ``mode="linear"``: y(c) = y0 + c·(y1 − y0) at each adapted
  layer, per adapter. ``mode="geometric"``: c scales the adapter's generator.
* ``invert``  the exact inverse effect (geometric c = −1 where that is exact).
* ``disable`` c = 0: exactly the base model.
* ``shift``   raw parameters + value (a number, ``{adapter: number}`` or ``{key: tensor}``).
* ``replace`` raw parameters replaced by ``{key: tensor}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .rows import PerRow
from .rules.base import Coeff, Effect, Rule, Scaling, is_number, rule_named, same_coeff
from .tree import AdapterTree, LayerSpec

OPS = ("scale", "invert", "disable", "shift", "replace")
MODES = ("linear", "geometric")
FORWARD_PREFIX = "@funcadapt."


def forward_key(name: str, adapter: str, path: str) -> str:
    return f"{FORWARD_PREFIX}{name}.{adapter}.{path}"


def parse_forward_key(key: str) -> tuple[str, str, str]:
    """``"@funcadapt.<name>.<adapter>.<path>"`` -> (name, adapter, path)."""
    _, name, adapter, path = key.split(".", 3)
    return name, adapter, path


def _check_coeff(c: Any, where: str) -> Coeff | PerRow:
    if isinstance(c, PerRow):
        return c
    if is_number(c):
        return float(c)
    if isinstance(c, Tensor):
        if c.dim() != 0:
            raise ValueError(
                f"coefficient{where} must be a number or a 0-d tensor, got shape {tuple(c.shape)}; to evaluate "
                f"several coefficients at once, torch.func.vmap over them (see funcadapt.vmap), or give one "
                f"coefficient per batch row with funcadapt.per_row(...)"
            )
        if not c.is_floating_point():
            c = c.to(torch.get_default_dtype())
        return c
    raise TypeError(f"coefficient{where} must be a number or a 0-d tensor, got {type(c).__name__}")


def _per_adapter(tree: AdapterTree, coeff: Any) -> Callable[[str], Coeff | PerRow | None]:
    """adapter name -> its coefficient (None: leave that adapter unchanged)."""
    if isinstance(coeff, Mapping):
        unknown = sorted(set(coeff) - set(tree.adapters))
        if unknown:
            raise ValueError(f"coefficients given for unknown adapter(s) {unknown}; the tree has {list(tree.adapters)}")
        converted: dict[int, Coeff | PerRow] = {}  # one object given for several adapters stays one object
        checked = {}
        for a, c in coeff.items():
            if id(c) not in converted:
                converted[id(c)] = _check_coeff(c, f" for adapter {a!r}")
            checked[a] = converted[id(c)]
        return checked.get
    c = _check_coeff(coeff, "")
    return lambda adapter: c


def _refuse(rule: Rule, spec: LayerSpec, what: str) -> ValueError:
    reason = rule.no_geometric_reason or f"{rule.doc.adapter} has no group structure"
    return ValueError(
        f"layer {spec.path!r} adapter {spec.adapter!r} ({rule.doc.adapter}): {what} is undefined: {reason}. "
        f"Use mode='linear' (op='scale' with coeff=-1.0 gives the exact antiparallel effect)"
    )


def _chosen(rule: Rule, spec: LayerSpec, mode: str) -> Callable[[Any, Mapping[str, Tensor], Coeff], Effect] | None:
    """The rule's transform for this layer in ``mode``; None means the output interpolation
    (linear mode) or undefined (geometric mode). On an int8 base, adapters acting on the base
    layer's input interpolate: the int8 kernel quantises its input, so it is not linear in it."""
    if mode == "linear":
        return None if spec.static.get("quantized") == "int8" and rule.acts_on_input(spec) else rule.linear
    return rule.geometric


def _scaled(rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor], c: Coeff, mode: str) -> Effect:
    fn = _chosen(rule, spec, mode)
    if fn is not None:
        return fn(spec, p, c)
    if mode == "linear":
        return Effect(forward={"interp": c})
    raise _refuse(rule, spec, "mode='geometric'")


def _inverted(rule: Rule, spec: LayerSpec, p: Mapping[str, Tensor]) -> Effect:
    if rule.invert is not None:
        return rule.invert(spec, p)
    if rule.geometric is None:
        raise _refuse(rule, spec, "op='invert'")
    return rule.geometric(spec, p, -1.0)


def _raw_updates(tree: AdapterTree, value: Any, op: str) -> dict[str, Tensor]:
    """Per-key updates for shift / replace, validated against the tree."""
    if op == "replace" or (isinstance(value, Mapping) and value and set(value) <= set(tree.params)):
        if not isinstance(value, Mapping):
            raise TypeError("op='replace' takes a dict {parameter key: tensor} (a subset of tree.params)")
        unknown = sorted(set(value) - set(tree.params))
        if unknown:
            raise ValueError(f"{op}: unknown parameter key(s) {unknown[:3]}; keys must come from tree.params")
        out = {}
        for key, v in value.items():
            old = tree.params[key]
            v = torch.as_tensor(v, device=old.device) if not isinstance(v, Tensor) else v
            if op == "replace" and v.shape != old.shape:
                raise ValueError(f"replace: {key!r} has shape {tuple(old.shape)}, got {tuple(v.shape)}")
            out[key] = v.to(old.dtype) if op == "replace" else (old + v.to(old.dtype))
        return out
    per_adapter = _per_adapter(tree, value)
    out = {}
    for spec in tree.layers:
        d = per_adapter(spec.adapter)
        if d is None:
            continue
        if isinstance(d, PerRow):
            raise ValueError("op='shift' changes raw parameters, which all rows share; per_row is for op='scale'")
        for key in spec.keys.values():
            old = tree.params[key]
            out[key] = old + (d.to(device=old.device, dtype=old.dtype) if isinstance(d, Tensor) else d)
    return out


def transform(tree: AdapterTree, coeff: Any = None, op: str = "scale", mode: str = "linear") -> dict[str, Any]:
    """Pure: the tree's parameters with ``op`` applied at coefficient ``coeff``.

    ``coeff``: a number, a 0-d tensor (may require grad, may be vmapped), one coefficient
    per batch row (:func:`funcadapt.per_row`, linear mode), or a dict ``{adapter_name: coeff}``
    (adapters left out are unchanged). For ``shift`` the amount
    added (number, ``{adapter: number}`` or ``{key: tensor}``); for ``replace`` a dict
    ``{key: tensor}``; unused by ``invert`` and ``disable``.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    out: dict[str, Any] = dict(tree.params)
    if op in ("shift", "replace"):
        if coeff is None:
            raise ValueError(f"op={op!r} needs a value")
        out.update(_raw_updates(tree, coeff, op))
        return out
    if op == "scale":
        if coeff is None:
            raise ValueError("op='scale' needs a coefficient")
        per_adapter = _per_adapter(tree, coeff)
    elif coeff is not None:
        raise ValueError(f"op={op!r} takes no coefficient (got {coeff!r}); use op='scale' for a coefficient")

    shared = _jointly_interpolated(tree, per_adapter if op == "scale" else None, op, mode)
    batched: dict[float, list[str]] = {}  # number c -> keys of tensors to multiply by c
    for spec in tree.layers:
        rule = rule_named(spec.rule)
        if op == "scale":
            c = per_adapter(spec.adapter)
            if c is None or (is_number(c) and c == 1.0):
                continue  # identity, bit for bit
            plain = _plain_scaling(rule, spec, mode) if isinstance(c, float) and spec.path not in shared else None
            if plain is not None:
                assert isinstance(c, float)
                batched.setdefault(c, []).extend(key for role, key in spec.keys.items() if role in plain.roles)
                continue
            effect = _scale_effect(rule, spec, tree, c, mode, spec.path in shared)
        else:
            p = {role: tree.params[key] for role, key in spec.keys.items()}
            effect = _scaled(rule, spec, p, 0.0, "linear") if op == "disable" else _inverted(rule, spec, p)
        for role, tensor in effect.params.items():
            out[spec.keys[role]] = tensor
        for name, value in effect.forward.items():
            out[forward_key(name, spec.adapter, spec.path)] = value
    for number, keys in batched.items():  # one foreach op instead of a multiply per layer; same values
        out.update(zip(keys, torch._foreach_mul([tree.params[k] for k in keys], number), strict=True))
    return out


def _scale_effect(rule: Rule, spec: LayerSpec, tree: AdapterTree, c: Coeff | PerRow, mode: str, joint: bool) -> Effect:
    if isinstance(c, PerRow):
        if mode != "linear":
            raise ValueError(
                "per-row coefficients (funcadapt.per_row) are defined for mode='linear' only: the "
                "per-layer interpolation y0 + c·(y1 − y0) is what can differ row by row. For geometric "
                "mode, run each coefficient separately or torch.func.vmap over them"
            )
        if rule.rows_coupled:
            raise ValueError(
                f"layer {spec.path!r} adapter {spec.adapter!r} ({rule.doc.adapter}): per-row coefficients are "
                f"refused because {rule.rows_coupled}, so no row can equal running its coefficient alone. Run "
                f"each coefficient as its own call, or torch.func.vmap over the coefficients (funcadapt.vmap), "
                f"which keeps the batches apart"
            )
        return Effect(forward={"rows": c.values})
    if joint:
        return Effect(forward={"interp": c})
    return _scaled(rule, spec, {role: tree.params[key] for role, key in spec.keys.items()}, c, mode)


def _plain_scaling(rule: Rule, spec: LayerSpec, mode: str) -> Scaling | None:
    """The rule's transform here, when it is a :class:`Scaling` (ΔW linear in some tensors)."""
    fn = _chosen(rule, spec, mode)
    return fn if isinstance(fn, Scaling) else None


def _jointly_interpolated(
    tree: AdapterTree, per_adapter: Callable[[str], Coeff | PerRow | None] | None, op: str, mode: str
) -> set[str]:
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
        if op != "scale" or mode != "linear" or all(r.additive for r in rules) or per_adapter is None:
            continue
        coeffs = [per_adapter(s.adapter) for s in specs]
        if all(same_coeff(c, coeffs[0]) for c in coeffs[1:]):
            joint.add(path)
    return joint
