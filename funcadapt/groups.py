"""Coefficient fields: one coefficient per group of adapter layers.

A *group* is a set of adapter layers (module paths) that share one coefficient. With
``groups``, :func:`funcadapt.transform` takes a coefficient *vector* ``v`` with one entry per
group, and every adapter layer in group ``g`` gets exactly what ``transform`` with the scalar
``v[g]`` gives that layer, in either mode::

    linear:     y_layer(v) = y0 + v[g]·(y1 − y0)            (per layer, per adapter)
    geometric:  the layer's generator scaled by v[g]

Layers in no group are left as trained (c = 1). The vector may be a tensor that requires
grad (the gradient of a metric with respect to each group's coefficient), may be vmapped (a
population of vectors, shape ``[P, G]``), or may give each batch row its own vector
(:func:`funcadapt.per_row` with ``groups``, shape ``[rows, G]``). A plain sequence of numbers
is taken as numbers, so its entries equal to 1 cost nothing.

``layer_groups(tree, by)`` builds the grouping: ``"block"`` (the repeated block a layer sits
in: ``model.layers.3.self_attn.q_proj`` is in block ``"3"``), ``"layer"`` (one group per
adapter layer), ``"module"`` (the layer's own name, ``q_proj``), or a function from a layer's
path to a group name (None: in no group).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

from .images import PerImage
from .rows import PerRow
from .rules.base import Coeff, is_number
from .tokens import PerToken
from .tree import AdapterTree, LayerSpec

By = Literal["block", "layer", "module"]
BY: tuple[By, ...] = ("block", "layer", "module")
Groups: TypeAlias = "Mapping[str, Sequence[str]] | By | Callable[[str], str | None]"
"""What ``groups=`` takes: a mapping ``{group name: layer paths}`` (as :func:`layer_groups`
returns), or a ``by`` for :func:`layer_groups`."""

_WRAPPER = re.compile(r"^base_model\.model\.")  # PEFT's wrapper prefix, left out of group names


def _short(path: str) -> str:
    return _WRAPPER.sub("", path)


def _block(path: str) -> tuple[str, str] | None:
    """(container path, index) of the first numbered component of ``path``, or None. A diffusers UNet's
    ``mid_block`` is one block between its numbered ``down_blocks`` and ``up_blocks``: (its parent,
    ``"mid_block"``)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), part
        if part == "mid_block":
            return ".".join(parts[:i]), part
    return None


def _paths(tree: AdapterTree) -> list[str]:
    """The tree's adapter layer paths, once each, in model order."""
    return list(dict.fromkeys(spec.path for spec in tree.layers))


def _by_block(paths: list[str]) -> Callable[[str], str]:
    """Group name = the block index when all blocks sit in one container (``"3"``), else the
    container and index (``"encoder.block.3"``); a layer outside any block is its own group."""
    containers = {found[0] for found in map(_block, paths) if found is not None}

    def name(path: str) -> str:
        found = _block(path)
        if found is None:
            return _short(path)
        container, index = found
        if len(containers) == 1:
            return index
        return f"{_short(container + '.')}{index}" if container else index

    return name


def layer_groups(tree: AdapterTree, by: By | Callable[[str], str | None] = "block") -> dict[str, tuple[str, ...]]:
    """Group name -> the adapter layer paths in it, both in model order; each adapter layer is in
    at most one group (exactly one, unless ``by`` is a function that returns None for it).

    ``by``: ``"block"`` (the numbered block a layer sits in, named by its index, ``"3"``; layers
    outside any block, such as ``lm_head``, are each their own group, named by their path),
    ``"layer"`` (one group per adapter layer, named by its path), ``"module"`` (the layer's own
    attribute name: ``q_proj``, ``down_proj``), or a function ``path -> group name or None``.
    """
    paths = _paths(tree)
    name_of: Callable[[str], str | None]
    if callable(by):
        name_of = by
    elif by == "block":
        name_of = _by_block(paths)
    elif by == "layer":
        name_of = _short
    elif by == "module":
        name_of = lambda path: path.rsplit(".", 1)[-1]  # noqa: E731
    else:
        raise ValueError(f"unknown grouping by={by!r}; choose one of {BY} or give a function path -> group name")
    groups: dict[str, list[str]] = {}
    for path in paths:
        name = name_of(path)
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"the grouping function returned {name!r} for layer {path!r}; return a str or None")
        groups.setdefault(name, []).append(path)
    if not groups:
        raise ValueError(f"the grouping put none of the tree's {len(paths)} adapter layers in a group")
    return {name: tuple(members) for name, members in groups.items()}


@dataclass(frozen=True)
class Grouping:
    """A resolved grouping: the group names in order, and each grouped layer path's group index."""

    names: tuple[str, ...]
    index: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.names)


def resolve(tree: AdapterTree, groups: Groups) -> Grouping:
    """``groups`` checked against the tree: every path an adapter layer of it, none in two groups,
    no group empty (its coefficient would be ignored)."""
    given = layer_groups(tree, groups) if isinstance(groups, str) or callable(groups) else groups
    if not isinstance(given, Mapping):
        raise TypeError(
            f"groups must be a mapping {{group name: layer paths}} (funcadapt.layer_groups), one of {BY}, or a "
            f"function path -> group name; got {type(given).__name__}"
        )
    known = set(_paths(tree))
    index: dict[str, int] = {}
    for i, (name, members) in enumerate(given.items()):
        if isinstance(members, str):
            raise TypeError(f"group {name!r}: give a sequence of layer paths, not one string ({members!r})")
        if not members:
            raise ValueError(f"group {name!r} has no adapter layer, so its coefficient would change nothing")
        for path in members:
            if path not in known:
                some = f"{sorted(known)[:4]}{' …' if len(known) > 4 else ''}"
                raise ValueError(
                    f"group {name!r} names {path!r}, which is not an adapter layer of this tree; build groups with "
                    f"funcadapt.layer_groups(tree, by=...) (layers: {some})"
                )
            if path in index:
                raise ValueError(
                    f"layer {path!r} is in two groups ({list(given)[index[path]]!r} and {name!r}); each layer "
                    f"takes one coefficient"
                )
            index[path] = i
    return Grouping(tuple(str(name) for name in given), index)


