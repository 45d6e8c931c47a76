"""Engines that place weights on a layer only while it runs: FSDP 1 and 2, accelerate offload,
DeepSpeed ZeRO-3; and DDP's vmap limits.

funcadapt applies each layer's effect when the layer runs (see :mod:`funcadapt.call`), to the
tensors the layer holds *then*. This module knows where those tensors are:

* FSDP2 (``fully_shard``): outside a forward the module holds a sharded ``DTensor`` Parameter;
  its pre-forward hook registers the all-gathered, plain Parameter in ``_parameters``.
* FSDP1 (``use_orig_params=True``): during a forward the unsharded view is a plain tensor in the
  module's ``__dict__`` (and ``_parameters``); outside, a flat shard of another shape.
* accelerate offload (``cpu_offload``, ``disk_offload``, ``device_map`` with offloaded modules):
  an offloaded module's tensors sit on the ``meta`` device until its ``AlignDevicesHook`` loads
  them in its own pre-forward. An adapter layer's effect needs them before that, so the hook's
  own loading is run early and its reload skipped while the layer runs.
* DeepSpeed ZeRO-3 partitions parameters behind its own hooks, which funcadapt does not drive:
  refused (:func:`check_params`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

Undo = list[Callable[[], None]]

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """An FSDP2 ``DTensor`` parameter (outside a forward)."""
    return DTensor is not None and isinstance(t, DTensor)


def flat_shard(t: Tensor) -> bool:
    """An FSDP1 (``use_orig_params``) parameter outside a forward: a 1-d view of this rank's part of
    the flat parameter, so its shape is not the parameter's (the full tensor shows only in forward)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 ``DTensor`` parameter (no graph under ``no_grad``); any other tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def describe(modules: Iterable[nn.Module]) -> str | None:
    """The engine that places this model's weights just in time, named for error messages."""
    for m in modules:
        if is_fsdp_unit(m):
            fsdp1 = type(m).__name__ == "FullyShardedDataParallel"
            return "FSDP (FullyShardedDataParallel)" if fsdp1 else "FSDP2 (fully_shard)"
        if _offloading(m) is not None:
            return "accelerate offload (AlignDevicesHook with offload=True)"
    return None


def is_fsdp_unit(module: nn.Module) -> bool:
    """An FSDP1 wrapper or an FSDP2 ``fully_shard``-ed module: it gathers its parameters itself, when it runs."""
    kind = type(module)
    return kind.__name__ == "FullyShardedDataParallel" or any(c.__name__ == "FSDPModule" for c in kind.__mro__)


def check_units(path: str, keys: Iterable[str], modules: Mapping[str, nn.Module]) -> None:
    """Refuse adapter tensors that sit in an FSDP unit of their own inside the adapter layer at
    ``path`` (PEFT's ``fsdp_auto_wrap_policy`` wraps every trainable leaf so): that unit gathers
    them only when it runs, inside the layer, after funcadapt applied the coefficient there."""
    for key in keys:
        owner = key.rpartition(".")[0]
        parts = owner.split(".")
        depth = len(path.split(".")) if path else 0
        for i in range(depth + 1, len(parts) + 1):
            module = modules.get(".".join(parts[:i]))
            if module is not None and is_fsdp_unit(module):
                raise ValueError(
                    f"layer {path!r}: adapter tensor {key!r} is in an FSDP unit of its own "
                    f"({'.'.join(parts[:i])!r}), which gathers it only when that unit runs, after funcadapt "
                    f"applies the coefficient at the layer. Shard whole blocks instead: FSDP2 fully_shard on each "
                    f"decoder layer and the root; FSDP1 ModuleWrapPolicy({{<decoder layer class>}}) "
                    f"(not PEFT's fsdp_auto_wrap_policy, which wraps the adapter weights separately)"
                )


