"""One slider training step (the ±1 contrast, forward + backward) on diffusers denoisers, three ways, side by side.

  vmap              funcadapt.vmap over c = (+1, −1), attention folded into the batch (funcadapt.attention)
  vmap, unfolded    the same with torch's per-coefficient loop for SDPA (the fold switched off)
  coefficient batch one forward of the 2× batch with funcadapt.per_image([+1, −1], repeat=batch)

Denoisers: examples/sliders.py's UNet2DModel (8×8 digits, attention in its lower block) and a small
SD3-style DiT (diffusers' native attention backend). Each step timed round-robin after a warm-up,
median of --repeats, wall-clock time with --threads threads (the default 2: this machine's cores).

    python benchmarks/slider_step.py [--batch 64] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

import funcadapt

ROOT = Path(__file__).resolve().parent.parent


Inputs = Callable[[Tensor, Tensor], tuple[tuple[Any, ...], dict[str, Any]]]
"""(noisy latents, timesteps) -> the denoiser's positional and keyword arguments."""


def unet_2d() -> tuple[nn.Module, Inputs, tuple[int, ...]]:
    sys.path.insert(0, str(ROOT / "examples"))
    import sliders

    unet = sliders.make_denoiser(0)
    sliders.add_slider(unet)
    return unet, lambda x, t: ((x, t), {}), (1, 8, 8)


def dit() -> tuple[nn.Module, Inputs, tuple[int, ...]]:
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_projection_dim=64,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        out_channels=4,
    )
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"])
    inject_adapter_in_model(config, model)
    text = torch.randn(1, 8, 64)
    pooled = torch.randn(1, 32)

    def inputs(x: Tensor, t: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = x.shape[0]
        return (x,), {
            "encoder_hidden_states": text.expand(rows, -1, -1),
            "pooled_projections": pooled.expand(rows, -1),
            "timestep": t,
        }

    return model, inputs, (4, 16, 16)


def steps(model: nn.Module, inputs: Inputs, shape: tuple[int, ...], batch: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, batch, *shape, generator=g)
    noise = torch.randn(batch, *shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    tree = funcadapt.extract(model)
    signs = torch.tensor([1.0, -1.0])

    def loss_at(c: Tensor, x: Tensor) -> Tensor:
        args, kwargs = inputs(x, t)
        return (funcadapt.call(model, funcadapt.transform(tree, c), *args, **kwargs).sample - noise).pow(2).mean()

    vmapped = funcadapt.vmap(loss_at)

    def vmap_step() -> None:
        vmapped(signs, noisy).sum().backward()

    def unfolded_step() -> None:
        with mock.patch.object(sys.modules["funcadapt.call"], "folding_patches", lambda: []):
            vmap_step()

    def rows_step() -> None:
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_image([1.0, -1.0], repeat=batch)):
            args, kwargs = inputs(noisy.reshape(2 * batch, *shape), t.repeat(2))
            out = model(*args, **kwargs).sample
        (out - noise.repeat(2, *([1] * len(shape)))).pow(2).mean().mul(2).backward()

    return {"vmap": vmap_step, "vmap, unfolded": unfolded_step, "coefficient batch": rows_step}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # (the unfolded step's, measured)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of {args.repeats} (ms)")
    results: dict[str, dict[str, float]] = {}
    for name, make in (("UNet2DModel (examples/sliders.py)", unet_2d), ("SD3-style DiT", dit)):
        model, inputs, shape = make()
        model.train()
        methods = steps(model, inputs, shape, args.batch)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for fn in methods.values():
            fn()
        for _ in range(args.repeats):
            for m, fn in methods.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - start)
        medians = {m: 1e3 * statistics.median(ts) for m, ts in times.items()}
        results[name] = medians
        base = medians["vmap, unfolded"]
        print(f"{name}:")
        for m, ms in medians.items():
            print(f"  {m:<20}{ms:>9.1f} ms  {ms / base:>6.3f}× the unfolded vmap")
    return results


if __name__ == "__main__":
    main()
