"""Eager cost per adapted layer, from the slope over the number of adapted layers.

Tiny Llamas (hidden 64, batch 1×8, one thread, so that Python overhead is what is measured) with
LoRA r = 4 on q/v/o/down in 2, 8 and 32 blocks (8, 32, 128 adapted layers). For each way of
running a coefficient, the time above PEFT's own forward on the same model, per adapted layer:

  call(c=1)          funcadapt.call(model, transform(tree, 1.0), ...)           (extract once)
  call(c=-1)         funcadapt.call(model, transform(tree, torch.tensor(-1.0)), ...)
  modifier(c=-1)     entering AdapterModifier(model, "scale", torch.tensor(-1.0)), a forward, exiting
  inside(c=-1)       a forward inside an entered AdapterModifier (what each generate() step pays)
  inside(c=1)        the same at c = 1.0

Each timed alternately with PEFT's own forward (so that a slow stretch of the shared machine hits
both), minimum of --repeats; the last row is the slope between the smallest and largest model, the
cost of each further adapted layer without the fixed cost per call. Printed side by side in one run.

    python benchmarks/overhead.py
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


def fastest(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def paired(fn: Callable[[], Any], plain: Callable[[], Any], repeats: int) -> float:
    """Seconds ``fn`` takes above ``plain``: each timed alternately with the other (so that a slow
    stretch of the machine hits both), minimum of ``repeats`` each."""
    fn(), plain()
    best_fn = best_plain = float("inf")
    for _ in range(repeats):
        for which in (fn, plain):
            t = time.perf_counter()
            which()
            took = time.perf_counter() - t
            if which is fn:
                best_fn = min(best_fn, took)
            else:
                best_plain = min(best_plain, took)
    return best_fn - best_plain


COLUMNS = {"call(c=1)": 11, "call(c=-1)": 12, "modifier": 10, "inside(-1)": 12, "inside(1)": 11}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ids = torch.randint(0, 96, (1, 8))
    minus = torch.tensor(-1.0)
    print(
        f"torch {torch.__version__}, one thread; µs per adapted layer above PEFT's forward (each timed alternately "
        f"with PEFT's, min of {args.repeats})"
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
                with funcadapt.AdapterModifier(model, "scale", c):
                    inside = fastest(forward, args.repeats)
                times[name] = inside - fastest(forward, args.repeats)
        extra[layers] = times
        per = {name: 1e6 * t / layers for name, t in times.items()}
        print(f"{layers:>7}{1e3 * plain:>9.2f}" + "".join(f"{per[h]:>{w}.1f}" for h, w in COLUMNS.items()))
    if len(extra) > 1:  # the slope: what each further adapted layer costs, fixed costs per call removed
        few, many = min(extra), max(extra)
        slope = {h: 1e6 * (extra[many][h] - extra[few][h]) / (many - few) for h in COLUMNS}
        print(f"{'slope':>7}{'':>9}" + "".join(f"{slope[h]:>{w}.1f}" for h, w in COLUMNS.items()))


if __name__ == "__main__":
    main()
