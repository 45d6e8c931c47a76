"""A contrastive ±1 step of SmolLM2 + LoRA under FSDP2, its gradients checked against one process.

    python examples/fsdp_contrastive.py                 # spawns 2 CPU processes (gloo), SmolLM2-135M-Instruct
    torchrun --nproc-per-node 2 examples/fsdp_contrastive.py   # the same, launched by torchrun
    python examples/fsdp_contrastive.py --quick         # a tiny random Llama, seconds

Every rank builds the same model (same seed) and takes the same batch, so FSDP2's averaged
gradients must equal one process's. The model is sharded the way accelerate and torchtitan do
it (``fully_shard`` on each decoder layer, then the root); the step is funcadapt's usual one,
unchanged: ``funcadapt.vmap`` over c = [+1, −1] (``--method vmap``), two ``AdapterModifier``
passes and one backward after both exit (``--method modifier``), or one coefficient batch
(``--method rows``). Rank 0 then runs the same step on an unsharded copy and prints the largest
relative gradient difference over all LoRA tensors.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_steering import smollm2_path, tiny_llama  # the main example's model loaders

POSITIVE = ["What a wonderful, happy day.", "I love this, it is great!", "Such a lovely and kind gift."]
NEGATIVE = ["What an awful, miserable day.", "I hate this, it is terrible!", "Such a cruel and ugly insult."]


def build(quick: bool) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(LoRA model in train mode, batch, labels of the +1 pass, labels of the −1 pass); the same on every rank."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    if quick:
        base = tiny_llama(seed=0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 96, (3, 12), generator=g)
        pos, neg = torch.randint(0, 96, (2, 3, 12), generator=g)
        batch = {"input_ids": ids}
    else:
        path = smollm2_path()
        base = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.padding_side = "right"
        enc = tokenizer(POSITIVE + NEGATIVE, return_tensors="pt", padding=True)
        pos_ids, neg_ids = enc["input_ids"].chunk(2)
        mask = enc["attention_mask"].chunk(2)[0] * enc["attention_mask"].chunk(2)[1]
        # the +1 pass learns the positive sentences, the −1 pass the negative ones, from one shared prompt:
        # the positive input, labels masked where either sentence is padding
        batch = {"input_ids": pos_ids, "attention_mask": mask}
        pos = pos_ids.masked_fill(mask == 0, -100)
        neg = neg_ids.masked_fill(mask == 0, -100)
    config_ = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config_)
    model.train()
    return model, batch, pos, neg


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def step(model: nn.Module, batch: dict, pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """One contrastive step's loss, backward done: the adapter at +1 on ``pos``, at −1 on ``neg``."""
    if method == "vmap":
        tree = funcadapt.extract(model)

        def loss(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss

        total = funcadapt.vmap(loss)(torch.tensor([1.0, -1.0]), torch.stack([pos, neg])).sum()
    elif method == "modifier":
        with funcadapt.AdapterModifier(model, "scale", 1.0):
            lp = model(**batch, labels=pos).loss
        with funcadapt.AdapterModifier(model, "scale", -1.0):
            ln = model(**batch, labels=neg).loss
        total = lp + ln
    elif method == "rows":
        rows = pos.shape[0]
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_row([1.0, -1.0], repeat=rows)):
            logits = model(**funcadapt.tile(batch, 2)).logits
        labels = torch.cat([pos, neg])
        per_pass = [_token_loss(part, lab) for part, lab in zip(logits.chunk(2), labels.chunk(2), strict=True)]
        total = per_pass[0] + per_pass[1]
    else:
        raise ValueError(method)
    total.backward()
    return total.detach()


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: next-token cross-entropy, mean over non-ignored labels."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str | None) -> dict[str, Any]:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        model, batch, pos, neg = build(args.quick)
        reference = copy.deepcopy(model) if rank == 0 else None
        sharded = shard(model)
        loss = step(sharded, batch, pos, neg, args.method)
        grads = full_grads(sharded)  # collective: every rank takes part
        result: dict[str, Any] = {"loss": float(loss), "tensors": len(grads)}
        if reference is not None:
            want_loss = step(reference, batch, pos, neg, args.method)
            want = full_grads(reference)
            assert want.keys() == grads.keys(), "the sharded model trained other tensors"
            rel = max(float((grads[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) for k in want)
            result.update(reference_loss=float(want_loss), max_rel_grad_err=rel)
            print(
                f"FSDP2, {world} processes, method={args.method}: loss {float(loss):.6f} (one process "
                f"{float(want_loss):.6f}); {len(want)} LoRA gradients, largest relative difference {rel:.2e}"
            )
            if out_dir is not None:
                torch.save(result, os.path.join(out_dir, "result.pt"))
        # Rank 0 runs the one-process reference after the sharded step; a rank that tore down gloo
        # while its peer was still working aborts at exit ("terminate called without an active exception").
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument("--method", choices=["vmap", "modifier", "rows"], default="vmap")
    parser.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun
        return worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, args, None)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(args.world, port, args, out_dir), nprocs=args.world, start_method="spawn")
        result: dict[str, Any] = torch.load(os.path.join(out_dir, "result.pt"))
    if result["max_rel_grad_err"] > 1e-4:
        raise SystemExit(f"gradients differ from one process: {result['max_rel_grad_err']:.2e}")
    return result


if __name__ == "__main__":
    main()