def check_params(path: str, tensors: Iterable[Tensor]) -> None:
    """Refuse DeepSpeed ZeRO-3 partitioned parameters (they carry ``ds_id``)."""
    for t in tensors:
        if hasattr(t, "ds_id"):
            raise ValueError(
                f"layer {path!r} holds DeepSpeed ZeRO-3 partitioned parameters, which funcadapt does not support: "
                f"ZeRO-3 gathers them in hooks funcadapt cannot apply a coefficient after. Use ZeRO stage 1 or 2, "
                f"or FSDP2 (torch.distributed.fsdp.fully_shard), under which coefficients are exact"
            )


def _offloading(module: nn.Module) -> Any:
    """The accelerate ``AlignDevicesHook`` that offloads ``module``'s own tensors, if any."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return None
    for h in getattr(hook, "hooks", (hook,)):
        if type(h).__name__ == "AlignDevicesHook" and getattr(h, "offload", False) and h.weights_map is not None:
            return h
    return None


def forward_attr(module: Any) -> str:
    """Where to install a replacement of ``module``'s forward: ``forward``, or inside an accelerate
    hook on the module itself (``_old_forward``, which the hook's forward calls after it has moved
    the inputs and loaded the weights), so that the hook still runs."""
    if isinstance(module, nn.Module) and "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook offloads ``module``'s own tensors (loads them only in its forward)."""
    return _offloading(module) is not None


def live(owner: nn.Module, name: str, undo: Undo) -> Tensor:
    """The tensor ``owner.<name>`` that the module computes with now. An offloaded module (on
    ``meta``) is loaded by its accelerate hook first; the hook is then a no-op until ``undo`` runs,
    which offloads it again (after the caller's own swaps, registered later, are undone)."""
    value = getattr(owner, name)
    if isinstance(value, Tensor) and value.device.type == "meta":
        hook = _offloading(owner)
        if hook is not None:
            from accelerate.hooks import ModelHook

            full = owner.__dict__["_hf_hook"]
            full.pre_forward(owner)
            owner.__dict__["_hf_hook"] = ModelHook()
            undo.append(functools.partial(_reoffload, owner, full))
            value = getattr(owner, name)
    return value


def _reoffload(owner: nn.Module, hook: Any) -> None:
    owner.__dict__["_hf_hook"] = hook
    hook.post_forward(owner, None)


def put(owner: nn.Module, name: str, value: Tensor, undo: Undo) -> None:
    """Show ``value`` as ``owner.<name>`` wherever the module keeps it (``_parameters``,
    ``_buffers``, or a plain attribute as FSDP1 does during a forward); ``undo`` restores."""
    stores: tuple[dict[str, Any], ...] = (owner._parameters, owner._buffers, owner.__dict__)
    for store in stores:
        if name in store:
            undo.append(functools.partial(store.__setitem__, name, store[name]))
            store[name] = value


_DDP_OPTIONS = ("find_unused_parameters", "static_graph")


def ddp_vmap_error(ddp: Any = None) -> ValueError | None:
    """The error for running a DDP model under torch.func transforms, if its settings forbid it
    (``ddp=None``: for a failure already seen in DDP's output hook, options unknown)."""
    if ddp is not None:
        if type(ddp).__name__ != "DistributedDataParallel":
            return None
        options = [o for o in _DDP_OPTIONS if getattr(ddp, o, False)]
        if not options:
            return None
        named = " and ".join(f"{o}=True" for o in options)
    else:
        named = " or ".join(f"{o}=True" for o in _DDP_OPTIONS)
    return ValueError(
        f"DistributedDataParallel with {named} wraps the model output in an autograd Function (_DDPSink) "
        f"that torch.func.vmap cannot run. Drop that option (funcadapt's coefficients need no unused-parameter "
        f"detection), or keep it and run the coefficients without vmap: a coefficient batch (funcadapt.per_row "
        f"on a tiled batch, one forward) or one AdapterModifier pass per coefficient"
    )


def raised_in_ddp_sink(error: BaseException) -> bool:
    """Whether ``error`` is torch's refusal of DDP's ``_DDPSink`` under a functorch transform."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "forward" and "_DDPSink" in tb.tb_frame.f_code.co_qualname:
            return True
        if "torch/nn/parallel/distributed.py" in tb.tb_frame.f_code.co_filename:
            return "setup_context" in str(error)
        tb = tb.tb_next
    return False
