"""A concept slider on a diffusion model made here, every strength from one pipeline call.

No pretrained diffusion weights can be downloaded here, so the example makes a small real one: a
diffusers ``UNet2DModel`` trained on scikit-learn's bundled 8×8 digit images (1797 of them), sampled
with diffusers' ``DDIMPipeline``. Then a slider LoRA is trained with the Concept Sliders contrast on
image pairs the example makes itself: each digit with thicker strokes (grey dilation) and with thinner
ones (grey erosion). At +1 the adapter denoises towards the thick version, at −1 towards the thin one,
from the same noise: both halves of the ±1 contrast in ONE vmapped step (``funcadapt.vmap``).

Shown (``--out``, default ``docs/``):

* a grid, rows seeds and columns strengths from −2 to 2, from ONE ``DDIMPipeline`` call
  (``funcadapt.per_image``), beside the same grid from one call per strength, and their largest
  difference;
* the measured effect curve: mean stroke mass (mean pixel intensity in [0, 1]) against strength, at c
  and −c, with the mass of the training pairs for scale;
* a schedule (``funcadapt.per_step``): strength 2 only from step k on, which keeps more of the c = 0
  digit, as the Sliders authors recommend;
* the time of one call at 5 strengths against 5 calls.

    python examples/sliders.py             # trains both (a few minutes on 2 CPU cores), writes the figure
    python examples/sliders.py --quick     # seconds: a few training steps, no figure (for tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, inject_adapter_in_model
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import Tensor, nn

import funcadapt

STRENGTHS = [-2.0, -1.0, 0.0, 1.0, 2.0]
SLIDER = "thickness"


def digits() -> Tensor:
    """scikit-learn's 8×8 digits as [1797, 1, 8, 8] in [−1, 1] (pixel values 0…16)."""
    return torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8 - 1


def stroke_pairs(images: Tensor) -> tuple[Tensor, Tensor]:
    """(thin, thick): every image with its strokes eroded and dilated by a 2×2 grey morphology."""
    x = images.squeeze(1).numpy()
    thin = np.stack([ndimage.grey_erosion(im, size=(2, 2)) for im in x])
    thick = np.stack([ndimage.grey_dilation(im, size=(2, 2)) for im in x])
    return torch.from_numpy(thin).unsqueeze(1), torch.from_numpy(thick).unsqueeze(1)


def make_denoiser(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def train_denoiser(unet: nn.Module, images: Tensor, steps: int, seed: int, batch: int = 128) -> list[float]:
    """DDPM's ε-prediction objective, AdamW with a cosine decay; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    losses = []
    unet.train()
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = (unet(noise_schedule.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(float(loss.detach()))
    unet.eval()
    return losses


def add_slider(unet: nn.Module) -> None:
    """A LoRA on attention and resnet convolutions, injected as diffusers' ``add_adapter`` does (UNet2DModel
    has no add_adapter of its own); only its tensors train."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    inject_adapter_in_model(config, unet, adapter_name=SLIDER)


