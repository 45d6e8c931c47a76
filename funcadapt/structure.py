"""A model's static structure, computed once and reused while the model does not change.

``extract`` and ``call`` both need the module tree: which modules are adapter layers,
which tensors belong to which adapter, tied parameter names, the bitsandbytes layers.
Walking a 135M-parameter model's ~2,500 modules with ``named_modules`` and
``named_parameters`` costs tens of milliseconds per call, so :func:`structure` caches
the result per model and revalidates it on every use with a *fingerprint*: the identity
of every module and every parameter, in tree order (one cheap pass, no path strings).
Adding, deleting or replacing an adapter, a layer or a Parameter changes the fingerprint
and rebuilds the structure; state that can change without that (active adapters,
``disable_adapter()``, merging, PEFT's float ``scaling``, hooks, checkpointing flags)
is never cached and is read live by the callers.

The cache holds the model's submodules (not the root) and adapter tensors, so object ids
in a fingerprint cannot be reused while it is cached; it is keyed by the root's id and
dropped by a finalizer when the root is collected, so it goes away with the model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import engines, models
from .quantized import BNB_LINEARS, base_of, check_supported
from .quantized import kind as quantized_kind
from .rules import base
from .rules.base import LayerSpec, Rule, access_of, is_adapter_layer


class _Strong:
    """A plain reference with weakref.ref's call interface."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def _hold(module: nn.Module, root: nn.Module) -> Callable[[], Any]:
    """A reference that keeps ``module`` alive unless it is the root: the cache entry goes when the root
    is collected, and a strong reference to it from the cached value would keep the model alive forever."""
    return weakref.ref(module) if module is root else _Strong(module)


@dataclass
class AdapterLayer:
    """One adapter layer: its tensors per adapter (role -> (key, tensor)) and quantization kind."""

    path: str
    ref: Callable[[], Any]
    entries: dict[str, dict[str, tuple[str, Tensor]]]
    rules: dict[str, Rule | None]
    quantized: str | None
    local: dict[str, dict[str, str]] = field(default_factory=dict)
    """adapter -> role -> the tensor's key through this layer's own path (differs from the tree key
    only for a Parameter also registered elsewhere, which the tree keys under its first name)."""
    specs: dict[str, Any] = field(default_factory=dict)
    """adapter -> the last LayerSpec extract built (reused while its live static part is unchanged)."""
    tensors: dict[str, dict[str, Tensor]] = field(init=False)
    """adapter -> {key: tensor}, what extract puts in the tree."""

    def __post_init__(self) -> None:
        self.tensors = {a: {key: t for key, t in e.values()} for a, e in self.entries.items()}

    @property
    def layer(self) -> Any:
        return self.ref()


