"""Tiny random diffusers denoisers and pipelines (no hub access: no text encoders, prompts given as
embeddings), PEFT adapters of several families on them, and references that use nothing from funcadapt."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cases import ByOutput, randomize_adapters, reference_interpolation
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from peft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig
from torch import nn

diffusers_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*clip_sample.*")

HIDDEN = 32  # text embedding width
TOKENS = 5
STEPS = 3

UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "time_emb_proj"]
UNET_CONV = ["conv1", "conv2"]
DIT_LINEAR = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "to_out.0", "ff.net.2"]


def configs(linear: Sequence[str], conv: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """One PEFT config per family; convolutions where the family supports them."""
    both = [*linear, *conv]
    return {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=both, init_lora_weights=False),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=both),
        "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=both),
        "oft": lambda: OFTConfig(oft_block_size=4, target_modules=list(linear)),
        "boft": lambda: BOFTConfig(boft_block_size=4, target_modules=list(linear)),
        "ia3": lambda: IA3Config(target_modules=list(linear), feedforward_modules=["ff.net.2"]),
    }


FAMILIES = tuple(configs([], []))


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_sd3(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=16,
        out_channels=4,
    )


def tiny_flux(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def _vae(**kw: Any) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **kw,
    )


@dataclass
class Setup:
    """A pipeline, its denoiser, and the keyword arguments of one call for ``prompts`` prompts."""

    name: str
    pipe: Any
    denoiser: nn.Module
    pooled: bool

    def call_kwargs(self, prompts: int, seed: int = 5) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        dtype = self.denoiser.dtype
        emb = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
        kw = {"prompt_embeds": emb(prompts, TOKENS, HIDDEN), "negative_prompt_embeds": emb(prompts, TOKENS, HIDDEN)}
        if self.pooled:
            kw |= {"pooled_prompt_embeds": emb(prompts, 16), "negative_pooled_prompt_embeds": emb(prompts, 16)}
        return kw

    def run(self, kwargs: dict[str, Any], seeds: Sequence[int], images_per_prompt: int, cfg: float, **extra: Any):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if self.name != "sd" and images_per_prompt > 1:  # SD3 and Flux do not repeat embeddings they are given
            kwargs = {k: v.repeat_interleave(images_per_prompt, dim=0) for k, v in kwargs.items()}
            images_per_prompt = 1
        guidance = {"true_cfg_scale": cfg} if self.name == "flux" else {"guidance_scale": cfg}
        return self.pipe(
            **kwargs,
            **guidance,
            **extra,
            num_inference_steps=extra.pop("num_inference_steps", STEPS),
            num_images_per_prompt=images_per_prompt,
            generator=generators,
            output_type="latent",
            height=16,
            width=16,
        ).images


def setup(name: str, family: str = "lora", dtype: torch.dtype = torch.float64, adapter_name: str = "default") -> Setup:
    """A pipeline with a random denoiser carrying a random adapter of ``family`` (added as diffusers does,
    ``add_adapter``)."""
    if name == "sd":
        denoiser = tiny_unet()
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=None,
            tokenizer=None,
            unet=denoiser,
            scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        config = configs(UNET_LINEAR, UNET_CONV)[family]()
    elif name == "sdxl":
        torch.manual_seed(0)
        denoiser = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=HIDDEN,
            attention_head_dim=8,
            norm_num_groups=8,
            addition_embed_type="text_time",  # SDXL's pooled text and size conditioning
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 16,
            use_linear_projection=True,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            **dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"), None),
            unet=denoiser,
            scheduler=EulerDiscreteScheduler(),
        )
        config = configs([*UNET_LINEAR, "add_embedding.linear_1"], UNET_CONV)[family]()
    elif name == "sd3":
        denoiser = tiny_sd3()
        vae = _vae(shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
        pipe = StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            **dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3"), None),
            tokenizer_3=None,
        )
        config = configs(DIT_LINEAR, [])[family]()
    elif name == "flux":
        denoiser = tiny_flux()
        vae = _vae(shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
        pipe = FluxPipeline(
            transformer=denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            **dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), None),
        )
        config = configs(["to_q", "to_k", "to_v", "proj_mlp"], [])[family]()
    else:
        raise ValueError(name)
    denoiser.add_adapter(config, adapter_name=adapter_name)
    randomize_adapters(denoiser, scale=0.1)
    pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return Setup(name, pipe, denoiser, pooled=name in ("sdxl", "sd3", "flux"))


def rows_reference(cond: Sequence[float], uncond: Sequence[float] | None = None) -> ByOutput:
    """The reference coefficient of each row: ``cond[i]`` for image i, and for a CFG batch (2N rows)
    ``uncond`` (default: the same) on the first N rows."""
    c = torch.tensor(cond, dtype=torch.float64)
    u = c if uncond is None else torch.tensor(uncond, dtype=torch.float64)

    def at(y: torch.Tensor) -> torch.Tensor:
        k = c if y.shape[0] == len(c) else torch.cat([u, c])
        assert y.shape[0] == len(k), (y.shape, len(k))
        return k.reshape(-1, *([1] * (y.dim() - 1))).to(y.dtype)

    return ByOutput(at)


@contextlib.contextmanager
def stepped_reference(denoiser: nn.Module, per_step: Callable[[int], Any], calls_per_step: int = 1) -> Iterator[None]:
    """Reference for a schedule: the denoiser's n-th call runs at ``per_step(n // calls_per_step)``
    (a coefficient or a :class:`ByOutput`), by forward hooks and PEFT's disable switch."""
    count = [0]
    current: list[Any] = [None]

    def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        current[0] = per_step(count[0] // calls_per_step)
        count[0] += 1

    def at(y: torch.Tensor) -> Any:
        c = current[0]
        return c.at(y) if isinstance(c, ByOutput) else c

    handle = denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with reference_interpolation(denoiser, ByOutput(at)):
            yield
    finally:
        handle.remove()


def tiny_unet2d(seed: int = 0) -> nn.Module:
    """An unconditional UNet2DModel with attention blocks (DDPMPipeline's, DDIMPipeline's denoiser)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
