"""Per-image and per-step coefficients: every strength of a slider in one diffusion pipeline call.

A diffusers pipeline runs its denoiser (``pipe.unet``, ``pipe.transformer``) once per denoising step
on all its images at once. With classifier-free guidance (CFG) that batch has two halves,
``[unconditional; conditional]``, N rows each, and ``num_images_per_prompt = k`` orders the N images
prompt-major (image ``p·k + j`` is the j-th image of prompt p). :func:`per_image` gives image ``i`` its
own strength; :func:`per_step` gives every denoising step its own (and, if wanted, every image its own
at every step). Given to :func:`funcadapt.transform`, :class:`funcadapt.AdapterModifier` or
:func:`funcadapt.call` with ``op="scale"`` and ``mode="linear"`` on the denoiser, every adapted layer
computes, row by row,

    y[r] = y0[r] + c[r]·(y1[r] − y0[r])

(the per-layer interpolation of linear mode, :func:`funcadapt.per_row`) with ``c[r]`` the strength of
the image that row ``r`` belongs to, at the step running now::

    strengths = funcadapt.per_image([-2.0, -1.0, 0.0, 1.0, 2.0])
    with funcadapt.AdapterModifier(pipe.unet, "scale", strengths):
        images = pipe(prompt_embeds=..., num_images_per_prompt=5, generator=generators).images

**Which rows are which** is read where the forward enters the denoiser: its first argument (the latents,
``sample`` or ``hidden_states``, or a list of one tensor per image) has R rows. R = N: no CFG, row i is
image i. R = 2N with both halves the same latents and different conditioning: the CFG batch, rows
``0 … N−1`` the unconditional predictions and ``N … 2N−1`` the conditional ones, in image order (what
diffusers' pipelines concatenate). Any other R raises (2N rows that are not such a batch are 2N images),
except that a single strength for every image (``per_image([c])``, ``per_step`` of shape ``[S]``) fits any
R. A layer whose output does not have R rows (one that folds frames or tokens into its batch) raises too.

**The unconditional half** (``uncond``): ``"same"`` (the default) steers it with the image's own
strength, as Concept Sliders do; a number runs it at that coefficient instead (``uncond=0.0``: only the
conditional prediction is steered). A number is placed only on denoisers known to put the unconditional
half first (:data:`UNCOND_FIRST`: SD, SDXL, SD3, PixArt, Sana, HunyuanDiT, AuraFlow; some pipelines put the
conditional half first), and refused under perturbed-attention guidance and at a separate unconditional
denoiser call with the same latents at the same timestep (Flux's ``true_cfg_scale``), which cannot be told
apart by rows (refused at that second call, or where no timestep can be read; ``"same"`` steers both calls
alike).

**Steps** are the distinct timesteps the denoiser is called with (its ``timestep`` argument), numbered in
the order they first appear in the context: step k of a schedule is the k-th distinct timestep, the k-th
step the pipeline runs (fewer than ``num_inference_steps`` with an img2img ``strength`` below 1, one more
than the steps with Heun-type schedulers, which evaluate the denoiser twice at inner timesteps). A call at
a timestep already seen (a separate unconditional pass, a second evaluation, a second pipeline call with
the same timesteps, a recomputed checkpoint) gets that timestep's step again. A step past the schedule's
last raises as it runs, and a context that ran at another number of distinct timesteps than the schedule
gives raises when it exits (two timesteps rounded to one number, as in bfloat16, would otherwise shift every
later value). :func:`funcadapt.call` runs one forward, so it refuses per-step coefficients.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import models
from .entries import EntryRecorder

Uncond = Literal["same"] | float


@dataclass(frozen=True, eq=False)
class PerImage:
    """Coefficients per image and per denoising step, held in one tensor laid out for placement:
    ``[H, N]`` (one per image, constant over steps) or ``[S, H, N]`` (one per step), with a trailing group
    axis under ``groups``. Axis H has 1 entry (the unconditional half runs at the image's own strength)
    or 2 (unconditional, conditional). N = 1 with H = 1 means every image alike. Build it with
    :func:`per_image` or :func:`per_step`."""

    values: Tensor
    groups: Any = None

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.values.shape)
        kind = "per step" if self.values.dim() - (self.groups is not None) == 3 else "per image"
        return f"PerImage({kind}, {shape}{', groups' if self.groups is not None else ''})"


def per_image(
    values: Tensor | Sequence[Any], *, uncond: Uncond = "same", repeat: int = 1, groups: Any = None
) -> PerImage:
    """One strength per image of a pipeline call: ``values[i]`` for image ``i`` (shape ``[N]``, or
    ``[N, G]`` with ``groups``, one vector per image). ``repeat=k``: each value repeated k times in a
    row, one per prompt for ``num_images_per_prompt=k``. ``uncond``: the strength of the unconditional
    half of a CFG batch, ``"same"`` as the image's own (see the module docstring). ``values`` may require
    grad."""
    tensor = _as_values(values, 1, groups, "per_image", "[N] (one per image)", "[N, G] (one vector per image)")
    tensor = _repeated(tensor, repeat, 0)
    return PerImage(_halves(tensor, uncond, 0), groups)


def per_step(
    values: Tensor | Sequence[Any], *, uncond: Uncond = "same", repeat: int = 1, groups: Any = None
) -> PerImage:
    """One strength per denoising step: ``values[k]`` at step k for every image (shape ``[S]``), or
    ``values[k, i]`` for image i (``[S, N]``); with ``groups`` one vector each (``[S, G]``, ``[S, N, G]``).
    ``repeat`` (with ``[S, N]``): each image's column repeated for ``num_images_per_prompt``. ``uncond``
    as in :func:`per_image`; a number needs values per image (``[S, N]``), since the rows of the
    unconditional half are only known by the number of images."""
    tensor = _as_values(
        values, (1, 2), groups, "per_step", "[S] or [S, N] (one per step, or per step and image)", "[S, G] or [S, N, G]"
    )
    extra = 0 if groups is None else 1
    if tensor.dim() == 1 + extra:
        if uncond != "same":
            raise ValueError(
                "per_step with a number for uncond needs one value per step and image ([S, N]): the unconditional "
                "half's rows are known by the number of images N. Give values[:, None].expand(S, N)"
            )
        tensor = tensor.unsqueeze(1)  # every image alike
    elif repeat != 1:
        tensor = _repeated(tensor, repeat, 1)
    return PerImage(_halves(tensor, uncond, 1), groups)


def _as_values(
    values: Any, dims: int | tuple[int, ...], groups: Any, name: str, plain: str, grouped: str
) -> Tensor:
    if isinstance(values, PerImage):
        raise TypeError(f"{name} takes the strengths themselves, not a PerImage")
    tensor = values if isinstance(values, Tensor) else torch.tensor(values)
    extra = 0 if groups is None else 1
    allowed = (dims,) if isinstance(dims, int) else dims
    if tensor.dim() - extra not in allowed or tensor.numel() == 0:
        raise ValueError(f"{name} takes strengths of shape {grouped if extra else plain}, got {tuple(tensor.shape)}")
    return tensor if tensor.is_floating_point() else tensor.to(torch.get_default_dtype())


def _repeated(tensor: Tensor, repeat: int, axis: int) -> Tensor:
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int (images per prompt), got {repeat!r}")
    return tensor.repeat_interleave(repeat, dim=axis) if repeat > 1 else tensor


def _halves(tensor: Tensor, uncond: Uncond, axis: int) -> Tensor:
    """``tensor`` with the halves axis inserted at ``axis``: 1 entry for ``"same"``, else (uncond, cond)."""
    if isinstance(uncond, str):
        if uncond != "same":
            raise ValueError(f"uncond must be 'same' or a number (the unconditional half's strength), got {uncond!r}")
        return tensor.unsqueeze(axis)
    if isinstance(uncond, bool) or not isinstance(uncond, int | float):
        raise TypeError(f"uncond must be 'same' or a number, got {type(uncond).__name__}")
    if not torch.isfinite(torch.tensor(float(uncond))):
        raise ValueError(f"uncond must be finite, got {uncond!r}")
    return torch.stack([torch.full_like(tensor, float(uncond)), tensor], dim=axis)


@dataclass(frozen=True)
class Pass:
    """One denoiser forward: its input's ``rows``; ``step`` (None: no timestep could be read), and the same
    as a 0-d int64 tensor, ``index``, which is what layers read (compiled, a tensor is an input of the graph,
    where a number would be a constant and each step a graph of its own); ``repeated``: a call at the previous
    call's timestep with the same latents (a separate unconditional pass); ``paired``: the two halves of the
    latents are equal, as in a guidance batch."""

    rows: int
    step: int | None
    repeated: bool = False
    paired: bool = False
    index: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.step is not None and self.index is None:
            object.__setattr__(self, "index", torch.tensor(self.step))  # (frozen)


class Passes(EntryRecorder[Pass]):
    """The denoiser forwards running now, recorded where they enter the model (:mod:`funcadapt.entries`),
    and the steps of the context: each distinct timestep the denoiser is called with is a step, numbered in
    order of first appearance.

    ``schedule``: the number of steps the per-step coefficients give (0: none are per step), checked by
    :meth:`finished` when the context exits; ``uncond_given``: some coefficient gives the unconditional half
    its own strength, which needs the pipeline's batch layout checked."""

    outside = (
        "per-image coefficients are placed by the rows of the denoiser's input, read where the forward enters "
        "it, and this layer ran without them: call the denoiser (pipe.unet, pipe.transformer) itself, not one "
        "of its submodules"
    )

    def __init__(self, model: Any, schedule: int = 0, uncond_given: bool = False) -> None:
        super().__init__()
        self.steps: dict[float, int] = {}
        self.last: tuple[float, Latents] | None = None
        self.schedule = schedule
        self.uncond_given = uncond_given
        self.model = model

    def finished(self) -> None:
        """Raise if the denoiser ran at another number of distinct timesteps than the schedule gives (and at
        least one): the schedule's values then did not meet the steps they were meant for."""
        ran = len(self.steps)
        if self.schedule and ran and ran != self.schedule:
            raise ValueError(
                f"the per-step schedule gives {self.schedule} steps, but the denoiser ran at {ran} distinct "
                f"timesteps in this context, so the images did not get the schedule as given (steps are the "
                f"distinct timesteps, in order: the steps the pipeline runs, fewer with img2img strength < 1, "
                f"one more with Heun-type schedulers, fewer where two timesteps round to one number, as in "
                f"bfloat16). Give one value per distinct timestep, and one pipeline call per context"
            )

    def entering(self, forward: Any, wrapper: bool = False) -> Any:
        try:
            signature: inspect.Signature | None = inspect.signature(forward)
        except (TypeError, ValueError):
            signature = None
        unnamed = signature is not None and _only_passes_on(signature)
        if unnamed and wrapper:
            # a wrapper's forward(*args, **kwargs) (PEFT's, DDP's, FSDP1's, torch.compile's) names no argument,
            # so which one is the latents or the timestep is read where the denoiser's own forward starts
            return lambda args, kwargs: self.wrapped

        @torch.compiler.disable  # bookkeeping that reads numbers (the timestep): run eagerly, not traced
        def enter(args: tuple, kwargs: Mapping[str, Any]) -> Pass | str:
            if unnamed and not args:  # (the first keyword could be any argument, the timestep say)
                return self.unnamed
            return self._enter(_arguments(signature, args, kwargs))

        return enter

    wrapped = (
        "per-image coefficients are read where the denoiser's own forward starts, inside this wrapper "
        "(forward(*args, **kwargs)), and it did not run there: give AdapterModifier the denoiser itself, or a "
        "wrapper that calls its forward"
    )
    unnamed = (
        "per-image coefficients read the images from the denoiser's first argument, and this forward names none "
        "(forward(*args, **kwargs)) and was called with keywords only: pass the latents first, positionally, or "
        "give AdapterModifier the denoiser inside it"
    )

    def _enter(self, arguments: Mapping[str, Any]) -> Pass | str:
        latents = _latents(arguments)
        if isinstance(latents, str):
            return latents
        rows = len(latents)
        outer = next((p for p in reversed(self.stack) if isinstance(p, Pass) and p.step is not None), None)
        if outer is not None:  # the same forward, one entry module further in: the same step
            return Pass(rows, outer.step, outer.repeated, outer.paired)
        if self.uncond_given:
            refused = _order_unknown(self.model)
            if refused:
                return refused
        paired = _guidance_batch(latents, _conditioning(arguments, rows))
        t = _timestep(arguments)  # (a wrapper's forward(*args, **kwargs) names none: its inner module's does)
        if t is None:
            return Pass(rows, None, paired=paired)
        step = self.steps.setdefault(t, len(self.steps))
        if self.schedule and step >= self.schedule:
            return (
                f"the schedule gives {self.schedule} steps, and the denoiser is running step {step + 1} (distinct "
                f"timestep number {step + 1} in this context). Give one value per distinct timestep the pipeline "
                f"runs the denoiser at: num_inference_steps, fewer with img2img strength < 1, more with schedulers "
                f"that evaluate the denoiser at inner timesteps (Heun: one more, KDPM2: 2·steps − 1)"
            )
        last, self.last = self.last, (t, latents)
        repeated = self.uncond_given and last is not None and last[0] == t and _same(last[1], latents)
        return Pass(rows, step, repeated, paired)


def _only_passes_on(signature: inspect.Signature) -> bool:
    """A forward taking only ``*args`` and ``**kwargs``."""
    kinds = {p.kind for p in signature.parameters.values()}
    return bool(kinds) and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


Latents = Tensor | list[Tensor]
"""A denoiser's first argument: a batch tensor, or one tensor per image (Z-Image's ``x``)."""


def _latents(arguments: Mapping[str, Any]) -> Latents | str:
    """The denoiser's first argument, its latents (never a later one: that could be the timestep), or why not."""
    first = next(iter(arguments.values()), None)
    if isinstance(first, Tensor) and first.dim() > 0:
        return first
    if isinstance(first, list | tuple) and first and all(isinstance(x, Tensor) for x in first):
        return list(first)
    return (
        "per-image coefficients read the images from the denoiser's first argument (its latents, a batch tensor "
        f"or a list of one tensor per image), and this forward's is a {type(first).__name__}: pass the latents first"
    )


def _halves_equal(x: Latents) -> bool:
    half = len(x) // 2
    if len(x) % 2 or not half:
        return False
    if isinstance(x, Tensor):
        return bool(torch.equal(x[:half], x[half:]))
    return all(_same(a, b) for a, b in zip(x[:half], x[half:], strict=True))


def _same(a: Latents, b: Latents) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


CONDITIONING = ("encoder_hidden_states", "class_labels", "context", "cap_feats")
"""Names of the argument carrying a denoiser's conditioning (text embeddings, class labels)."""


def _conditioning(arguments: Mapping[str, Any], rows: int) -> Latents | None:
    for name in CONDITIONING:
        value = arguments.get(name)
        if isinstance(value, Tensor) and value.dim() and int(value.shape[0]) == rows:
            return value
        if isinstance(value, list | tuple) and len(value) == rows and all(isinstance(v, Tensor) for v in value):
            return list(value)
    return None


def _guidance_batch(latents: Latents, conditioning: Latents | None) -> bool:
    """A classifier-free-guidance batch: the same latents twice, with different conditioning (2N images of
    one prompt from one seed have equal halves too, and are not one)."""
    return conditioning is not None and _halves_equal(latents) and not _halves_equal(conditioning)


UNCOND_FIRST: dict[str, str] = {
    # each: its pipelines concatenate [negative; prompt] and split noise_pred_uncond, noise_pred_text (diffusers 0.42)
    "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel": "SD, SDXL, Kolors",
    "diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel": "SD3",
    "diffusers.models.transformers.pixart_transformer_2d.PixArtTransformer2DModel": "PixArt",
    "diffusers.models.transformers.sana_transformer.SanaTransformer2DModel": "Sana",
    "diffusers.models.transformers.hunyuan_transformer_2d.HunyuanDiT2DModel": "HunyuanDiT",
    "diffusers.models.transformers.auraflow_transformer_2d.AuraFlowTransformer2DModel": "AuraFlow",
}
"""Denoisers whose guidance batches are known to be ``[unconditional; conditional]``, by class, as read from
their pipelines' code: only on these is a strength of the unconditional half (``uncond`` a number) placed.
Others put the conditional half first (Stable Cascade, Lumina, OmniGen, DiT's class labels, Z-Image); add a
class here (``funcadapt.images.UNCOND_FIRST[path] = "your pipeline"``) once you have read its pipeline's order."""


def _order_unknown(model: Any) -> str:
    """Why ``uncond`` as a number cannot be placed on this model's guidance batches, or ``""``: its denoiser is
    not known to put the unconditional half first (:data:`UNCOND_FIRST`), or perturbed-attention guidance is on
    (its batch adds a perturbed copy, and without guidance its halves are [conditional; perturbed])."""
    known = False
    for module in model.modules():
        known = known or models.qualified(type(module)) in UNCOND_FIRST
        processor = getattr(module, "processor", None)
        if processor is not None and type(processor).__name__.startswith("PAG"):
            return (
                "perturbed-attention guidance is on (a PAG attention processor), whose batch is not "
                "[unconditional; conditional], so a strength of the unconditional half (uncond as a number) "
                "cannot be placed; use uncond='same'"
            )
    if known:
        return ""
    return (
        f"a strength of the unconditional half (uncond as a number) is placed only on denoisers known to put it "
        f"first in their guidance batches (funcadapt.images.UNCOND_FIRST), and {type(model).__name__} is not one "
        f"(some pipelines put the conditional half first). Use uncond='same', or, once you have read your "
        f"pipeline's order, add the denoiser's class to funcadapt.images.UNCOND_FIRST"
    )


def _arguments(signature: inspect.Signature | None, args: tuple, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The forward's arguments by name, in order (positional ones by index where they cannot be bound)."""
    if signature is not None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            pass
        else:
            named: dict[str, Any] = {}
            for name, value in bound.items():
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:  # a wrapper's forward(*args, **kwargs)
                    named.update((f"*{i}", a) for i, a in enumerate(value))
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                else:
                    named[name] = value
            return named
    return {**{f"*{i}": a for i, a in enumerate(args)}, **kwargs}


def _timestep(arguments: Mapping[str, Any]) -> float | None:
    for name in ("timestep", "timesteps", "t"):
        t = arguments.get(name)
        if isinstance(t, Tensor) and t.numel():
            return float(t.reshape(-1)[0])
        if isinstance(t, int | float) and not isinstance(t, bool):
            return float(t)
    return None


def image_coefficients(where: str, c: Tensor, now: Pass, y: Tensor) -> Tensor:
    """The coefficient of each row of ``y`` (a layer's output, or an activation laid out like it),
    broadcastable to it, for per-image coefficients ``c`` (``[H, N]`` or ``[S, H, N]``, see
    :class:`PerImage`) in the denoiser pass ``now``."""
    if c.dim() == 3:
        if now.index is None:
            raise ValueError(
                f"{where}: per-step coefficients count the denoising steps by the denoiser's timestep argument, "
                f"and this forward was called without one (an argument named timestep)"
            )
        # (a step past the schedule was refused where the pass was recorded)
        c = c.index_select(0, now.index.reshape(1).to(c.device))[0]
    halves, images = int(c.shape[0]), int(c.shape[1])
    rows = now.rows
    got = int(y.shape[0]) if y.dim() else 0
    if got != rows:
        raise ValueError(
            f"{where}: its output has {got} rows, but the denoiser's input has {rows}: per-image coefficients need "
            f"a layer that keeps the batch's rows (one that folds frames, patches or tokens into its batch "
            f"cannot be given them). Give it one coefficient, or leave it out (adapter_names, groups)"
        )
    if halves == 1 and images == 1:
        k = c[0].expand(rows)
    elif rows == images:
        if halves == 2 and now.index is None:
            raise ValueError(
                f"{where}: with a strength for the unconditional half (uncond as a number), a denoiser call of one "
                f"row per image may be a separate unconditional pass, which funcadapt tells apart by its timestep, "
                f"and this forward has none it can read (an argument named timestep). Use uncond='same'"
            )
        if halves == 2 and now.repeated:
            raise ValueError(
                f"{where}: the denoiser is called a second time at the same timestep, so the pipeline runs the "
                f"unconditional prediction as a separate call, and funcadapt cannot tell which call is which: "
                f"uncond as a number is refused here. Use uncond='same' (both calls at the image's strength)"
            )
        k = c[-1]
    elif rows == 2 * images:
        if not now.paired:
            raise ValueError(
                f"{where}: the denoiser's input has {rows} rows for {images} per-image strengths, but it is not a "
                f"classifier-free-guidance batch (whose two halves are the same latents with different conditioning, "
                f"passed as encoder_hidden_states or class_labels): give one strength per image ({rows}). With "
                f"num_images_per_prompt = k: per_image(one_per_prompt, repeat=k)"
            )
        k = torch.cat([c[0], c[-1]])
    else:
        raise ValueError(
            f"{where}: the denoiser's input has {rows} rows and {images} per-image strengths were given; give one "
            f"per image ({rows} without classifier-free guidance, {rows // 2 if rows % 2 == 0 else rows} with it). "
            f"With num_images_per_prompt = k, N = prompts·k: per_image(one_per_prompt, repeat=k)"
        )
    return k.reshape(-1, *([1] * (y.dim() - 1)))