@dataclass
class Structure:
    fingerprint: tuple[int, ...]
    modules: dict[str, nn.Module]
    """``named_modules(remove_duplicate=False)`` without the root (path ``""``)."""
    layers: list[AdapterLayer]
    """Adapter layers in ``named_modules()`` order, each module once."""
    aliases: dict[str, tuple[str, ...]]
    """Every name of a parameter that has several (tied weights)."""
    adapter_of: dict[str, tuple[str, str]]
    """Adapter tensor key -> (layer path, adapter)."""
    bnb_refs: list[tuple[str, Callable[[], Any]]]
    """(path, reference) of every bitsandbytes linear layer."""
    checkpointing_refs: list[Callable[[], Any]]
    """Modules that can run gradient checkpointing (whether they do is read live)."""
    present: set[str] = field(default_factory=set)
    """Every adapter name any layer has."""
    registry: tuple[int, int] = (0, 0)
    """Which rule registry the cached rules came from (tests swap it)."""
    engine: str | None = None
    """The engine that places the weights just in time (FSDP, accelerate offload), named; None if none."""

    by_path: dict[str, AdapterLayer] = field(init=False)
    _reached: dict[int, tuple[LayerSpec, dict[str, list[tuple[nn.Module, str]]]]] = field(init=False)
    hosts: dict[str, str] = field(init=False)
    """Adapter layer path -> the outermost adapter layer enclosing it (itself if none): where its
    effect is applied, since an outer layer's forward may read a nested layer's tensors."""

    def __post_init__(self) -> None:
        self.by_path = {info.path: info for info in self.layers}
        self._reached = {}
        self.hosts = {}
        for path in sorted(self.by_path, key=len):  # outer layers first
            parent = next((p for p in _prefixes(path) if p in self.by_path), None)
            self.hosts[path] = self.hosts[parent] if parent is not None else path

    def owners(self, spec: LayerSpec) -> dict[str, list[str]]:
        """Tree key -> the keys through which the layer of ``spec`` reaches that tensor: its own path
        first, then the tensor's other names (a Parameter tied to several modules)."""
        info = self.by_path.get(spec.path)
        out: dict[str, list[str]] = {}
        for role, key in spec.keys.items():
            mine = info.local.get(spec.adapter, {}).get(role, key) if info is not None else key
            out[key] = list(dict.fromkeys([mine, key, *self.aliases.get(key, ())]))
        return out

    def reached(self, spec: LayerSpec, root: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
        """:meth:`owners` as (owning module, attribute name) pairs (``root``: the model), cached per spec."""
        # (not read or filled while torch.compile traces: a guard on the cache's contents would recompile)
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self._reached.get(id(spec))
        if cached is not None and cached[0] is spec:
            return cached[1]
        out = {}
        for key, names in self.owners(spec).items():
            pairs = []
            for name in names:
                prefix, _, attr = name.rpartition(".")
                owner = self.modules.get(prefix) if prefix else root
                if owner is not None:
                    pairs.append((owner, attr))
            out[key] = pairs
        if not compiling:
            self._reached[id(spec)] = (spec, out)
        return out

    def host(self, path: str) -> str:
        """Where the effect of the adapter layer at ``path`` is applied (see :attr:`hosts`)."""
        return self.hosts.get(path, path)

    @property
    def own_tensors(self) -> dict[str, Tensor]:
        """Every adapter tensor by the key ``extract`` gives it (computed once per structure)."""
        found = self.__dict__.get("_own_tensors")
        if found is None:
            found = {key: t for info in self.layers for per in info.tensors.values() for key, t in per.items()}
            self.__dict__["_own_tensors"] = found
        return found

    @property
    def bnb_linears(self) -> list[tuple[str, nn.Module]]:
        """(path, module) of every bitsandbytes linear layer."""
        return [(path, m) for path, m in ((path, ref()) for path, ref in self.bnb_refs) if m is not None]

    @property
    def adapted_blocks(self) -> list[nn.Module]:
        """The blocks holding adapted layers, each once: for each adapter layer, its outermost ancestor
        that is an element of an ``nn.ModuleList`` (a decoder layer); where a layer has none, the
        model's embedding layers instead (see :func:`funcadapt.call._vmapped_one`)."""
        found = self.__dict__.get("_adapted_blocks")
        if found is None:
            blocks: dict[int, nn.Module] = {}
            for info in self.layers:
                parts = info.path.split(".")
                block = next(
                    (
                        ".".join(parts[: i + 1])
                        for i in range(1, len(parts))
                        if isinstance(self.modules.get(".".join(parts[:i])), nn.ModuleList)
                    ),
                    None,
                )
                chosen = [self.modules[block]] if block in self.modules else self._embeddings()
                blocks.update((id(m), m) for m in chosen)
            found = self.__dict__["_adapted_blocks"] = list(blocks.values())
        return found

    def _embeddings(self) -> list[nn.Module]:
        return [m for m in self.modules.values() if isinstance(m, nn.Embedding)]

    @property
    def plain_forwards(self) -> list[tuple[nn.Module, Any]]:
        """(module, its forward in plain ops) for the model's modules that torch.func cannot run
        (:mod:`funcadapt.models`), each once."""
        found = self.__dict__.get("_plain_forwards")
        if found is None:
            unique = {id(m): m for m in self.modules.values()}
            pairs = ((m, models.plain_forward(m)) for m in unique.values())
            found = self.__dict__["_plain_forwards"] = [(m, f) for m, f in pairs if f is not None]
        return found

    @property
    def checkpointing(self) -> list[nn.Module]:
        return [m for m in (ref() for ref in self.checkpointing_refs) if m is not None]

    def rule(self, path: str, adapter: str) -> Rule | None:
        """The cached rule for (layer path, adapter); looked up live for layers not cached."""
        info = self.by_path.get(path)
        if info is not None and adapter in info.rules:
            return info.rules[adapter]
        layer = self.modules.get(path)
        return base.find_rule(layer, adapter) if layer is not None else None


_CACHE: dict[int, Structure] = {}
"""id(model) -> its structure, dropped when the model is collected. Keyed by the id, not weakly by the
model: torch.compile traces this lookup inside a compiled ``funcadapt.call`` and guards on it, and a
weak dictionary's keys cannot be guarded on (they vanish with collected models)."""


class _Reused(threading.local):
    value: tuple[nn.Module, Structure] | None = None


_REUSED = _Reused()


@contextlib.contextmanager
def reusing_structure(model: nn.Module) -> Iterator[Structure]:
    """While the block runs (in this thread), ``structure(model)`` is the structure found on entry,
    without checking the fingerprint again: for steps that read it several times in a row without
    changing the model (``AdapterModifier.__enter__``: extract, then frame)."""
    found = structure(model)
    saved, _REUSED.value = _REUSED.value, (model, found)
    try:
        yield found
    finally:
        _REUSED.value = saved


def structure(model: nn.Module) -> Structure:
    """The cached structure of ``model``, rebuilt when its fingerprint changed."""
    reused = _REUSED.value
    if reused is not None and reused[0] is model:
        return reused[1]
    print_ = fingerprint(model)
    cached = _CACHE.get(id(model))
    if cached is not None and cached.fingerprint == print_ and cached.registry == _registry():
        return cached
    built = _build(model, print_)
    if torch.compiler.is_compiling():
        return built  # (a finalizer cannot be traced; the next eager call caches it)
    if id(model) not in _CACHE:
        weakref.finalize(model, _CACHE.pop, id(model), None)
    _CACHE[id(model)] = built
    return built


def _registry() -> tuple[int, int]:
    return id(base.RULES), len(base.RULES)


def fingerprint(model: nn.Module) -> tuple[int, ...]:
    """ids of every module and parameter in tree order, with each module's child count."""
    ids: list[int] = []
    append, extend = ids.append, ids.extend
    stack: list[Any] = [model]
    pop, push = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        append(id(module))
        params = module._parameters
        if params:
            extend(map(id, params.values()))
        children = module._modules
        if children:
            append(len(children))
            push(children.values())
    return tuple(ids)


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Pre-order (path, module), duplicates included, like ``named_modules(remove_duplicate=False)``."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        yield path, module
        children = [(f"{path}.{n}" if path else n, c) for n, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))


