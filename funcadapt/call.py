"""Running a model with a :class:`~funcadapt.transform.Transformed` in effect.

``call(model, params, *args, **kwargs)`` runs the model with each adapted layer's effect
applied *just in time*: a wrapper around the layer's forward recomputes the adapter's
tensors from the tensors the layer holds when it runs (what FSDP all-gathered, accelerate
loaded, an enclosing context showed) and shows them to PEFT's forward until it returns
(:func:`funcadapt.interpret.jit_patches`). The forward-time ops (:mod:`funcadapt.ops`) become
the exact fallback (output interpolation), per-row coefficients and the rules' own forwards,
interpreted in :mod:`funcadapt.interpret`; this module only assembles the frame. Gradient
checkpointing recomputes with the same effects (see :mod:`funcadapt.swap`).

A plain ``{key: tensor}`` mapping works like ``torch.func.functional_call`` (the tensors are
swapped in at their modules for the call), with unknown or misspelled keys an error; under an
engine that places weights itself that is refused, since the engine would override them.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from . import engines, models, quantized
from .attention import folding_patches
from .images import Passes
from .interpret import Builder, batch_major, jit_patches, output_builders
from .ops import ForwardOp, InterpolateImages, InterpolateRows, InterpolateTokens, OutputOp, rule_ops
from .rules.base import (
    Patch,
    is_adapter_layer,
    is_number,
    rule_named,
    swap_under_transforms,
    under_transforms,
)
from .structure import Structure, active_adapters, adapters_disabled, structure
from .swap import Frame, thread_guarded
from .tokens import Positions
from .transform import LayerEffect, Transformed
from .tree import AdapterTree


def call(model: nn.Module, params: Transformed | Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with ``params`` in effect.

    ``params``: what :func:`funcadapt.transform` returns (each layer's effect is applied when
    that layer runs, to the tensors it holds then), or a mapping from ``named_parameters()`` /
    ``named_buffers()`` keys to tensors shown in place of the model's own
    (``torch.func.functional_call`` semantics, with unknown keys an error). The model is
    restored on return and on error; autograd reaches the original parameters through
    whatever produced ``params``.
    """
    ddp_error = engines.ddp_vmap_error(model)
    if ddp_error is not None and under_transforms():
        raise ddp_error
    if _changes_nothing(model, params):
        return model(*args, **kwargs)
    if isinstance(params, Transformed) and any(
        isinstance(op, InterpolateImages) and op.values.dim() == 3 for e in params.effects for op in e.ops
    ):
        raise ValueError(
            "per-step coefficients (funcadapt.per_step) count the denoising steps across the denoiser calls of "
            "one context, and funcadapt.call runs one forward: use funcadapt.AdapterModifier around the pipeline "
            "call, or in a sampling loop of your own give step k its own coefficient (funcadapt.per_image(values[k]) "
            "or a number)"
        )
    with frame(model, params, now=True):
        return model(*args, **kwargs)


def _changes_nothing(model: nn.Module, params: Transformed | Mapping[str, Tensor]) -> bool:
    """``params`` (a transform at c = 1, say) change nothing the model computes and nothing needs patching
    for the call to run: no effect, every tensor the model's own (as extracted from it), no torch.func
    transform, engine or bitsandbytes layer, and no rule that patches its layers on every call. ``call`` is
    then the plain forward, with no frame to build. (Not while compiling: the structure's caches are not
    filled inside a trace.)"""
    if not isinstance(params, Transformed) or params.effects or not params.tree.own:
        return False
    if under_transforms() or torch.compiler.is_compiling():
        return False
    known = structure(model)
    if known.engine is not None or known.bnb_refs:
        return False
    own = known.own_tensors
    if any(own.get(key) is not t for key, t in params.tree.params.items()):
        return False  # (frame() says why: another model's tree, a replaced adapter, ...)
    return all(rule_named(spec.rule).patches is None for spec in params.tree.layers)


