"""Eager cost per adapted layer, from the slope over the number of adapted layers.

Tiny Llamas (hidden 64, batch 1×8, one thread, so that Python overhead is what is measured) with
LoRA r = 4 on q/v/o/down in 2, 8 and 32 blocks (8, 32, 128 adapted layers). For each way of
running a coefficient, the time above PEFT's own forward on the same model, per adapted layer:

  call(c=1)          funcadapt.call(model, transform(tree, 1.0), ...)           (extract once)
  call(c=-1)         funcadapt.call(model, transform(tree, torch.tensor(-1.0)), ...)
  modifier(c=-1)     entering AdapterModifier(model, "scale", torch.tensor(-1.0)), a forward, exiting
  inside(-1)         a forward inside an entered AdapterModifier (what each generate() step pays)
  inside(1)          the same at c = 1.0

Each timed alternately with PEFT's own forward (so that a slow stretch of the machine hits both),
minimum of --repeats; the last row is the slope between the smallest and largest model, the cost of
each further adapted layer without the fixed cost per call. Printed side by side in one run. Times
are the thread's CPU time (``time.thread_time``), which a shared machine's other tenants do not add
to; ``--clock wall`` uses ``time.perf_counter``. ``--parts`` adds, on the largest model, what each
stage of ``call(c=-1)`` costs per adapted layer on its own.

    python benchmarks/overhead.py [--parts]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import funcadapt


def model_with(blocks: int) -> nn.Module:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    return peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=targets)).eval()


CLOCK: Callable[[], float] = time.thread_time


def fastest(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def paired(fn: Callable[[], Any], plain: Callable[[], Any], repeats: int) -> float:
    """Seconds ``fn`` takes above ``plain``: each timed alternately with the other (so that a slow
    stretch of the machine hits both), minimum of ``repeats`` each."""
    fn(), plain()
    best_fn = best_plain = float("inf")
    for _ in range(repeats):
        for which in (fn, plain):
            t = CLOCK()
            which()
            took = CLOCK() - t
            if which is fn:
                best_fn = min(best_fn, took)
            else:
                best_plain = min(best_plain, took)
    return best_fn - best_plain


COLUMNS = {"call(c=1)": 11, "call(c=-1)": 12, "modifier": 10, "inside(-1)": 12, "inside(1)": 11}


def main(argv: list[str] | None = None) -> None:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--parts", action="store_true", help="the stages of call(c=-1) on the largest model")
    args = parser.parse_args(argv)
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ids = torch.randint(0, 96, (1, 8))
    minus = torch.tensor(-1.0)
    print(
        f"torch {torch.__version__}, one thread, {args.clock} time; µs per adapted layer above PEFT's forward (each "
        f"timed alternately with PEFT's, min of {args.repeats})"
    )
    print(f"{'layers':>7}{'PEFT ms':>9}" + "".join(f"{h:>{w}}" for h, w in COLUMNS.items()))
    extra: dict[int, dict[str, float]] = {}
    for blocks in args.blocks:
        model = model_with(blocks)
        tree = funcadapt.extract(model)
        layers = len(tree.layers)

        def forward(m: nn.Module = model) -> None:
            m(input_ids=ids)

        def modifier(c: Any, m: nn.Module = model) -> None:
            with funcadapt.AdapterModifier(m, "scale", c):
                m(input_ids=ids)

        with torch.no_grad():
            plain = fastest(forward, args.repeats)
            runs = {
                "call(c=1)": lambda m=model, t=tree: funcadapt.call(m, funcadapt.transform(t, 1.0), input_ids=ids),
                "call(c=-1)": lambda m=model, t=tree: funcadapt.call(m, funcadapt.transform(t, minus), input_ids=ids),
                "modifier": lambda: modifier(minus),
            }
            times = {name: paired(fn, forward, args.repeats) for name, fn in runs.items()}
            for name, c in (("inside(-1)", minus), ("inside(1)", 1.0)):
                times[name] = paired_inside(funcadapt.AdapterModifier(model, "scale", c), forward, args.repeats)
        extra[layers] = times
        per = {name: 1e6 * t / layers for name, t in times.items()}
        print(f"{layers:>7}{1e3 * plain:>9.2f}" + "".join(f"{per[h]:>{w}.1f}" for h, w in COLUMNS.items()))
    if len(extra) > 1:  # the slope: what each further adapted layer costs, fixed costs per call removed
        few, many = min(extra), max(extra)
        slope = {h: 1e6 * (extra[many][h] - extra[few][h]) / (many - few) for h in COLUMNS}
        print(f"{'slope':>7}{'':>9}" + "".join(f"{slope[h]:>{w}.1f}" for h, w in COLUMNS.items()))
    if args.parts:
        parts(model_with(max(args.blocks)), ids, minus, args.repeats)


def paired_inside(context: funcadapt.AdapterModifier, forward: Callable[[], Any], repeats: int) -> float:
    """Seconds a forward inside ``context`` takes above one outside it, alternately (the context entered
    and exited around each inside forward, untimed), minimum of ``repeats`` each."""
    best_inside = best_plain = float("inf")
    for _ in range(repeats + 1):
        with context:
            t = CLOCK()
            forward()
            best_inside = min(best_inside, CLOCK() - t)
        t = CLOCK()
        forward()
        best_plain = min(best_plain, CLOCK() - t)
    return best_inside - best_plain


def parts(model: nn.Module, ids: torch.Tensor, minus: torch.Tensor, repeats: int) -> None:
    """What each stage of ``call(c=-1)`` costs per adapted layer, each timed on its own (min of ``repeats``)."""
    from funcadapt.call import frame
    from funcadapt.structure import structure

    tree = funcadapt.extract(model)
    layers = len(tree.layers)
    params = funcadapt.transform(tree, minus)
    applied = frame(model, params, now=True)

    def apply_and_undo() -> None:
        applied.apply()
        applied.unapply()

    stages = {
        "transform(tree, c)": lambda: funcadapt.transform(tree, minus),
        "structure check (module walk)": lambda: structure(model),
        "build the frame (incl. the walk)": lambda: frame(model, params, now=True),
        "apply and undo it": apply_and_undo,
    }
    with torch.no_grad():
        print(f"\nstages of call(c=-1) on {layers} adapted layers, µs per layer:")
        for name, fn in stages.items():
            print(f"  {name:<34}{1e6 * fastest(fn, repeats) / layers:>8.1f}")
        applied.apply()
        try:
            inside = fastest(lambda: model(input_ids=ids), repeats)
        finally:
            applied.unapply()
        plain = fastest(lambda: model(input_ids=ids), repeats)
        print(f"  {'forward with it applied, above PEFT':<34}{1e6 * (inside - plain) / layers:>8.1f}")


if __name__ == "__main__":
    main()
