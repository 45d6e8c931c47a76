"""Deploying a coefficient: a standard PEFT adapter at that coefficient, or the base model with it merged.

A strength found with funcadapt must run where funcadapt does not: PEFT's own loader, its
``merge_and_unload()``, serving engines that batch plain adapters (vLLM, LoRAX, TGI). Where the
effect at ``coeff`` is itself a set of adapter tensors of the same family (the parameter-space rules:
LoRA ``B ↦ c·B``, IA3 ``λ ↦ 1 + c·(λ − 1)``, LoHa, LoKr, VeRA, …; geometric mode where it is a
parameter map, OFT ``Q ↦ c·Q``, IA3 ``λ^c``; ``op="invert"`` where the inverse has the same form),
those tensors, under the adapter's own config, are an adapter whose plain PEFT forward is funcadapt's
at ``coeff``:

* :func:`export` writes them as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it);
* :func:`merge` returns the base model with them merged into its weights (PEFT's own merge).

Where the effect acts while a layer runs (the output interpolation of DoRA, HRA, OFT in linear mode;
a forward-time scale; per-row or per-token coefficients) no adapter of any kind carries it, and both
refuse, naming the layer and why. The model is never changed.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .groups import Groups, Varying
from .images import PerImage
from .rows import PerRow
from .rules.base import rule_named
from .structure import structure
from .tokens import PerToken
from .transform import Mode, Op, Transformed, transform
from .tree import extract


def export(
    model: nn.Module,
    coeff: Any,
    path: str | os.PathLike[str],
    *,
    op: Op = "scale",
    mode: Mode = "linear",
    adapter_names: str | Iterable[str] | None = None,
    groups: Groups | None = None,
) -> Path:
    """Write the adapters of ``model`` at ``coeff`` as a standard PEFT adapter directory at ``path``
    (PEFT's layout: the adapter ``default`` at the top, any other in a subfolder of its name; config and
    ``adapter_model.safetensors`` each), whose plain PEFT forward equals ``funcadapt.call`` at ``coeff``.

    ``coeff``: a number, a 0-d tensor, a dict per adapter, or with ``groups`` a vector per adapter
    (each layer's tensors at its group's coefficient); ``op``: ``"scale"`` or ``"invert"`` (the other
    ops as :func:`funcadapt.transform` takes them). ``path`` must not exist or be an empty directory;
    the directory appears whole or not at all (written next to it, then renamed). Returns ``path``."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{str(target)!r} exists and is not an empty directory; export writes a new adapter directory: give a "
            f"new path (or remove that one first)"
        )
    peft_model = _peft_model(model, "export")
    params = _weights_at(model, coeff, op, mode, adapter_names, groups, "export")
    _refuse_base_changing_init(peft_model, params)
    _refuse_rescaled(model, params)
    values = _by_identity(params)
    # every active adapter acts in funcadapt's forward: those left out of adapter_names at c = 1, as they are
    names = list(dict.fromkeys([*params.tree.adapters, *_active_adapters(peft_model)]))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in names:  # PEFT's layout: "default" at the top, any other in its subfolder
            _save_adapter(peft_model, name, values, staging if name == "default" else staging / name)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _save_adapter(peft_model: Any, name: str, values: Mapping[int, Tensor], directory: Path) -> None:
    """What ``PeftModel.save_pretrained`` writes for adapter ``name`` (PEFT picks the keys and names them),
    from the model's tensors with ``values`` (by the id of the tensor they replace) in place of its own,
    under every name a tensor has (PEFT may save a shared tensor under another name than funcadapt's).
    Read from ``named_parameters`` rather than ``state_dict()``: bitsandbytes' 4-bit state_dict packing
    changes the layer it reads on some CPUs."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    state = dict(peft_model.named_parameters(remove_duplicate=False))
    state.update(peft_model.named_buffers(remove_duplicate=False))
    state = {key: values.get(id(t), t) for key, t in state.items()}
    config = peft_model.peft_config[name]
    # (PEFT's state-dict function rewrites an AdaLoRA config's rank_pattern in place: it gets a copy)
    peft_model.peft_config[name] = copy.deepcopy(config)
    try:
        weights = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=name)
    finally:
        written, peft_model.peft_config[name] = peft_model.peft_config[name], config
    directory.mkdir(parents=True, exist_ok=True)
    # (cloned: safetensors refuses tensors that share memory, as tied or shared adapter tensors do)
    save_file(
        {k: t.detach().to("cpu").clone().contiguous() for k, t in weights.items()},
        str(directory / SAFETENSORS_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    written = copy.deepcopy(written)
    written.inference_mode = True
    auto_mapping = None
    if written.task_type is None:  # as PeftModel.save_pretrained: lets AutoPeftModel find the model class
        base_class = type(peft_model.get_base_model())
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    written.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)


def merge(
    model: nn.Module,
    coeff: Any,
    *,
    op: Op = "scale",
    mode: Mode = "linear",
    adapter_names: str | Iterable[str] | None = None,
    groups: Groups | None = None,
) -> nn.Module:
    """The base model (no PEFT wrapper) with the adapters' effect at ``coeff`` merged into its weights:
    its forward is ``funcadapt.call`` at ``coeff``, to the rounding of a merge. Adapters left out by
    ``adapter_names`` are merged as they are (c = 1), as they act in funcadapt's forward. PEFT's
    ``merge_and_unload`` merges a copy; ``model`` is unchanged (the copy costs its memory once more).
    A bitsandbytes-quantized base is refused: merging would dequantize it."""
    peft_model = _peft_model(model, "merge")
    if structure(model).bnb_refs:
        raise ValueError(
            "merge refuses a bitsandbytes-quantized base model: merging an adapter into 4-bit or 8-bit weights "
            "dequantizes and requantizes them, a lossy change of the base model. Export the adapter instead "
            "(funcadapt.export), or merge into a model loaded in float32/bfloat16"
        )
    params = _weights_at(model, coeff, op, mode, adapter_names, groups, "merge")
    if not callable(getattr(peft_model.base_model, "merge_and_unload", None)):
        raise ValueError(
            f"PEFT has no merge for {type(peft_model.base_model).__name__} (its adapter is not a weight change "
            f"PEFT can fold into the base layers); export the adapter instead (funcadapt.export)"
        )
    _refuse_unmergeable(model)
    values = {key: params[key].detach() for key in params.tree.params}
    clone = copy.deepcopy(peft_model)
    owned = dict(clone.named_parameters(remove_duplicate=False))
    owned.update(clone.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for key, tensor in values.items():
            owned[key].copy_(tensor)
    return clone.merge_and_unload(adapter_names=_active_adapters(clone))


def _refuse_unmergeable(model: nn.Module) -> None:
    """Merges PEFT gets wrong: a base weight tied to another module's (merging writes W + ΔW into both ends
    of the tie), several adapters of a non-commutative rule on one layer (PEFT's OFT merge composes them in
    the other order than its forward)."""
    known = structure(model)
    full = extract(model)
    key_of = {id(t): k for k, t in model.named_parameters(remove_duplicate=False)}
    for spec in full.layers:
        layer = known.modules.get(spec.path)
        base = getattr(layer, "get_base_layer", lambda: None)()
        for name, tensor in getattr(base, "_parameters", {}).items():
            key = key_of.get(id(tensor))
            if key is not None and key in known.aliases:
                raise ValueError(
                    f"cannot merge into layer {spec.path!r}: its base {name} is tied to {known.aliases[key]} (tied "
                    f"embeddings), and merging would change both ends of the tie. Untie the weights first, or export "
                    f"the adapter instead (funcadapt.export)"
                )
    by_layer: dict[str, list[str]] = {}
    for spec in full.layers:
        by_layer.setdefault(spec.path, []).append(spec.rule)
    for path, rules in by_layer.items():
        if len(rules) > 1 and not all(rule_named(r).commutative for r in rules):
            raise ValueError(
                f"cannot merge layer {path!r}: it has several active adapters ({len(rules)}) whose effects do not "
                f"commute, and PEFT merges them in another order than its forward runs them (OFT's merge). Merge "
                f"one adapter at a time, or export them (funcadapt.export)"
            )


def _weights_at(
    model: nn.Module,
    coeff: Any,
    op: Op,
    mode: Mode,
    adapter_names: str | Iterable[str] | None,
    groups: Groups | None,
    what: str,
) -> Transformed:
    """The transform at ``coeff``, refused where some effect is not a set of adapter tensors."""
    _refuse_varying(coeff, what)
    tree = extract(model, adapter_names)
    for spec in tree.layers:
        reason = rule_named(spec.rule).not_deployable
        if reason:
            raise ValueError(f"cannot {what} layer {spec.path!r} adapter {spec.adapter!r}: {reason}")
    params = transform(tree, coeff, op, mode, groups=groups)
    for e in params.effects:
        if e.ops:
            kinds = ", ".join(sorted({type(o).__name__ for o in e.ops}))
            raise ValueError(
                f"cannot {what} layer {e.spec.path!r} adapter {e.spec.adapter!r} at this coefficient: its effect "
                f"there acts while the layer runs ({kinds}: {_why(kinds)}), and no set of adapter tensors, of this "
                f"family or any other, carries it. Exportable: the parameter-space transforms (op='scale' in "
                f"mode='linear' for LoRA, IA3, LoHa, LoKr, VeRA, ...; mode='geometric' where it is a parameter map, "
                f"e.g. OFT, RoAd; op='invert' where the inverse has the adapter's form). See docs/support.md"
            )
    return params


def _by_identity(params: Transformed) -> dict[int, Tensor]:
    """{id of the model's tensor: its value at the coefficient}, for every tensor the transform changes."""
    return {id(t): params[key].detach() for key, t in params.tree.params.items()}


_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq")


def _refuse_rescaled(model: nn.Module, params: Transformed) -> None:
    """A LoRA layer whose ``scaling`` was changed at run time (``set_scale``, PEFT's
    ``rescale_adapter_scale``): PEFT's loader rebuilds it from the config (lora_alpha / r, or / √r), so the
    exported adapter would not compute what the model computes now."""
    modules = structure(model).modules
    for spec in params.tree.layers:
        if spec.rule != "lora":  # (other rules keep other meanings in these dicts: AdaLoRA's r is its budget)
            continue
        layer = modules.get(spec.path)
        scaling, alpha, rank = (getattr(layer, a, {}) for a in ("scaling", "lora_alpha", "r"))
        if not all(isinstance(d, dict) and spec.adapter in d for d in (scaling, alpha, rank)):
            continue
        rs = getattr(layer, "use_rslora", {})
        expected = alpha[spec.adapter] / (math.sqrt(rank[spec.adapter]) if rs.get(spec.adapter) else rank[spec.adapter])
        live = scaling[spec.adapter]
        if isinstance(live, int | float) and not math.isclose(live, expected, rel_tol=1e-12):
            raise ValueError(
                f"cannot export layer {spec.path!r} adapter {spec.adapter!r}: its LoRA scaling is {live:g}, not the "
                f"{expected:g} its config gives (lora_alpha / r; changed at run time by set_scale or "
                f"rescale_adapter_scale), and PEFT's loader rebuilds it from the config. Export outside that "
                f"context, with the strength as the coefficient (funcadapt.export(model, c, ...))"
            )


def _refuse_base_changing_init(peft_model: Any, params: Transformed) -> None:
    """Adapters whose initialisation changed the base weights (PiSSA, OLoRA, CorDA, LoftQ): PEFT's loader
    runs it again on the base it is given, and engines that never run it need the changed base."""
    for name in params.tree.adapters:
        init = getattr(peft_model.peft_config[name], "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
            raise ValueError(
                f"cannot export adapter {name!r}: it was initialised with init_lora_weights={init!r}, which changed "
                f"the base weights it works with; PEFT's loader would run that initialisation again on the base it "
                f"is given, and a serving engine would use the unchanged base. Merge it instead (funcadapt.merge), "
                f"or save the changed base with the adapter (PEFT's path_initial_model_for_weight_conversion)"
            )


def _why(kinds: str) -> str:
    if "Interpolate" in kinds:
        return "y0 + c·(y1 − y0) at the layer output, which is not the output of any weights"
    return "a scale or rotation PEFT builds in its forward from tensors other layers share"


def _refuse_varying(coeff: Any, what: str) -> None:
    """Per-row, per-token and per-image coefficients (transform accepts them; one adapter cannot carry them). Non-finite
    coefficients are refused by transform itself."""
    given = coeff.values() if isinstance(coeff, Mapping) else [coeff]
    for c in given:
        if isinstance(c, Varying):
            kind = {PerRow: "per-row", PerToken: "per-token", PerImage: "per-image"}[type(c)]
            raise ValueError(
                f"cannot {what} {kind} coefficients: one adapter has one set of tensors, so it cannot be at a "
                f"different strength per {kind.split('-')[1]}. {what.capitalize()} one coefficient at a time"
            )


def _peft_model(model: nn.Module, what: str) -> Any:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{what} takes a PeftModel (what get_peft_model or PeftModel.from_pretrained returns), whose adapter "
            f"configs it writes or merges with; got {type(model).__name__}"
        )
    return model


def _active_adapters(model: Any) -> list[str]:
    active = model.base_model.active_adapters if hasattr(model.base_model, "active_adapters") else model.active_adapter
    return [active] if isinstance(active, str) else list(active)