def frame(
    model: nn.Module, params: Transformed | Mapping[str, Tensor], live_checked: bool = False, now: bool = False
) -> Frame:
    """The (not yet applied) :class:`~funcadapt.swap.Frame` that ``call`` runs the model in.
    ``live_checked``: ``params`` were transformed from a tree extracted from ``model`` just now, so
    every adapter they change is known to be active and unmerged. ``now``: the frame is applied for
    one forward that runs at once, in the torch.func transforms active now (``call``), so the patches
    only a forward under transforms needs are left out when there are none."""
    tensors, effects, extracted = _unpack(params)
    known = structure(model)
    _refuse_fsdp1_under_transforms(known.engine)
    modules = {"": model, **known.modules}
    replaced = _replaced(model, modules, known, tensors, extracted)
    touched, recipes, modified = _touched(modules, known, tensors, replaced, effects, live_checked)
    loads = _offloaded_tensors(modules, known)
    # a layer's just-in-time wrapper also makes its thread check where it is the outermost wrapper this frame
    # puts on the layer (no output interpolation around it) and there is no engine hook to stay outside of
    self_guarded = set() if known.engine is not None else {p for p in recipes if not _interpolated(touched.get(p, {}))}
    builders: list[Builder] = []
    token_lengths = [int(op.values.shape[-1]) for e in effects for op in e.ops if isinstance(op, InterpolateTokens)]
    images = [op.values for e in effects for op in e.ops if isinstance(op, InterpolateImages)]
    # what a forward processes, recorded where it enters the model and read by every layer
    positions = Positions(min(token_lengths)) if token_lengths else None
    passes = _passes(model, images) if images else None
    if positions is not None:
        _refuse_encoder_decoder(model)
    recorders = [r for r in (positions, passes) if r is not None]
    if recorders:
        entries = entry_modules(model)
        builders.append(
            lambda: [
                Patch(m, "forward", functools.partial(r.recording, wrapper=m is not entries[-1]), wrap=True)
                for r in recorders
                for m in entries
            ]
        )
    for path in {**touched, **recipes, **loads}:
        if path not in recipes and path not in loads and _untouched(known, path, touched[path]):
            continue  # its tensors are the model's own and nothing acts on it (c = 1): no patch at all
        recomputed = tuple(recipes.get(path, ()))
        guard = f"layer {path!r}" if path in self_guarded else None
        builders.extend(
            _layer_builders(
                path, modules, known, touched.get(path, {}), recomputed, tuple(loads.get(path, ())), guard, positions,
                passes,
            )
        )
    rows = [op.coeffs for e in effects for op in e.ops if isinstance(op, InterpolateRows)]
    columns = list({id(c): c for c in rows}.values())
    bnb = [(path, m, batch_major(path, modules)) for path, m in known.bnb_linears]
    builders.append(lambda: quantized.patches(bnb, columns))
    transformed = under_transforms()
    if transformed or not now:
        builders.append(lambda: _input_grad_hooks(modules))
    plain_forwards = known.plain_forwards if transformed or not now else ()
    if plain_forwards:
        builders.append(lambda: [swap_under_transforms(m, "forward", fn) for m, fn in plain_forwards])
    one = _vmapped_one(tensors, effects) if transformed else None
    blocks = known.adapted_blocks if one is not None else []
    if one is not None:
        builders.append(lambda: [Patch(m, "forward", functools.partial(_batched, m, one), wrap=True) for m in blocks])
        builders.append(folding_patches)
    # only tensors that differ from the model's own are swapped (c = 1 swaps nothing); the
    # layers they belong to still get their patches above
    swapped = {k: v for k, v in tensors.items() if k in replaced}
    # every module whose behaviour this call changes refuses other threads: the layers with
    # effects, the owners of swapped tensors, the blocks batched under vmap
    changed = {path for path, _ in modified} | {k.rpartition(".")[0] for k in swapped if k not in known.adapter_of}
    named = {id(modules[p]): (p, modules[p]) for p in {*changed, *recipes, *loads}}
    guarded = [m for _, m in named.values()] + [m for m in blocks if id(m) not in named]
    checks = [(f"layer {p!r}", m) for p, m in named.values() if p not in self_guarded]
    checks += [(type(m).__name__, m) for m in blocks if id(m) not in named]
    builders.append(
        lambda: [
            Patch(m, "forward", functools.partial(thread_guarded, what), wrap=True, outside_hooks=True)
            for what, m in checks
        ]
    )
    states = tuple(recorders)
    return Frame(model, swapped, builders, modules, known.checkpointing, guarded=guarded, states=states)


def _passes(model: nn.Module, values: list[Tensor]) -> Passes:
    """The recorder of denoiser passes for per-image coefficients ``values`` (as :class:`PerImage` lays them
    out): the schedule's number of steps (one for every adapter), and whether an unconditional half has its
    own strength."""
    schedules = {int(v.shape[0]) for v in values if v.dim() == 3}
    if len(schedules) > 1:
        raise ValueError(
            f"per-step coefficients with different numbers of steps were given ({sorted(schedules)}); give every "
            f"adapter one value per step of the same pipeline call"
        )
    return Passes(model, schedules.pop() if schedules else 0, any(int(v.shape[-2]) == 2 for v in values))


