"""Functional training: adapter tensors in, new adapter tensors out.

The pieces a JAX-style loop needs on top of :func:`funcadapt.extract`, :func:`funcadapt.transform`
and :func:`funcadapt.call` (docs/functional.md shows the loop in full):

* :func:`trainable` / :func:`combine`: split an :class:`~funcadapt.AdapterTree` into the tensors a
  loop differentiates and updates, and put them back (equinox's ``partition`` / ``combine``).
* :func:`adamw_init` / :func:`adamw_update`: torch.optim.AdamW's math as a pure function of
  (params, grads, state), so one ``torch.func.vmap`` trains K adapters with K learning rates.
* :func:`stack` / :func:`unstack`: K members of the same structure as one dict whose tensors have a
  leading axis of size K (``torch.func.stack_module_state`` for adapters), and back.
* :func:`load_params`: write one member into the model's own adapter Parameters, so the model
  holds it as an ordinary PEFT adapter (``model.save_pretrained`` saves it).

Nothing here mutates its inputs except :func:`load_params`, whose purpose that is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .tree import AdapterTree, LayerSpec

UNBATCHABLE: Mapping[str, str] = {
    "frod": (
        "PEFT's FRoD forward builds a sparse COO tensor (torch.sparse_coo_tensor) from its trainable values, "
        "and torch.func.vmap has no batching rule for sparse tensors"
    ),
}
"""Rules whose parameters ``torch.func.vmap`` cannot batch, with the reason; :func:`stack` refuses them.
(vmap over the *coefficient* works for every rule: it only changes how a layer's output is combined.)"""


def trainable(tree: AdapterTree) -> dict[str, Tensor]:
    """``{key: tensor}`` for the tree's tensors that require grad, as detached copies.

    What a functional loop differentiates and updates; the frozen adapter tensors stay in
    ``tree`` and :func:`combine` puts the two back together. Copies, so no update of these
    touches the model's own Parameters (that is :func:`load_params`'s job)."""
    return {key: t.detach().clone() for key, t in tree.params.items() if t.requires_grad}


def combine(tree: AdapterTree, params: Mapping[str, Tensor]) -> AdapterTree:
    """The tree with ``params[key]`` in place of ``tree.params[key]`` for every key given, the tree's
    own tensors elsewhere (equinox's ``combine`` for the split :func:`trainable` makes).

    ``funcadapt.transform(combine(tree, params), c)`` is then a differentiable, vmappable function
    of ``params`` and ``c``: :func:`funcadapt.call` shows the given tensors to the model the way
    ``torch.func.functional_call`` does. Unknown keys raise."""
    unknown = sorted(set(params) - set(tree.params))
    if unknown:
        raise ValueError(
            f"params has key(s) {unknown[:3]} that are not in the tree; keys must come from tree.params "
            f"(funcadapt.trainable(tree) gives the ones a loop trains)"
        )
    return tree.with_params({**tree.params, **params})


# ---------------------------------------------------------------------------------------------
# AdamW as a pure update


class AdamWState(NamedTuple):
    """AdamW's state, a pytree: ``step`` (0-d float32 tensor, updates taken so far; shape (K,)
    for a stacked ensemble), ``exp_avg`` (m) and ``exp_avg_sq`` (v), each ``{key: tensor}``."""

    step: Tensor
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


def adamw_init(params: Mapping[str, Tensor]) -> AdamWState:
    """The state before the first update: step 0, m = v = 0 (each like its tensor), as
    ``torch.optim.AdamW`` starts. For a stacked ensemble, ``funcadapt.vmap(adamw_init)(stacked)``."""
    zeros = {key: torch.zeros_like(t) for key, t in params.items()}
    return AdamWState(torch.zeros((), dtype=torch.float32), zeros, {key: z.clone() for key, z in zeros.items()})


def adamw_update(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: AdamWState,
    *,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> tuple[dict[str, Tensor], AdamWState]:
    """One AdamW step, pure: (new params, new state); nothing is modified in place.

    The math of ``torch.optim.AdamW`` (its defaults too; amsgrad, maximize and the other options
    are not offered), for every key, with g its gradient and t = step + 1::

        p ← p · (1 − lr·λ)                         decoupled weight decay, λ = weight_decay
        m ← β₁·m + (1 − β₁)·g
        v ← β₂·v + (1 − β₂)·g²
        p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    ``lr`` may be a 0-d tensor, vmapped with the params: K learning rates for K members. The
    bias corrections are computed in float32 from the tensor ``step`` (torch.optim computes them
    in float64 from a Python number), a difference of order 1e-7 relative. A tensor the loss does
    not use gets a zero gradient from ``torch.func.grad``, so weight decay still shrinks it, where
    torch.optim (no ``.grad``) would skip it."""
    missing = sorted(set(params) - set(grads))
    if missing:
        raise ValueError(f"grads has no entry for {missing[:3]}; give one gradient per parameter")
    beta1, beta2 = betas
    step = state.step + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    new_params, exp_avg, exp_avg_sq = {}, {}, {}
    for key, p in params.items():
        g = grads[key]
        m = state.exp_avg[key].lerp(g, 1 - beta1)
        v = state.exp_avg_sq[key] * beta2 + (1 - beta2) * g * g
        denom = v.sqrt() / bias_correction2_sqrt + eps
        new_params[key] = p * (1 - lr * weight_decay) - (lr / bias_correction1) * (m / denom)
        exp_avg[key], exp_avg_sq[key] = m, v
    return new_params, AdamWState(step, exp_avg, exp_avg_sq)


# ---------------------------------------------------------------------------------------------
# ensembles


def stack(tree: AdapterTree, members: Sequence[AdapterTree | Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """K members -> ``{key: torch.stack([member[key] for member in members])}``: one dict whose
    tensors have a leading axis of size K, for ``funcadapt.vmap`` over members (what
    ``torch.func.stack_module_state`` does for whole models).

    A member is ``{key: tensor}`` keyed like ``trainable(tree)`` (the same keys in every member),
    or an :class:`AdapterTree` (``extract`` of another model with the same adapter config: its
    trainable tensors are taken, and its layers must equal the tree's, static parts included, e.g.
    PEFT's scaling α/r). Every tensor must have the tree's shape and dtype: members of different
    ranks are refused, not padded (α/r and other rank-dependent constants are part of the static
    structure that all members share). Rules whose parameters vmap cannot batch
    (:data:`UNBATCHABLE`) are refused by name."""
    if not members:
        raise ValueError("stack needs at least one member")
    dicts = [_member_tensors(tree, m, i) for i, m in enumerate(members)]
    keys = set(dicts[0])
    _refuse_unbatchable(tree, keys)
    for i, d in enumerate(dicts):
        if set(d) != keys:
            missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
            raise ValueError(
                f"member {i} has other keys than member 0 (missing {missing[:3]}, extra {extra[:3]}); every member "
                f"must have the same keys, e.g. funcadapt.trainable(tree)"
            )
    unknown = sorted(keys - set(tree.params))
    if unknown:
        raise ValueError(f"member keys {unknown[:3]} are not in the tree; keys must come from tree.params")
    by_key = _spec_of(tree)
    for key in sorted(keys):
        want = tree.params[key]
        for i, d in enumerate(dicts):
            got = d[key]
            if got.shape != want.shape:
                spec = by_key[key]
                raise ValueError(
                    f"member {i}'s {key!r} has shape {tuple(got.shape)}, the tree's has {tuple(want.shape)} (layer "
                    f"{spec.path!r}, {spec.rule} adapter {spec.adapter!r}): members of an ensemble must have the same "
                    f"shapes. Different ranks (or sizes) are refused rather than padded, because the static parts "
                    f"every member shares (PEFT's scaling α/r, ...) depend on them: train members of different "
                    f"configs as separate ensembles"
                )
            if got.dtype != want.dtype:
                raise ValueError(
                    f"member {i}'s {key!r} is {got.dtype}, the tree's is {want.dtype}; cast it to the tree's dtype"
                )
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}


def unstack(stacked: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """The K members of a :func:`stack`-ed dict (or a vmapped result keyed the same way), each
    ``{key: tensor}``, as copies: ``unstack(stacked)[k][key] == stacked[key][k]``."""
    sizes = {t.shape[0] if t.dim() else None for t in stacked.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every stacked tensor needs the same leading (member) axis; found sizes {sorted(map(str, sizes))}"
        )
    (k,) = sizes
    return [{key: t[i].clone() for key, t in stacked.items()} for i in range(k or 0)]


def load_params(tree: AdapterTree, params: Mapping[str, Tensor]) -> None:
    """Write ``params`` into the model's own adapter Parameters (``tree`` must come from
    :func:`funcadapt.extract` on that model): ``tree.params[key].copy_(params[key])`` for every key
    given, without recording a gradient. The model then *is* that adapter: plain forwards,
    ``AdapterModifier``, ``model.save_pretrained(dir)`` all use it. Shapes and dtypes must match
    exactly; a stacked dict is refused (write one member: ``unstack(stacked)[k]``)."""
    if not tree.own:
        raise ValueError(
            "this tree's tensors are not the model's own Parameters (it was re-created by with_params, combine or a "
            "torch.func transform); pass funcadapt.extract(model) to write into the model"
        )
    unknown = sorted(set(params) - set(tree.params))
    if unknown:
        raise ValueError(f"params has key(s) {unknown[:3]} that are not in the tree")
    for key, value in params.items():
        target = tree.params[key]
        if value.shape != target.shape:
            stacked = value.dim() == target.dim() + 1 and value.shape[1:] == target.shape
            hint = "; it looks stacked: write one member, funcadapt.unstack(stacked)[k]" if stacked else ""
            raise ValueError(
                f"params[{key!r}] has shape {tuple(value.shape)}, the model's has {tuple(target.shape)}{hint}"
            )
        if value.dtype != target.dtype:
            raise ValueError(f"params[{key!r}] is {value.dtype}, the model's is {target.dtype}; cast it first")
    with torch.no_grad():
        for key, value in params.items():
            tree.params[key].copy_(value)


def _member_tensors(tree: AdapterTree, member: AdapterTree | Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    if not isinstance(member, AdapterTree):
        return dict(member)
    if member.layers != tree.layers:
        raise ValueError(
            f"member {index} {_first_difference(tree.layers, member.layers)}; members must share the tree's structure"
        )
    return trainable(member)


def _first_difference(want: tuple[LayerSpec, ...], got: tuple[LayerSpec, ...]) -> str:
    if len(want) != len(got):
        return f"has {len(got)} adapter layers, the tree {len(want)}"
    for a, b in zip(want, got, strict=True):
        if a != b:
            fields = [
                f for f in ("path", "adapter", "rule", "layer_type", "keys", "static") if getattr(a, f) != getattr(b, f)
            ]
            detail = {f: (getattr(b, f), getattr(a, f)) for f in fields if f != "keys"}
            return f"differs from the tree at layer {a.path!r} in {fields} (member, tree: {detail})"
    return "differs from the tree"


def _spec_of(tree: AdapterTree) -> dict[str, LayerSpec]:
    return {key: spec for spec in tree.layers for key in spec.keys.values()}


def _refuse_unbatchable(tree: AdapterTree, keys: set[str]) -> None:
    for spec in tree.layers:
        reason = UNBATCHABLE.get(spec.rule)
        if reason is not None and keys & set(spec.keys.values()):
            raise ValueError(
                f"layer {spec.path!r} adapter {spec.adapter!r} uses the {spec.rule!r} rule, whose parameters cannot be "
                f"stacked for vmap: {reason}. Train such members one at a time (the same functional step without "
                f"the vmap over members); vmap over the coefficient still works"
            )