Varying = PerRow | PerToken | PerImage
"""Coefficients that vary over the batch: per row, per token, per image (and denoising step)."""


@dataclass(frozen=True)
class Layout:
    """How a kind of :data:`Varying` coefficients is laid out: its ``values`` have one of ``dims``
    dimensions (plus a group axis with ``groups``); ``plain`` and ``grouped`` are the shapes a user gives;
    ``instead``: what to do where they are refused (geometric mode, rules whose rows are coupled)."""

    name: str
    unit: str
    build: str
    dims: tuple[int, ...]
    plain: str
    grouped: str
    instead: str


LAYOUTS: dict[type, Layout] = {
    PerRow: Layout(
        "per-row",
        "row",
        "funcadapt.per_row(vectors, groups=...)",
        (1,),
        "[rows]",
        "[rows, {G}]",
        "run each coefficient as its own call, or torch.func.vmap over the coefficients (funcadapt.vmap), which "
        "keeps the batches apart",
    ),
    PerToken: Layout(
        "per-token",
        "token",
        "funcadapt.per_token(values, groups=...)",
        (1, 2),
        "[B, L] or [L]",
        "[B, L, {G}] or [L, {G}]",
        "run each coefficient as its own call",
    ),
    # PerImage holds [H, N] or [S, H, N] (see funcadapt.images), built from these shapes
    PerImage: Layout(
        "per-image",
        "image",
        "funcadapt.per_image(values, groups=...), funcadapt.per_step(values, groups=...)",
        (2, 3),
        "[N], [S] or [S, N]",
        "[N, {G}], [S, {G}] or [S, N, {G}]",
        "run one pipeline call per coefficient",
    ),
}


Vector: TypeAlias = "Tensor | tuple[float, ...] | PerRow | PerToken | PerImage"
"""A checked coefficient vector: a 1-d tensor, numbers, or :data:`Varying` coefficients with a group axis."""


def check_vector(v: Any, grouping: Grouping, where: str, check_finite: Callable[[Any, str], None]) -> Vector:
    """``v`` as one coefficient per group, or a clear error."""
    size = len(grouping)
    shown = f"{size} groups ({', '.join(grouping.names[:6])}{' …' if size > 6 else ''})"
    if isinstance(v, Varying):
        layout = LAYOUTS[type(v)]
        if v.groups is None:
            raise ValueError(
                f"coefficient{where} was built without groups, and transform was given a grouping: build it with "
                f"the grouping ({layout.build}), so that its last axis is read as one entry per group"
            )
        values = v.values
        if values.dim() - 1 not in layout.dims or values.shape[-1] != size:
            raise ValueError(
                f"{layout.name} coefficients{where} with groups must be given as {layout.grouped.format(G=size)}, "
                f"one vector per {layout.unit} ({layout.build}), got {tuple(values.shape)}; the grouping has {shown}"
            )
        check_finite(values, where)
        return v
    if isinstance(v, Tensor):
        if v.dim() != 1 or v.shape[0] != size:
            raise ValueError(
                f"coefficient{where} with groups must be a 1-d tensor with one entry per group, shape "
                f"[{size}], got {tuple(v.shape)}; the grouping has {shown} (to evaluate several vectors, "
                f"torch.func.vmap over a [P, {size}] tensor, or give each row its own with funcadapt.per_row)"
            )
        if not v.is_floating_point():
            v = v.to(torch.get_default_dtype())
        check_finite(v, where)
        return v
    if isinstance(v, Sequence) and not isinstance(v, str) and all(is_number(x) for x in v):
        if len(v) != size:
            raise ValueError(f"coefficient{where} has {len(v)} entries; the grouping has {shown}")
        numbers = tuple(float(x) for x in v)
        for x in numbers:
            check_finite(x, where)
        return numbers
    raise TypeError(
        f"coefficient{where} with groups must be a 1-d tensor or a sequence of numbers, one per group; got "
        f"{type(v).__name__}; the grouping has {shown}"
    )


def entry(vector: Vector, g: int) -> Coeff | PerRow | PerToken | PerImage:
    """Group ``g``'s coefficient: a number, a 0-d tensor (vmapped or requiring grad as the vector
    is), one coefficient per row, per token, or per image."""
    if isinstance(vector, Varying):
        return dataclasses.replace(vector, values=vector.values[..., g], groups=None)
    return vector[g]


def per_layer(
    grouping: Grouping, vectors: Callable[[str], Vector | None]
) -> Callable[[LayerSpec], Coeff | PerRow | PerToken | PerImage | None]:
    """(layer, adapter) -> its coefficient: entry ``g`` of its adapter's vector, g the layer's group
    (None: the layer is in no group, or the adapter has no vector; left unchanged). One object per
    (vector, group), so adapters on one layer given one vector share one coefficient object."""
    cache: dict[tuple[int, int], Coeff | PerRow | PerToken | PerImage] = {}

    def coeff_of(spec: LayerSpec) -> Coeff | PerRow | PerToken | PerImage | None:
        g = grouping.index.get(spec.path)
        vector = vectors(spec.adapter)
        if g is None or vector is None:
            return None
        key = (id(vector), g)
        if key not in cache:
            cache[key] = entry(vector, g)
        return cache[key]

    return coeff_of