def _untouched(known: Structure, path: str, per_adapter: Mapping[str, Sequence[ForwardOp]]) -> bool:
    """No op acts on the layer, and none of its rules patches it regardless (a rule whose ``patches`` run
    for every call fixes PEFT's forward there, e.g. for torch.func transforms)."""
    for adapter, ops in per_adapter.items():
        rule = known.rule(path, adapter)
        if ops or (rule is not None and rule.patches is not None):
            return False
    return True


def _interpolated(per_adapter: Mapping[str, Sequence[ForwardOp]]) -> bool:
    return any(isinstance(op, OutputOp) for ops in per_adapter.values() for op in ops)


def entry_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a forward of ``model`` starts in, outermost first: ``model``, and each module a wrapper
    hands the whole input to: a PEFT model's base model (whose forward ``generate()`` calls directly), the
    module of a ``torch.compile`` wrapper, of DistributedDataParallel and of an FSDP1 root (whose
    ``forward(*args, **kwargs)`` names no argument, so what the inner forward's signature names is read
    there)."""
    found = [model]
    while True:
        inner = _wrapped(found[-1])
        if inner is None or any(inner is m for m in found):
            return found
        found.append(inner)


_WRAPPERS = {"DistributedDataParallel": "module", "FullyShardedDataParallel": "_fsdp_wrapped_module"}
"""Wrapper classes (by name: the distributed ones are not imported for the check) -> the attribute holding the
module their forward runs on the whole input."""


def _wrapped(module: nn.Module) -> nn.Module | None:
    get_base = getattr(module, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    else:
        attr = _WRAPPERS.get(type(module).__name__, "_orig_mod")  # (torch.compile's OptimizedModule)
        inner = module.__dict__.get("_modules", {}).get(attr)
    return inner if isinstance(inner, nn.Module) else None


def _unpack(
    params: Transformed | Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], tuple[LayerEffect, ...], set[str]]:
    """(tensors to show by key, layer effects, keys whose tensor is what ``extract`` found on the model
    that ``params`` came from: each must be the called model's own, see :func:`_check_keys`)."""
    if isinstance(params, Transformed):
        extracted = set(params.tree.params) if params.tree.own else set()
        return dict(params.tree.params), params.effects, extracted
    if not isinstance(params, Mapping):
        raise TypeError(_not_params(params))
    tensors = {}
    for key, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"params[{key!r}] is a {type(value).__name__}, not a tensor")
        tensors[key] = value
    return tensors, (), set()


def _not_params(params: object) -> str:
    """What to say when ``call`` gets something other than params."""
    fix = "funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), -1.0), **batch)"
    if isinstance(params, AdapterTree):
        what = "the AdapterTree itself (what funcadapt.extract returns), not a transform of it"
        fix = "funcadapt.call(model, funcadapt.transform(tree, -1.0), **batch)"
    elif is_number(params) or isinstance(params, Tensor):
        what = f"a coefficient ({params!r}), not params"
    else:
        what = f"a {type(params).__name__}"
    return (
        f"funcadapt.call(model, params, ...) takes params: what funcadapt.transform(tree, coeff) returns, or a "
        f"{{parameter key: tensor}} dict; it got {what}. For example: {fix}, or with a context manager: "
        f"with funcadapt.AdapterModifier(model, 'scale', -1.0): model(**batch)"
    )