def train_slider(unet: nn.Module, thin: Tensor, thick: Tensor, steps: int, seed: int, batch: int = 64) -> list[float]:
    """The Concept Sliders objective on image pairs: from the same noise ε and timestep t, the adapter at
    +1 predicts ε of the thick image's noisy version and at −1 of the thin one's. Both in one vmapped step:
    ``funcadapt.vmap`` over c = (+1, −1) and the stacked noisy inputs."""
    g = torch.Generator().manual_seed(seed)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000)
    tree = funcadapt.extract(unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    signs = torch.tensor([1.0, -1.0], dtype=thin.dtype)

    def loss_at(c: Tensor, noisy: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        out = funcadapt.call(unet, funcadapt.transform(tree, c), noisy, t).sample
        return (out - noise).pow(2).mean()

    step = funcadapt.vmap(loss_at, in_dims=(0, 0, None, None))
    losses = []
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(thin), (batch,), generator=g)
        noise = torch.randn((batch, 1, 8, 8), generator=g, dtype=thin.dtype)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = torch.stack([noise_schedule.add_noise(x[idx], noise, t) for x in (thick, thin)])
        loss = step(signs, noisy, t, noise).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval()
    return losses


def pipeline(unet: nn.Module) -> DDIMPipeline:
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: DDIMPipeline, seeds: list[int], coeff: Any, steps: int) -> Tensor:
    """One pipeline call: image i from seed ``seeds[i]``, under the slider at ``coeff``; [N, 8, 8] in [0, 1]."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with funcadapt.AdapterModifier(pipe.unet, "scale", coeff):
        out = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="np")
    return torch.from_numpy(np.asarray(out.images)).squeeze(-1)


def grids(pipe: DDIMPipeline, seeds: list[int], steps: int) -> tuple[Tensor, Tensor, float, float]:
    """(one call, one call per strength, seconds of each): images [seeds, strengths, 8, 8]."""
    k = len(STRENGTHS)
    start = time.perf_counter()
    one = sample(pipe, [s for s in seeds for _ in STRENGTHS], funcadapt.per_image(STRENGTHS * len(seeds)), steps)
    one_time = time.perf_counter() - start
    start = time.perf_counter()
    separate = torch.stack([sample(pipe, seeds, c, steps) for c in STRENGTHS], dim=1)
    separate_time = time.perf_counter() - start
    return one.reshape(len(seeds), k, 8, 8), separate, one_time, separate_time


def effect_curve(pipe: DDIMPipeline, seeds: list[int], strengths: list[float], steps: int) -> list[float]:
    """Mean stroke mass (mean intensity) of the images at each strength, all from one call."""
    images = sample(pipe, [s for s in seeds for _ in strengths], funcadapt.per_image(strengths * len(seeds)), steps)
    return images.reshape(len(seeds), len(strengths), -1).mean(dim=(0, 2)).tolist()


def delayed(pipe: DDIMPipeline, seeds: list[int], steps: int, strength: float, starts: list[int]) -> Tensor:
    """Images at ``strength`` from step k on (0 before), one column per k in ``starts``, from one call:
    ``funcadapt.per_step`` with a [steps, images] table. [seeds, len(starts), 8, 8]."""
    table = torch.tensor([[strength if step >= k else 0.0 for k in starts] for step in range(steps)])
    table = table.repeat(1, len(seeds))  # image i = seed i // len(starts), start i % len(starts)
    images = sample(pipe, [s for s in seeds for _ in starts], funcadapt.per_step(table), steps)
    return images.reshape(len(seeds), len(starts), 8, 8)


def tiled(grid: Tensor) -> Tensor:
    """[rows, cols, 8, 8] images as one picture, with a blank pixel between neighbours."""
    rows, cols = grid.shape[:2]
    padded = torch.nn.functional.pad(grid, (0, 1, 0, 1))
    return padded.permute(0, 2, 1, 3).reshape(rows * 9, cols * 9)[:-1, :-1]


def figure(path: Path, one: Tensor, separate: Tensor, curve: list[float], curve_at: list[float],
           masses: dict[str, float], late: Tensor, starts: list[int], steps: int) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 4.6), gridspec_kw={"width_ratios": [5, 5, 6, len(starts)]})
    pictures = [(one, "one pipeline call (per_image)", STRENGTHS, "strength")]
    pictures += [(separate, "one call per strength", STRENGTHS, "strength")]
    pictures += [(late, "schedule (per_step), one call", starts, f"strength 2 from step k of {steps}")]
    for ax, (grid, title, ticks, label) in zip([axes[0], axes[1], axes[3]], pictures, strict=True):
        ax.imshow(tiled(grid), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks(
            [9 * j + 3.5 for j in range(len(ticks))], [f"{t:+g}" if label == "strength" else str(t) for t in ticks]
        )
        ax.set_yticks([])
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("seed")
    ax = axes[2]
    ax.plot(curve_at, curve, "o-", label="mass at c")
    positive = [c for c in curve_at if c > 0]
    reflected = [2 * curve[curve_at.index(0.0)] - curve[curve_at.index(-c)] for c in positive]
    ax.plot(positive, reflected, "x", color="C1", label="mass at −c, reflected about c = 0")
    for name, mass in masses.items():
        ax.axhline(mass, ls=":", color="gray")
        ax.text(curve_at[0], mass, f" {name}", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("slider strength c")
    ax.set_ylabel("mean stroke mass")
    ax.set_title("effect curve (one call)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few training steps, no figure (seconds)")
    parser.add_argument("--denoiser-steps", type=int, default=None)
    parser.add_argument("--slider-steps", type=int, default=None)
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps per image")
    parser.add_argument("--seeds", type=int, default=None, help="rows of the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="a .pt file: the trained denoiser and slider are loaded from it, else saved")
    parser.add_argument("--out", help="folder for the figure (default: docs/, none with --quick)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    quick = args.quick
    denoiser_steps = args.denoiser_steps or (4 if quick else 2500)
    slider_steps = args.slider_steps or (3 if quick else 600)
    steps = args.sampling_steps or (4 if quick else 25)
    seeds = list(range(args.seeds or (2 if quick else 6)))
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    images = digits().to(dtype)
    thin, thick = (x.to(dtype) for x in stroke_pairs(images.float()))
    unet = make_denoiser(args.seed).to(dtype)
    cache = Path(args.cache) if args.cache else None
    start = time.perf_counter()
    if cache is not None and cache.is_file():
        state = torch.load(cache)
        unet.load_state_dict(state["denoiser"])
        add_slider(unet)
        funcadapt.load_params(funcadapt.extract(unet), state["slider"])
        unet.eval()
        losses: dict[str, float] = {}
    else:
        base_losses = train_denoiser(unet, images, denoiser_steps, args.seed)
        base_state = {k: v.clone() for k, v in unet.state_dict().items()}
        add_slider(unet)
        slider_losses = train_slider(unet, thin, thick, slider_steps, args.seed + 1)
        losses = {"denoiser": statistics.mean(base_losses[-50:]), "slider": statistics.mean(slider_losses[-50:])}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"denoiser": base_state, "slider": funcadapt.trainable(funcadapt.extract(unet))}, cache)
    train_time = time.perf_counter() - start

    pipe = pipeline(unet)
    with torch.no_grad():
        one, separate, one_time, separate_time = grids(pipe, seeds, steps)
        curve_at = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
        curve = effect_curve(pipe, seeds, curve_at, steps)
        starts = [0, steps // 4, steps // 2, 3 * steps // 4, steps]  # k = steps: never (the base model)
        late = delayed(pipe, seeds, steps, 2.0, starts)
    to_unit = lambda x: float(((x + 1) / 2).clamp(0, 1).mean())  # noqa: E731
    masses = {"thin pairs": to_unit(thin), "digits": to_unit(images), "thick pairs": to_unit(thick)}
    difference = float((one - separate).abs().max())
    result = {
        "train_seconds": round(train_time, 1),
        "losses": losses,
        "max_difference_one_call_vs_separate": difference,
        "curve": dict(zip(curve_at, curve, strict=True)),
        "masses": masses,
        "one_call_seconds": one_time,
        "separate_calls_seconds": separate_time,
        "speedup": separate_time / one_time,
        "images": {"one": one, "separate": separate, "late": late},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=1))
    out = Path(args.out) if args.out else None if quick else Path(__file__).resolve().parent.parent / "docs"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result["figure"] = out / "sliders_digits.png"
        figure(result["figure"], one, separate, curve, curve_at, masses, late, starts, steps)
        print(f"wrote {result['figure']}")
    return result


if __name__ == "__main__":
    main()
