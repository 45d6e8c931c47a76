"""Speed (and, on CUDA, peak memory) of one contrastive ±1 training step, measured side by side.

Every method computes loss(+1, positive labels) + loss(−1, negative labels) and one
backward into the adapter, on the same batch:

  peft_two_pass     plain PEFT, two forwards at +1 (the cost users know; no −1 exists in PEFT)
  seed_inplace      the seed's context manager: param.data.mul_(c) and restore (fast, WRONG gradients)
  modifier_two_pass funcadapt.AdapterModifier(+1) / (−1), two forwards
  funcadapt_vmap    funcadapt.vmap over c = [+1, −1]: one vectorised forward
  peft_concat       plain PEFT once on the concatenated 2× batch: the physical limit of a fused step

Ratios are against peft_two_pass and peft_concat measured in the same run. Also:
funcadapt.call at c = 1 vs the plain forward, and extract + transform time.

    python benchmarks/contrastive_step.py                       # tiny model, CPU
    python benchmarks/contrastive_step.py --model smollm2-random --batch 4 --seq 64
    python benchmarks/contrastive_step.py --device cuda --model smollm2-random --quant 4bit
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import funcadapt

SMOLLM2 = {  # SmolLM2-135M's shape (random weights: timing does not depend on values)
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build(args: argparse.Namespace) -> nn.Module:
    import peft
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = SMOLLM2 if args.model == "smollm2-random" else TINY
    config = LlamaConfig(**shape, attn_implementation=args.attn)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.quant == "none":
        base = LlamaForCausalLM(config).to(dtype=dtype, device=args.device)
    else:
        with tempfile.TemporaryDirectory() as d:
            LlamaForCausalLM(config).save_pretrained(d)
            q = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
                if args.quant == "4bit"
                else BitsAndBytesConfig(load_in_8bit=True)
            )
            base = LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map=args.device, dtype=dtype)
    if args.adapter == "lora":
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    elif args.adapter == "ia3":
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    elif args.adapter == "road":
        cfg = peft.RoadConfig(variant="road_1", group_size=64, target_modules="all-linear")
    else:
        raise ValueError(args.adapter)
    model = peft.get_peft_model(base, cfg)
    model.train()
    return model


@contextlib.contextmanager
def seed_inplace(model: nn.Module, coeff: float) -> Iterator[None]:
    """The seed request's approach (wrong gradients; here only as the speed baseline users know)."""
    saved = []
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_B" in name or "ia3_l" in name or "road_theta" in name):
            saved.append((p, p.data.clone()))
            p.data.mul_(coeff)
    try:
        yield
    finally:
        for p, data in saved:
            p.data.copy_(data)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], None], args: argparse.Namespace) -> tuple[float, float | None]:
    for _ in range(args.warmup):
        fn()
    sync(args.device)
    times = []
    peak = None
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - t)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2-random"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--adapter", default="lora", choices=["lora", "ia3", "road"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model = build(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    pos = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    neg = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def zero() -> None:
        for p in trainable:
            p.grad = None

    def peft_two_pass() -> None:
        zero()
        (model(input_ids=ids, labels=pos).loss + model(input_ids=ids, labels=neg).loss).backward()

    def seed() -> None:
        zero()
        with seed_inplace(model, 1.0):
            lp = model(input_ids=ids, labels=pos).loss
        with seed_inplace(model, -1.0):
            ln = model(input_ids=ids, labels=neg).loss
        (lp + ln).backward()

    def modifier() -> None:
        zero()
        with funcadapt.AdapterModifier(model, "scale", 1.0):
            lp = model(input_ids=ids, labels=pos).loss
        with funcadapt.AdapterModifier(model, "scale", -1.0):
            ln = model(input_ids=ids, labels=neg).loss
        (lp + ln).backward()

    tree = funcadapt.extract(model)
    coeffs = torch.tensor([1.0, -1.0], device=args.device)
    labels = torch.stack([pos, neg])

    def loss_at(c: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids, labels=lab).loss

    vmapped = funcadapt.vmap(loss_at)

    def fvmap() -> None:
        zero()
        vmapped(coeffs, labels).sum().backward()

    ids2, labels2 = torch.cat([ids, ids]), torch.cat([pos, neg])

    def concat() -> None:
        zero()
        (2 * model(input_ids=ids2, labels=labels2).loss).backward()

    methods = {
        "peft_two_pass": peft_two_pass,
        "seed_inplace": seed,
        "modifier_two_pass": modifier,
        "funcadapt_vmap": fvmap,
        "peft_concat": concat,
    }
    results = {name: measure(fn, args) for name, fn in methods.items()}

    model.eval()
    with torch.no_grad():
        plain = measure(lambda: model(input_ids=ids), args)[0]
        at_one = measure(lambda: funcadapt.call(model, funcadapt.transform(tree, 1.0), input_ids=ids), args)[0]
        at_tensor = measure(
            lambda: funcadapt.call(model, funcadapt.transform(tree, torch.tensor(-1.0)), input_ids=ids), args
        )[0]
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        funcadapt.transform(funcadapt.extract(model), -1.0)
    extract_transform_ms = (time.perf_counter() - t) / n * 1e3

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{device}; torch {torch.__version__}; model {args.model} {args.dtype} quant={args.quant} attn={args.attn}; "
        f"adapter {args.adapter} ({len(tree.layers)} adapted layers); batch {args.batch}×{args.seq}; "
        f"median of {args.repeats}\n"
    )
    base, limit = results["peft_two_pass"][0], results["peft_concat"][0]
    print(f"{'method':<20}{'time ms':>10}{'vs two-pass':>13}{'vs limit':>10}{'peak MiB':>10}")
    for name, (sec, peak) in results.items():
        mem = f"{peak:10.0f}" if peak is not None else f"{'-':>10}"
        print(f"{name:<20}{sec * 1e3:10.1f}{sec / base:13.3f}{sec / limit:10.3f}{mem}")
    print(
        f"\nforward, no grad: plain {plain * 1e3:.1f} ms; funcadapt.call c=1 {at_one * 1e3:.1f} ms "
        f"({at_one / plain:.3f}×); c=tensor(-1) {at_tensor * 1e3:.1f} ms ({at_tensor / plain:.3f}×)"
    )
    print(f"extract + transform: {extract_transform_ms:.2f} ms")
    return {"results": results, "plain": plain, "call_c1": at_one, "extract_transform_ms": extract_transform_ms}


if __name__ == "__main__":
    main()