def _refuse_encoder_decoder(model: nn.Module) -> None:
    """Per-token coefficients are placed by one sequence's positions; an encoder-decoder runs two."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"per-token coefficients are refused on an encoder-decoder model ({type(model).__name__}): its encoder "
            f"and decoder run different sequences, and a [B, L] value cannot say which one a position belongs to. "
            f"Give the adapters one coefficient or one per row (funcadapt.per_row)"
        )


def _refuse_fsdp1_under_transforms(engine: str | None) -> None:
    if engine is not None and engine.startswith("FSDP (") and under_transforms():
        raise ValueError(
            f"{engine} cannot run under torch.func transforms (vmap, grad): its hooks track a training "
            f"state that functorch's wrapped tensors break. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
            f"under which funcadapt.vmap is exact, or keep FSDP1 and run the coefficients without vmap: a "
            f"coefficient batch (funcadapt.per_row on a tiled batch) or one AdapterModifier pass per coefficient"
        )


def _replaced(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    known: Structure,
    tensors: dict[str, Tensor],
    extracted: set[str],
) -> set[str]:
    """Keys whose tensor is not the model's own (tied names filled in); refused under an engine,
    which would put its own tensors back when the layer runs."""
    replaced = _check_keys(model, modules, tensors, extracted)
    given = set(tensors)
    _tie_aliases(known.aliases, tensors)
    for k in set(tensors) - given:  # the other names of tied tensors: the model's own there too?
        current = _current(modules, k)
        if tensors[k] is not current and not (current is not None and _both_meta(tensors[k], current)):
            replaced.add(k)
    if replaced and known.engine is not None:
        key = sorted(replaced)[0]
        raise ValueError(
            f"params gives tensor {key!r} outright, but this model runs under {known.engine}, which puts its own "
            f"tensors on each layer when it runs and would override it. Under such engines funcadapt applies "
            f"each effect when its layer runs: give adapter tensors of your own with "
            f"transform(extract(model), {{key: tensor}}, op='replace') (or op='shift' for an increment); a "
            f"plain {{key: tensor}} dict, and tensors that are not adapter parameters, need an unsharded, "
            f"non-offloaded model"
        )
    return replaced


def _touched(
    modules: Mapping[str, nn.Module],
    known: Structure,
    tensors: Mapping[str, Tensor],
    replaced: set[str],
    effects: tuple[LayerEffect, ...],
    live_checked: bool = False,
) -> tuple[dict[str, dict[str, list[ForwardOp]]], dict[str, list[LayerEffect]], set[tuple[str, str]]]:
    """(layer path -> adapter -> forward-time ops, for every layer the call touches; host layer path ->
    the effects recomputing tensors when it runs; the (layer path, adapter) pairs whose effect
    changes, each checked to be live)."""
    touched: dict[str, dict[str, list[ForwardOp]]] = {}
    modified: set[tuple[str, str]] = set()
    recipes: dict[str, list[LayerEffect]] = {}
    for key in tensors:
        found = known.adapter_of.get(key) or _adapter_of(modules, key)
        if found is not None:
            touched.setdefault(found[0], {}).setdefault(found[1], [])
            if key in replaced:
                modified.add(found)
    for e in effects:
        path, adapter = e.spec.path, e.spec.adapter
        if path not in modules or not is_adapter_layer(modules[path]):
            raise ValueError(f"params has an effect for layer {path!r}, which is not an adapter layer of this model")
        touched.setdefault(path, {}).setdefault(adapter, []).extend(e.ops)
        modified.add((path, adapter))
        if e.recompute is not None:
            recipes.setdefault(known.host(path), []).append(e)
    for path, adapter in () if live_checked else modified:
        _check_live(path, modules[path], adapter)
    return touched, recipes, modified


def _offloaded_tensors(modules: Mapping[str, nn.Module], known: Structure) -> dict[str, list[tuple[nn.Module, str]]]:
    """Under accelerate offload, host layer path -> (owner, name) of every tensor in the adapter layer's
    subtree (adapter tensors, base weights). accelerate loads a module's tensors in that module's own
    forward, and PEFT never calls the forward of the containers most adapters keep their tensors in
    (ParameterDict, BufferDict), nor the base layer's when it reads the base weight itself (HRA, HiRA,
    GLoRA, ...), so PEFT's own forward would compute with tensors on the meta device (silently wrong
    numbers, or an error); they are loaded just in time instead, whatever the call changes."""
    if known.engine is None or not known.engine.startswith("accelerate offload"):
        return {}
    hosts = {known.host(info.path) for info in known.layers}
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for path, module in modules.items():
        if not path or not engines.offloaded(module):
            continue
        parts = path.split(".")
        host = next((h for h in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if h in hosts), None)
        if host is not None:
            out.setdefault(host, []).extend((module, name) for name in (*module._parameters, *module._buffers))
    return out


def _layer_builders(
    path: str,
    modules: Mapping[str, nn.Module],
    known: Structure,
    per_adapter: Mapping[str, Sequence[ForwardOp]],
    recipes: tuple[LayerEffect, ...],
    loads: tuple[tuple[nn.Module, str], ...] = (),
    guard: str | None = None,
    positions: Positions | None = None,
    passes: Passes | None = None,
) -> list[Builder]:
    """One layer's patches, innermost first: the rules' own, the just-in-time effects (inside the
    output interpolation, which runs the layer twice, and outside PEFT's forward), the interpolation.
    ``loads``: offloaded tensors to load when the layer runs (see :func:`_offloaded_tensors`);
    ``positions``, ``passes``: the forward's positions and denoiser pass, for per-token and per-image
    coefficients."""
    layer, rule_of = modules[path], functools.partial(known.rule, path)
    builders: list[Builder] = []
    for adapter, ops in per_adapter.items():
        rule = rule_of(adapter)
        if rule is not None and rule.patches is not None:
            builders.append(functools.partial(rule.patches, layer, adapter, rule_ops(ops)))
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    for e in recipes:
        for key, pairs in known.reached(e.spec, modules[""]).items():
            owners.setdefault(key, pairs)
    jit = jit_patches(path, layer, recipes, owners, loads, guard)
    if jit is not None:
        builders.append(jit)
    builders.extend(output_builders(path, layer, per_adapter, rule_of, modules, positions, passes))
    return builders


def _vmapped_one(tensors: Mapping[str, Tensor], effects: tuple[LayerEffect, ...]) -> Tensor | None:
    """Under torch.func.vmap: a 1 batched at every vmap level that batches a coefficient or a tensor
    of ``params`` (None if none does).

    The input of every block holding an adapted layer (:attr:`Structure.adapted_blocks`) is multiplied
    by it, so that every activation of such a block is batched, not only those after its adapted
    layer: models that add a batched tensor into an unbatched one in place (Falcon's parallel
    attention, ``mlp_output += attention_output``, whose MLP branch reads the block's input) then
    run, and nothing changes numerically (x·1 = x). What runs before the first such block still
    runs once."""
    leaves = [*pytree.tree_leaves([(e.coeff, e.ops) for e in effects]), *tensors.values()]
    one: Tensor | None = None
    seen: set[tuple[int, ...]] = set()
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            continue
        levels = _vmap_levels(leaf)
        if levels and levels not in seen:
            seen.add(levels)
            ones = torch.ones_like(leaf.detach().reshape(-1)[:1]).reshape(())
            one = ones if one is None else one * ones.to(one.device)
    return one


def _vmap_levels(t: Tensor) -> tuple[int, ...]:
    """The vmap levels that batch ``t`` (through grad's wrappers too)."""
    levels = []
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            levels.append(torch._C._functorch.maybe_get_level(t))
        t = torch._C._functorch.get_unwrapped(t)
    return tuple(levels)


def _batched(module: nn.Module, one: Tensor, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` with its hidden states (the first positional argument, else ``hidden_states``, if a
    floating tensor; an embedding's output) multiplied by ``one``, on their device."""

    def by_one(t: Any) -> Any:
        return t * one.to(device=t.device, dtype=t.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    def batched(*args: Any, **kwargs: Any) -> Any:
        if isinstance(module, nn.Embedding):
            return by_one(forward(*args, **kwargs))
        if args:
            return forward(by_one(args[0]), *args[1:], **kwargs)
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": by_one(kwargs["hidden_states"])}
        return forward(*args, **kwargs)

    batched.__wrapped__ = forward  # type: ignore[attr-defined]
    return batched


def _input_grad_hooks(modules: Mapping[str, nn.Module]) -> list[Patch]:
    """transformers' and PEFT's ``enable_input_require_grads`` hook calls ``output.requires_grad_()``,
    which torch.func transforms refuse. It only serves reentrant checkpointing, which funcadapt
    does not run under transforms, so inside a transform the hook is skipped. Only those hook
    entries are replaced (in place), so hooks registered or removed meanwhile stay as they are."""
    found = []
    for module in modules.values():
        if not module._forward_hooks:
            continue
        for key, hook in module._forward_hooks.items():
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                found.append(Patch(module._forward_hooks, key, _outside_transforms, item=True))
    return found


def _outside_transforms(hook: Callable[..., Any]) -> Callable[..., Any]:
    def skipped_in_transforms(*args: Any) -> Any:
        if under_transforms():
            return None
        return hook(*args)

    return skipped_in_transforms


def _tie_aliases(aliases: Mapping[str, tuple[str, ...]], tensors: dict[str, Tensor]) -> None:
    """Like functional_call(tie_weights=True): a tensor given for one name of a tied (shared)
    parameter is shown under all its names, unless those are given too."""
    for name in [n for n in tensors if n in aliases]:
        for alias in aliases[name]:
            tensors.setdefault(alias, tensors[name])


def _check_live(path: str, layer: Any, adapter: str) -> None:
    """An adapter whose effect a call changes must still be in effect: params computed before
    ``merge_adapter()``, ``set_adapter()`` or ``disable_adapter()`` would otherwise do nothing."""
    if adapter in getattr(layer, "merged_adapters", ()):
        raise ValueError(
            f"layer {path!r} has adapter {adapter!r} merged into its base weights, so these params cannot change "
            f"its effect (were they computed before model.merge_adapter()?). Call model.unmerge_adapter() first"
        )
    if adapters_disabled(layer) or adapter not in active_adapters(layer, [adapter]):
        raise ValueError(
            f"layer {path!r}: adapter {adapter!r} is not in effect (not active, or inside disable_adapter()), so "
            f"PEFT's forward ignores it and these params would change nothing (were they computed before "
            f"set_adapter() or disable_adapter()?). Activate it, or extract and transform again"
        )


def _current(modules: Mapping[str, nn.Module], key: str) -> Tensor | None:
    """The model's own parameter or buffer under ``key`` (None if there is none)."""
    prefix, _, name = key.rpartition(".")
    owner = modules.get(prefix)
    if owner is None:
        return None
    return owner._parameters.get(name, owner._buffers.get(name))


def _check_keys(
    model: nn.Module, modules: Mapping[str, nn.Module], tensors: Mapping[str, Tensor], extracted: set[str]
) -> set[str]:
    """Validate keys and shapes; return the keys whose tensor is not the model's own."""
    replaced = set()
    for key, value in tensors.items():
        current = _current(modules, key)
        if current is None:
            known = [n for n, _ in model.named_parameters(remove_duplicate=False)]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"params has key {key!r}, which is not a parameter or buffer of the model{hint}")
        if value.shape != current.shape:
            raise ValueError(f"params[{key!r}] has shape {tuple(value.shape)}, the model's has {tuple(current.shape)}")
        if value is current or (key in extracted and _both_meta(value, current)):
            continue
        if key in extracted:
            raise ValueError(
                f"params come from a tree extracted from another model: {key!r} is not this model's own "
                f"Parameter (or this model's adapter was re-created, e.g. by load_adapter, since extract). "
                f"Extract from this model: funcadapt.transform(funcadapt.extract(model), ...). To run this "
                f"model on another model's adapter tensors on purpose, give them with op='replace' "
                f"(transform(extract(model), other_tree.params, op='replace'))"
            )
        replaced.add(key)
    return replaced


def _both_meta(a: Tensor, b: Tensor) -> bool:
    """Two tensors without values (accelerate keeps offloaded weights on ``meta``, and puts a new
    meta Parameter back after every forward): a tree extracted before is still the model's own."""
    return a.device.type == "meta" and b.device.type == "meta"


def _adapter_of(modules: Mapping[str, nn.Module], key: str) -> tuple[str, str] | None:
    """(layer path, adapter) when ``key`` is an adapter tensor ``<layer>.<attr>.<adapter>[...]``."""
    parts = key.split(".")
    for i in range(len(parts) - 2, -1, -1):
        layer: Any = modules.get(".".join(parts[:i]))
        if is_adapter_layer(layer):
            if parts[i] in getattr(layer, "adapter_layer_names", ()) and i + 1 < len(parts):
                return ".".join(parts[:i]), parts[i + 1]
            return None
    return None


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    *,
    randomness: str = "different",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """``torch.func.vmap`` with ``randomness="different"`` by default.

    Each coefficient in the vmapped batch then draws its own dropout mask, exactly as
    separate passes would; ``torch.func.vmap``'s default ("error") refuses any dropout
    in train mode. Pass ``randomness="same"`` to share one mask across coefficients.
    DDP with ``find_unused_parameters`` / ``static_graph``, which vmap cannot run, is
    reported with the options that work instead.
    """
    mapped = torch.func.vmap(func, in_dims, out_dims, randomness=randomness, chunk_size=chunk_size)

    @functools.wraps(func)
    def vmapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return mapped(*args, **kwargs)
        except RuntimeError as e:
            error = engines.ddp_vmap_error() if engines.raised_in_ddp_sink(e) else models.custom_function_error(e)
            if error is None:
                raise
            raise error from e

    return vmapped
