"""``extract``: a model's adapter parameters as a pytree plus their static structure.

An :class:`AdapterTree` is the equinox-style split of a model's adapters: ``params`` is
a flat ``dict[str, Tensor]`` keyed exactly as ``model.named_parameters()`` names them
(the values *are* the model's Parameter objects, no copies), and ``layers`` holds the
static part (layer path, adapter name, rule, which key plays which role, PEFT's float
``scaling`` ...). The tree is a registered pytree node whose only leaves are
``params``, so ``torch.func`` transforms and ``tree_map`` see exactly those tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn

from .rules.base import RULES, LayerSpec
from .structure import active_adapters, adapters_disabled, structure


@dataclass(frozen=True)
class AdapterTree:
    """``params``: the adapter tensors by ``named_parameters()`` key; ``layers``: the static specs.

    ``left_out``: adapters the model holds that this tree does not, with the reason (loaded
    but not active, or not named in ``adapter_names``), so a coefficient given for one of them
    is refused with that reason. ``own``: the tensors are exactly the Parameters ``extract``
    found (False after ``with_params`` or a torch.func transform re-created the tree);
    :func:`funcadapt.call` then checks they are the called model's own."""

    params: dict[str, Tensor]
    layers: tuple[LayerSpec, ...]
    left_out: Mapping[str, str] = field(default_factory=dict)
    own: bool = field(default=False, compare=False)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(sorted({spec.adapter for spec in self.layers}))

    def with_params(self, params: Mapping[str, Tensor]) -> AdapterTree:
        """The same structure over other tensors (equinox's ``combine``)."""
        if set(params) != set(self.params):
            missing, extra = set(self.params) - set(params), set(params) - set(self.params)
            raise ValueError(f"params do not match the tree: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
        return replace(self, params=dict(params), own=False)

    def __repr__(self) -> str:
        rules = sorted({s.rule for s in self.layers})
        return (
            f"AdapterTree({len(self.layers)} adapter layers, {len(self.params)} tensors, "
            f"adapters={list(self.adapters)}, rules={rules})"
        )


def _flatten(tree: AdapterTree) -> tuple[list[Tensor], Any]:
    keys = list(tree.params)
    return [tree.params[k] for k in keys], (tuple(keys), tree.layers, tree.left_out)


def _unflatten(values: Iterable[Tensor], context: Any) -> AdapterTree:
    keys, layers, left_out = context
    return AdapterTree(dict(zip(keys, values, strict=False)), layers, left_out)


pytree.register_pytree_node(
    AdapterTree,
    _flatten,
    _unflatten,
    serialized_type_name="funcadapt.AdapterTree",
)


def _check_prompt_learning(model: nn.Module, adapter_names: Iterable[str] | None) -> None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return
    names = list(adapter_names) if adapter_names is not None else [getattr(model, "active_adapter", None)]
    for name in names:
        config = configs.get(name) if isinstance(name, str) else None
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"adapter {name!r} is {config.peft_type.value} (a prompt-learning method): it acts through "
                f"virtual tokens in the model's input or cache, not through a layer's weights, so it has "
                f"no per-layer coefficient. Train a layer adapter (LoRA, IA3, ...) to steer with "
                f"funcadapt, or drop the virtual tokens to compare against the base model."
            )