def _prefixes(path: str) -> list[str]:
    """The proper ancestors of a module path, innermost first."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def adapter_entries(layer: Any, adapter: str) -> dict[str, tuple[str, Tensor]]:
    """role -> (key below the layer, tensor) for every tensor PEFT registers for ``adapter``."""
    access = access_of(layer)
    if access is not None:
        return access.entries(layer, adapter)
    out: dict[str, tuple[str, Tensor]] = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or not hasattr(container, "keys") or adapter not in container:
            continue
        item = container[adapter]
        if isinstance(item, Tensor):
            out[attr] = (_join(attr, adapter), item)
        elif isinstance(item, nn.Module):
            for sub, tensor in item.named_parameters():
                out[_join(attr, sub)] = (_join(attr, adapter, sub), tensor)
    return out


def layer_adapters(layer: Any, ancestors: Sequence[nn.Module] = ()) -> set[str]:
    """The adapters ``layer`` holds; ``ancestors`` (root to parent) for layers read through a
    :class:`~funcadapt.rules.base.LayerAccess`, whose adapter names may live on an ancestor."""
    access = access_of(layer)
    if access is not None:
        return set(access.adapters(layer, ancestors))
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is not None and hasattr(container, "keys"):
            names.update(container.keys())
    return names


def active_adapters(layer: Any, held: Iterable[str]) -> list[str]:
    """The active adapters of an adapter layer holding ``held`` (read live)."""
    access = access_of(layer)
    if access is not None:
        return access.active(layer, sorted(held))
    return list(layer.active_adapters)


def adapters_disabled(layer: Any) -> bool:
    """Inside ``disable_adapter()`` (read live)."""
    access = access_of(layer)
    return access.disabled(layer) if access is not None else bool(layer.disable_adapters)


def _ancestors(model: nn.Module, modules: dict[str, nn.Module], path: str) -> list[nn.Module]:
    parts = path.split(".")
    return [model] + [modules[".".join(parts[:i])] for i in range(1, len(parts))]


def _build(model: nn.Module, print_: tuple[int, ...]) -> Structure:
    modules: dict[str, nn.Module] = {}
    layers: list[AdapterLayer] = []
    seen_layers: set[int] = set()
    names: dict[int, list[str]] = {}
    bnb: dict[int, tuple[str, nn.Module]] = {}
    checkpointing: dict[int, nn.Module] = {}
    present: set[str] = set()
    found: list[tuple[str, Any]] = []
    for path, module in _walk(model):
        if path:
            modules[path] = module
        for name, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(_join(path, name))
        if BNB_LINEARS and isinstance(module, BNB_LINEARS):
            bnb.setdefault(id(module), (path, module))
        if (
            "gradient_checkpointing" in module.__dict__
            or hasattr(type(module), "gradient_checkpointing")
            or "checkpoint_fn" in module.__dict__
        ):
            checkpointing.setdefault(id(module), module)
        if is_adapter_layer(module) and id(module) not in seen_layers:
            seen_layers.add(id(module))
            found.append((path, module))
    for path, layer in found:
        check_supported(path, layer)
        adapters = layer_adapters(layer, _ancestors(model, modules, path) if access_of(layer) else ())
        present |= adapters
        # a tensor several layers share (TinyLoRA's per-group vector) is one entry, under the name
        # named_parameters() gives it (its first path), however many layers reach it
        own = {a: adapter_entries(layer, a) for a in adapters}
        entries = {
            a: {role: (names.get(id(t), [_join(path, sub)])[0], t) for role, (sub, t) in own[a].items()}
            for a in adapters
        }
        local = {a: {role: _join(path, sub) for role, (sub, _) in own[a].items()} for a in adapters}
        engines.check_params(path, (t for e in entries.values() for _, t in e.values()))
        engines.check_units(path, (key for e in entries.values() for key, _ in e.values()), modules)
        rules = {a: base.find_rule(layer, a) for a in adapters}
        layers.append(
            AdapterLayer(path, _hold(layer, model), entries, rules, quantized_kind(base_of(layer)), local=local)
        )
    adapter_of = {key: (info.path, a) for info in layers for a, e in info.entries.items() for key, _ in e.values()}
    aliases = {n: tuple(group) for group in names.values() if len(group) > 1 for n in group}
    return Structure(
        print_,
        modules,
        layers,
        aliases,
        adapter_of,
        [(path, _hold(m, model)) for path, m in bnb.values()],
        [_hold(m, model) for m in checkpointing.values()],
        present,
        _registry(),
        engines.describe([model, *modules.values()]),
    )
