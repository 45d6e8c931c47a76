"""Eager cost per adapted layer, from the slope over the number of adapted layers.

Tiny Llamas (hidden 64, batch 1×8, one thread, so that Python overhead is what is measured) with
LoRA r = 4 on q/v/o/down in 2, 8 and 32 blocks (8, 32, 128 adapted layers). For each way of
running a coefficient, the time above PEFT's own forward on the same model, per adapted layer:

  call(c=1)          funcadapt.call(model, transform(tree, 1.0), ...)           (extract once)
  call(c=-1)         funcadapt.call(model, transform(tree, torch.tensor(-1.0)), ...)
  modifier(c=-1)     entering AdapterModifier(model, "scale", torch.tensor(-1.0)), a forward, exiting
  inside(c=-1)       a forward inside an entered AdapterModifier (what each generate() step pays)
  inside(c=1)        the same at c = 1.0

Minimum of --repeats runs of each (the least disturbed); printed side by side in one run.

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ids = torch.randint(0, 96, (1, 8))
    minus = torch.tensor(-1.0)
    print(f"torch {torch.__version__}, one thread; µs per adapted layer above PEFT's forward (min of {args.repeats})")
    heads = {"layers": 7, "PEFT ms": 9, "call(c=1)": 11, "call(c=-1)": 12, "modifier": 10, "inside(-1)": 12}
    print("".join(f"{h:>{w}}" for h, w in heads.items()) + f"{'inside(1)':>11}")
    for blocks in args.blocks:
        model = model_with(blocks)
        tree = funcadapt.extract(model)
        layers = len(tree.layers)

        def modifier(c: Any, m: nn.Module = model) -> None:
            with funcadapt.AdapterModifier(m, "scale", c):
                m(input_ids=ids)

        with torch.no_grad():
            plain = fastest(lambda m=model: m(input_ids=ids), args.repeats)
            runs = {
                "call1": lambda m=model, t=tree: funcadapt.call(m, funcadapt.transform(t, 1.0), input_ids=ids),
                "call": lambda m=model, t=tree: funcadapt.call(m, funcadapt.transform(t, minus), input_ids=ids),
                "modifier": lambda: modifier(minus),
            }
            times = {name: fastest(fn, args.repeats) for name, fn in runs.items()}
            for name, c in (("inside", minus), ("inside1", 1.0)):
                with funcadapt.AdapterModifier(model, "scale", c):
                    times[name] = fastest(lambda m=model: m(input_ids=ids), args.repeats)
        per = {name: 1e6 * (t - plain) / layers for name, t in times.items()}
        print(
            f"{layers:>7}{1e3 * plain:>9.2f}{per['call1']:>11.1f}{per['call']:>12.1f}{per['modifier']:>10.1f}"
            f"{per['inside']:>12.1f}{per['inside1']:>11.1f}"
        )


if __name__ == "__main__":
    main()