def extract(model: nn.Module, adapter_names: str | Iterable[str] | None = None) -> AdapterTree:
    """Find every adapter layer of ``model`` and return its parameters as an :class:`AdapterTree`.

    ``adapter_names=None`` takes each layer's active adapters; otherwise exactly the
    named ones, which must exist and be active (PEFT's forward ignores inactive ones,
    so modifying them would silently do nothing). Works on a ``PeftModel``, on any
    module with adapters injected, and on a single adapter layer.

    Raises ``ValueError`` for merged adapters, adapter types without a rule, unknown
    names and prompt-learning methods, naming the layer and the fix.
    """
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    wanted = None if adapter_names is None else list(dict.fromkeys(adapter_names))
    _check_prompt_learning(model, wanted)

    params: dict[str, Tensor] = {}
    layers: list[LayerSpec] = []
    found = structure(model)
    active_somewhere: set[str] = set()
    for info in found.layers:
        path, layer = info.path, info.layer
        if adapters_disabled(layer):
            continue  # inside ``with model.disable_adapter()``: no adapter has an effect here
        active = active_adapters(layer, info.entries)
        active_somewhere.update(active)
        if wanted is None:
            chosen = [a for a in active if a in info.entries]
        else:
            chosen = [a for a in wanted if a in info.entries]
            inactive = [a for a in chosen if a not in active]
            if inactive:
                raise ValueError(
                    f"layer {path!r}: adapter {inactive[0]!r} is loaded but not active, so PEFT's forward "
                    f"ignores it and modifying it would have no effect; activate it first "
                    f"(model.set_adapter({inactive[0]!r}), or base_model.set_adapter([...]) for several)"
                )
        for adapter in chosen:
            if adapter in getattr(layer, "merged_adapters", ()):
                raise ValueError(
                    f"layer {path!r} has adapter {adapter!r} merged into its base weights; its effect can no "
                    f"longer be scaled separately. Call model.unmerge_adapter() first"
                )
            rule = info.rules[adapter]
            if rule is not None and rule.unsupported:
                raise ValueError(f"layer {path!r} adapter {adapter!r} ({rule.doc.adapter}): {rule.unsupported}")
            if rule is None:
                supported = ", ".join(sorted({r.layer_type.__name__ for r in RULES}))
                raise ValueError(
                    f"layer {path!r} is a {type(layer).__module__}.{type(layer).__qualname__} (adapter "
                    f"{adapter!r}), which funcadapt has no rule for yet. Supported layer families: {supported}. "
                    f"Exclude it with adapter_names=[...] or open an issue"
                )
            params.update(info.tensors[adapter])
            static = {**rule.static(layer, adapter), "quantized": info.quantized}
            spec = info.specs.get(adapter)
            if spec is None or spec.static != static:  # static parts read live (PEFT's scaling can change)
                spec = LayerSpec(
                    path=path,
                    adapter=adapter,
                    rule=rule.name,
                    layer_type=type(layer).__name__,
                    keys={role: key for role, (key, _) in info.entries[adapter].items()},
                    static=static,
                )
                info.specs[adapter] = spec
            layers.append(spec)

    configs = getattr(model, "peft_config", None)
    configured = sorted(configs) if isinstance(configs, Mapping) else []
    if wanted is not None:
        unknown = [a for a in wanted if a not in found.present]
        swapped_out = [a for a in unknown if a in configured]
        if swapped_out:  # adaption prompt keeps an inactive adapter's layers outside the model
            raise ValueError(
                f"adapter {swapped_out[0]!r} is loaded but its layers are not in the model (it is not active, or "
                f"adapters are disabled); activate it first (model.set_adapter({swapped_out[0]!r}))"
            )
        if unknown:
            raise ValueError(
                f"no adapter layer has adapter(s) {unknown}; the model has {sorted(found.present) or 'none'}"
            )
    if not layers:
        if not found.present and configured:
            raise ValueError(
                f"the model has PEFT adapter(s) {configured} but none of their layers is in it now (inside "
                f"`with model.disable_adapter()`? adaption prompt swaps its layers out while disabled)"
            )
        if not found.present:
            raise ValueError(
                f"found no PEFT adapter layer in {type(model).__name__}; wrap it with peft.get_peft_model() "
                f"or inject_adapter_in_model() first"
            )
        raise ValueError(
            "no adapter is active on any layer (adapters disabled, e.g. inside `with model.disable_adapter()`?)"
        )
    left_out = _left_out(found.present | set(configured), active_somewhere, layers)
    return AdapterTree(params, tuple(layers), left_out, own=True)


def _left_out(loaded: set[str], active: set[str], layers: Iterable[LayerSpec]) -> dict[str, str]:
    """Adapters the model holds outside the tree -> why (for the error a coefficient for one gets)."""
    chosen = {spec.adapter for spec in layers}
    why = {}
    for name in sorted(loaded - chosen):
        if name in active:
            why[name] = "active, but left out of this tree by extract(adapter_names=...); include it there"
        else:
            why[name] = (
                f"loaded but not active, so PEFT's forward ignores it and a coefficient would change nothing; "
                f"activate it (model.set_adapter({name!r}), or model.base_model.set_adapter([...]) for several) "
                f"and extract again"
            )
    return why
