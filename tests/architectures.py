"""The architecture conformance matrix: transformers architectures × PEFT adapters × funcadapt paths.

Declarative data (ARCHS, ADAPTERS, PATHS, the expected outcome of every cell) and the helpers the
matrix in tests/test_architectures.py runs on: tiny float64 models built once per (architecture,
adapter), and references that use nothing from funcadapt. docs/architectures.md is rendered from
this module::

    python tests/architectures.py --write     # regenerate docs/architectures.md

What "exact" means. For every adapted layer, linear mode promises

    y(c) = y0 + c·(y1 − y0)          (y0: the layer with its adapter off, y1: with it on)

The independent reference is ``cases.reference_interpolation``: forward hooks that compute exactly
that with PEFT's own disable switch. For LoRA a second reference is PEFT's own scaling
(``peft.helpers.rescale_adapter_scale``: ``scaling[adapter] ↦ c·scaling[adapter]``, so ΔW ↦ c·ΔW).
Everything is float64, and results must agree to RTOL/ATOL (below): float64 rounding differences
(ε = 2.2e-16, amplified by at most ~1e3 through these shallow models) pass with a wide margin, while
any float32 detour (ε = 1.2e-7) or a coefficient applied in the wrong place fails by orders of
magnitude.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import transformers
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig, VeraConfig, get_peft_model
from peft.helpers import rescale_adapter_scale
from peft.utils import constants as peft_constants
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))  # `python tests/architectures.py --write` imports cases too
import cases

DOC = Path(__file__).parent.parent / "docs" / "architectures.md"

VOCAB = cases.VOCAB
BATCH, SEQ, DECODER_SEQ = 2, 6, 4
COEFFS = (-1.0, 0.0, 0.5)  # call, modifier, per_row, generate
VMAP_COEFFS = (1.0, -1.0)  # the contrastive ±1 pair
NEW_TOKENS = 3
RTOL = 1e-10
ATOL = 1e-12
"""Logits, losses and gradients here are O(1e-3 … 10). The largest difference the exact cells show is
2.7e-15 (PyTorch 2.13 CPU), under 1e-3 of this tolerance; one float32 rounding (LoRA's per-row path
before 462593b) showed as ~4e-8. The same values as the suite's float64 tolerance (cases.TOL64)."""

EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps

Kind = Literal["decoder", "encoder-decoder", "encoder"]
Cell = tuple[str, str, str]  # (architecture, adapter, path)
PATHS: tuple[str, ...] = ("call", "modifier", "vmap", "per_row", "generate", "per_token", "per_token_generate")


# ----------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class Arch:
    """A tiny random model of one transformers architecture."""

    name: str
    kind: Kind
    model_class: type[nn.Module]
    config_class: type[transformers.PretrainedConfig]
    config: Mapping[str, Any]
    note: str = ""

    @property
    def model_type(self) -> str:
        """The key of PEFT's default-target mappings."""
        return self.config_class.model_type

    def build(self) -> nn.Module:
        return self.model_class(self.config_class(vocab_size=VOCAB, attn_implementation="eager", **self.config))


def _decoder(**sizes: Any) -> dict[str, Any]:
    """Llama-style keyword names: hidden 32, MLP 64, 2 layers, 4 heads (2 KV heads), dropout 0."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **sizes,
    }


def _gpt(**extra: Any) -> dict[str, Any]:
    """GPT-2-style keyword names: n_embd 32, 2 layers, 4 heads, every dropout 0."""
    return {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **extra,
    }


def _bert(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 72,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **extra,
    }


T = transformers
_ARCH_LIST = [
    Arch("llama", "decoder", T.LlamaForCausalLM, T.LlamaConfig, _decoder()),
    Arch("mistral", "decoder", T.MistralForCausalLM, T.MistralConfig, _decoder()),
    Arch("qwen2", "decoder", T.Qwen2ForCausalLM, T.Qwen2Config, _decoder()),
    Arch("qwen3", "decoder", T.Qwen3ForCausalLM, T.Qwen3Config, _decoder(head_dim=8)),
    Arch("gemma", "decoder", T.GemmaForCausalLM, T.GemmaConfig, _decoder(head_dim=8)),
    Arch(
        "gemma2",
        "decoder",
        T.Gemma2ForCausalLM,
        T.Gemma2Config,
        _decoder(head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
        note="sliding window 4 < sequence length",
    ),
    Arch(
        "gemma3",
        "decoder",
        T.Gemma3ForCausalLM,
        T.Gemma3TextConfig,
        _decoder(head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
        note="text model; sliding window 4 < sequence length",
    ),
    Arch(
        "mixtral",
        "decoder",
        T.MixtralForCausalLM,
        T.MixtralConfig,
        _decoder(num_local_experts=4, num_experts_per_tok=2, experts_implementation="batched_mm"),
        note="MoE, 4 experts, top-2; experts_implementation='batched_mm': the default 'grouped_mm' has no float64 "
        "kernel, and 'eager' picks each expert's tokens with nonzero(), which torch.func.vmap cannot batch",
    ),
    Arch(
        "phi",
        "decoder",
        T.PhiForCausalLM,
        T.PhiConfig,
        _decoder(num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    ),
    Arch("stablelm", "decoder", T.StableLmForCausalLM, T.StableLmConfig, _decoder()),
    Arch("gpt2", "decoder", T.GPT2LMHeadModel, T.GPT2Config, _gpt(), note="Conv1D layers"),
    Arch(
        "gpt_neox",
        "decoder",
        T.GPTNeoXForCausalLM,
        T.GPTNeoXConfig,
        _decoder(num_key_value_heads=4, hidden_dropout=0.0, attention_dropout=0.0),
    ),
    Arch("gptj", "decoder", T.GPTJForCausalLM, T.GPTJConfig, _gpt(rotary_dim=4)),
    Arch(
        "opt",
        "decoder",
        T.OPTForCausalLM,
        T.OPTConfig,
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        note="the MLP runs on [batch·seq, hidden]",
    ),
    Arch("codegen", "decoder", T.CodeGenForCausalLM, T.CodeGenConfig, _gpt(rotary_dim=4, n_ctx=64)),
    Arch("gpt_bigcode", "decoder", T.GPTBigCodeForCausalLM, T.GPTBigCodeConfig, _gpt(), note="multi-query"),
    Arch(
        "falcon",
        "decoder",
        T.FalconForCausalLM,
        T.FalconConfig,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
        note="multi-query, parallel attention",
    ),
    Arch(
        "bloom",
        "decoder",
        T.BloomForCausalLM,
        T.BloomConfig,
        {"hidden_size": 32, "n_layer": 2, "n_head": 4, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        note="ALiBi",
    ),
    Arch(
        "t5",
        "encoder-decoder",
        T.T5ForConditionalGeneration,
        T.T5Config,
        {
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 1,
            "num_decoder_layers": 1,
            "num_heads": 4,
            "dropout_rate": 0.0,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
    ),
    Arch(
        "bart",
        "encoder-decoder",
        T.BartForConditionalGeneration,
        T.BartConfig,
        {
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "forced_eos_token_id": None,
        },
        note="forced_eos_token_id=None (generate() would force EOS as the last token)",
    ),
    Arch("bert", "encoder", T.BertForMaskedLM, T.BertConfig, _bert()),
    Arch("roberta", "encoder", T.RobertaForMaskedLM, T.RobertaConfig, _bert()),
]
ARCHS: dict[str, Arch] = {a.name: a for a in _ARCH_LIST}


# ----------------------------------------------------------------------------
# adapters and their target modules


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter type; ``options`` make it non-trivial at initialisation where PEFT allows
    (``cases.randomize_adapters`` perturbs every trainable tensor on top)."""

    name: str
    config_class: type[PeftConfig]
    options: Mapping[str, Any]
    defaults: Mapping[str, Any]  # PEFT's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING

    def config(self, arch: Arch) -> PeftConfig:
        explicit = EXPLICIT_TARGETS.get((arch.name, self.name))
        targets = {} if explicit is None else explicit.config
        return self.config_class(**self.options, **targets)


_C = peft_constants
_ADAPTER_LIST = [
    Adapter(
        "lora",
        LoraConfig,
        {"r": 4, "lora_alpha": 8, "init_lora_weights": False},
        _C.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    ),
    Adapter("ia3", IA3Config, {"init_ia3_weights": False}, _C.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
    Adapter(
        "oft",
        OFTConfig,
        {"r": 0, "oft_block_size": 4, "init_weights": False},
        _C.TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING,
    ),
    Adapter(
        "loha",
        LoHaConfig,
        {"r": 4, "alpha": 8, "init_weights": False},
        _C.TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
    ),
    Adapter(
        "lokr",
        LoKrConfig,
        {"r": 4, "alpha": 8, "init_weights": False},
        _C.TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
    ),
    Adapter("vera", VeraConfig, {"r": 4, "init_weights": False}, _C.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING),
]
ADAPTERS: dict[str, Adapter] = {a.name: a for a in _ADAPTER_LIST}


@dataclass(frozen=True)
class Targets:
    """Target modules named explicitly, because get_peft_model with PEFT's default raises ``default_fails``
    (tested to still raise it, so the entry goes when PEFT can do it itself)."""

    modules: tuple[str, ...]
    reason: str
    default_fails: str
    feedforward: tuple[str, ...] | None = None  # IA3: the modules whose input (not output) is scaled

    @property
    def config(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"target_modules": list(self.modules)}
        if self.feedforward is not None:
            kw["feedforward_modules"] = list(self.feedforward)
        return kw


EXPLICIT_TARGETS: dict[tuple[str, str], Targets] = {
    ("stablelm", "ia3"): Targets(
        ("k_proj", "v_proj", "down_proj"),
        "PEFT has no IA3 default for stablelm; these are Llama's (same module names)",
        "Please specify `target_modules` in `peft_config`",
        feedforward=("down_proj",),
    ),
    ("codegen", "ia3"): Targets(
        ("qkv_proj", "fc_out"),
        "PEFT has no IA3 default for codegen; its fused attention input and its MLP output",
        "Please specify `target_modules` in `peft_config`",
        feedforward=("fc_out",),
    ),
    ("mixtral", "lora"): Targets(
        ("q_proj", "v_proj"),
        "PEFT's own default, which PEFT 0.21.2 cannot apply on MoE models: its MoE config conversion "
        "(_convert_peft_config_moe) turns target_modules=None into set() before the default is looked up",
        "No `target_modules` passed but also no `target_parameters` found",
    ),
}


def targets(arch: str, adapter: str) -> tuple[str, ...]:
    """The target modules the config resolves to: explicit ones, else PEFT's default."""
    explicit = EXPLICIT_TARGETS.get((arch, adapter))
    if explicit is not None:
        return explicit.modules
    return tuple(ADAPTERS[adapter].defaults[ARCHS[arch].model_type])


def feedforward(arch: str, adapter: str) -> tuple[str, ...]:
    """IA3's feed-forward targets (their input is scaled, not their output): explicit, else PEFT's default."""
    if adapter != "ia3":
        return ()
    explicit = EXPLICIT_TARGETS.get((arch, adapter))
    if explicit is not None:
        return explicit.feedforward or ()
    return tuple(_C.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[ARCHS[arch].model_type])


UNMATCHED_TARGETS: dict[tuple[str, str], tuple[str, str]] = {
    ("mixtral", "ia3"): ("w2", "transformers 5 fuses the experts into 3-d Parameters (MixtralExperts): no w2 module"),
}
"""Targets of PEFT's default that match no module of the model (PEFT does not complain while any matches)."""


# ----------------------------------------------------------------------------
# expected outcomes


@dataclass(frozen=True)
class Refusal:
    """The cell raises ``error`` with ``match`` in its message, for ``reason``."""

    match: str
    reason: str
    error: type[Exception] = ValueError


def applicable(arch: str, path: str) -> bool:
    """generate() needs a decoder; encoder-only models have none."""
    return not (path in ("generate", "per_token_generate") and ARCHS[arch].kind == "encoder")


NOT_BUILDABLE: dict[tuple[str, str], str] = {
    ("gpt2", "oft"): "Target module Conv1D(nf=96, nx=32) is not supported",
    ("gpt2", "loha"): "Target module of type <class 'transformers.pytorch_utils.Conv1D'> not supported",
    ("gpt2", "lokr"): "Target module of type <class 'transformers.pytorch_utils.Conv1D'> not supported",
}
"""(architecture, adapter) pairs get_peft_model refuses, with PEFT's message (tested to still fail)."""

REFUSED: dict[Cell, Refusal] = {
    (arch, adapter, path): Refusal(
        "per-token coefficients are refused on an encoder-decoder model",
        "an encoder-decoder runs two sequences, and a [B, L] value cannot say which one a position belongs to",
    )
    for arch, a in ARCHS.items()
    if a.kind == "encoder-decoder"
    for adapter in ADAPTERS
    for path in ("per_token", "per_token_generate")
}
"""Cells that raise by design (funcadapt's or torch's refusal), with the reason."""

PENDING_FIX: dict[Cell, str] = {
    # (arch, adapter, path): "what fails" (a substring of the error), with its diagnosis in DIAGNOSIS.
    # Emptied by 462593b (vmap on Falcon and Bloom, per-row coefficients on OPT's flattened fc1/fc2,
    # LoRA's per-row fast path kept in float64).
}
"""Cells that fail today because of a funcadapt bug being fixed: what fails (a substring of the error).
The matrix marks them xfail(strict=True) and accepts only that failure; a fix makes them pass, which
fails the suite until the entry is removed."""

DIAGNOSIS: dict[str, str] = {}
"""Why each kind of PENDING_FIX failure happens (shown in docs/architectures.md)."""


def pairs() -> list[tuple[str, str]]:
    """Every (architecture, adapter) PEFT can build."""
    return [(a, d) for a in ARCHS for d in ADAPTERS if (a, d) not in NOT_BUILDABLE]


def cells() -> list[Cell]:
    """Every cell of the matrix: buildable pairs × applicable paths."""
    return [(a, d, p) for a, d in pairs() for p in PATHS if applicable(a, p)]


def expected(cell: Cell) -> str | Refusal:
    """'exact', 'pending fix' or the declared Refusal."""
    if cell in REFUSED:
        return REFUSED[cell]
    if cell in PENDING_FIX:
        return "pending fix"
    return "exact"


# ----------------------------------------------------------------------------
# models, batches and independent references (cached: built once per worker)


@dataclass
class Built:
    model: nn.Module
    pristine: dict[str, Any] = field(repr=False)  # cases.snapshot right after building


def build_peft(arch: str, adapter: str) -> nn.Module:
    """PEFT's model on the tiny base, adapter tensors randomized, float64, eval mode."""
    torch.manual_seed(0)
    model = get_peft_model(ARCHS[arch].build(), ADAPTERS[adapter].config(ARCHS[arch]))
    cases.randomize_adapters(model, seed=1)
    return model.double().eval()


@functools.cache
def built(arch: str, adapter: str) -> Built:
    model = build_peft(arch, adapter)
    return Built(model, cases.snapshot(model))


@functools.cache
def batch(arch: str) -> dict[str, Tensor]:
    """BATCH × SEQ token ids above the special tokens (ids 0–2), an all-ones attention mask, and for
    encoder-decoders DECODER_SEQ decoder ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ARCHS[arch].kind == "encoder-decoder":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, DECODER_SEQ), generator=g)
    return out


def labels(arch: str, n: int) -> Tensor:
    """One label tensor per coefficient, [n, BATCH, output length], all different."""
    length = DECODER_SEQ if ARCHS[arch].kind == "encoder-decoder" else SEQ
    return torch.randint(0, VOCAB, (n, BATCH, length), generator=torch.Generator().manual_seed(1))


def token_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over every position, in the logits' dtype (float64; transformers' own
    loss would upcast with .float(), i.e. down to float32)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The adapter Parameters autograd differentiates (VeRA's shared projections are frozen buffers)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@functools.cache
def reference_logits(arch: str, adapter: str, c: float) -> Tensor:
    """Logits with every adapted layer's output replaced by y0 + c·(y1 − y0) (forward hooks, PEFT's
    disable switch for y0): ``cases.reference_interpolation``."""
    model = built(arch, adapter).model
    with torch.no_grad(), cases.reference_interpolation(model, c):
        return model(**batch(arch)).logits


@functools.cache
def peft_scaled_logits(arch: str, c: float) -> Tensor:
    """LoRA only: logits with PEFT's own scaling multiplied by c (ΔW = c·s·BA at every layer)."""
    model = built(arch, "lora").model
    with torch.no_grad(), rescale_adapter_scale(model, c):
        return model(**batch(arch)).logits


def reference_loss_grads(arch: str, adapter: str) -> tuple[Tensor, list[Tensor]]:
    """Σ_c loss(c) over VMAP_COEFFS, each c under the hook reference with its own labels, and the
    gradients of that sum with respect to the trainable adapter Parameters (torch.autograd.grad)."""
    model = built(arch, adapter).model
    targets_ = labels(arch, len(VMAP_COEFFS))
    losses = []
    for c, target in zip(VMAP_COEFFS, targets_, strict=True):
        with cases.reference_interpolation(model, c):
            losses.append(token_loss(model(**batch(arch)).logits, target))
    stacked = torch.stack(losses)
    grads = torch.autograd.grad(stacked.sum(), list(trainable(model).values()))
    return stacked.detach(), list(grads)


def greedy() -> transformers.GenerationConfig:
    """NEW_TOKENS greedy tokens. generate() fills what this leaves unset from the model's own generation
    config (BART's eos_token_id = 2): min_new_tokens keeps every row going to the end."""
    return transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
    )


@dataclass(frozen=True)
class Generated:
    sequences: Tensor  # [rows, prompt + new tokens] (decoder-only) or [rows, start + new tokens] (encoder-decoder)
    logits: Tensor  # [rows, new tokens, vocab]: the output embedding's output at each step's last position


@contextlib.contextmanager
def step_logits(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collects the output embedding's (LM head's) output at the last position of every forward, in
    the model's dtype: generate() hands its logits back cast to float32, which would hide float64
    differences (and softcapping models apply a monotone tanh after the head, the same on both sides)."""
    steps: list[Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: steps.append(out[:, -1].detach()))
    try:
        yield steps
    finally:
        handle.remove()


@functools.cache
def reference_generation(arch: str, adapter: str, c: float) -> Generated:
    """generate() at one coefficient under the hook reference. (Not a cache-free greedy loop: GPT-J and
    CodeGen take attention scores in float32, so cached and uncached decoding differ by ~3e-10 without
    funcadapt, far above RTOL.)"""
    model = built(arch, adapter).model
    with torch.no_grad(), cases.reference_interpolation(model, c), step_logits(model) as steps:
        sequences = model.generate(**batch_prompt(arch), generation_config=greedy())
    return Generated(sequences, torch.stack(steps, dim=1))


@functools.cache
def token_values(arch: str) -> Tensor:
    """Per-token coefficients for the matrix: [BATCH, SEQ + NEW_TOKENS] in [−1.5, 2), float64."""
    g = torch.Generator().manual_seed(7)
    return torch.rand(BATCH, SEQ + NEW_TOKENS, generator=g, dtype=torch.float64) * 3.5 - 1.5


@functools.cache
def reference_token_logits(arch: str, adapter: str) -> Tensor:
    """Logits with every adapted layer's output replaced by y0 + c[b, t]·(y1 − y0) token by token
    (``cases.per_token_reference``: the coefficient placed from the output's own shape)."""
    model = built(arch, adapter).model
    with torch.no_grad(), cases.reference_interpolation(model, cases.per_token_reference(token_values(arch))):
        return model(**batch(arch)).logits


@functools.cache
def reference_token_generation(arch: str, adapter: str) -> Generated:
    """generate() without a KV cache (``use_cache=False``: the whole sequence is run again at every step,
    positions 0 … T−1), under the per-token hook reference. (generate() itself, not a hand-written loop:
    its logits processors, such as min_new_tokens suppressing Gemma 2's eos token, are then the same.)"""
    model = built(arch, adapter).model
    config = greedy()
    config.use_cache = False
    reference = cases.per_token_reference(token_values(arch))
    with torch.no_grad(), cases.reference_interpolation(model, reference), step_logits(model) as steps:
        sequences = model.generate(**batch_prompt(arch), generation_config=config)
    return Generated(sequences, torch.stack(steps, dim=1))


def batch_prompt(arch: str) -> dict[str, Tensor]:
    """The prompt generate() takes: the batch without decoder ids."""
    return {k: v for k, v in batch(arch).items() if k != "decoder_input_ids"}


# ----------------------------------------------------------------------------
# the generated document


def _cell_summary(arch: str, adapter: str, notes: Notes) -> str:
    """'exact', or the paths that are not, grouped by outcome: 'vmap: pending fix [P3]; rest exact'."""
    if (arch, adapter) in NOT_BUILDABLE:
        return f"PEFT cannot build {notes.ref('build', NOT_BUILDABLE[(arch, adapter)])}"
    groups: dict[str, list[str]] = {}
    for path in PATHS:
        outcome = expected((arch, adapter, path)) if applicable(arch, path) else "n/a"
        if isinstance(outcome, Refusal):
            label = f"refused {notes.ref('refused', f'`{outcome.match}`: {outcome.reason}')}"
        elif outcome == "pending fix":
            what = PENDING_FIX[(arch, adapter, path)]
            label = f"pending fix {notes.ref('pending', f'`{what}`: {DIAGNOSIS[what]}')}"
        else:
            label = outcome
        groups.setdefault(label, []).append(path)
    exact = groups.pop("exact", [])
    if not groups:
        return "exact"
    shown = "; ".join(f"{', '.join(paths)}: {label}" for label, paths in groups.items())
    return f"{shown}; rest exact" if exact else shown


class Notes:
    """Numbered footnotes, one per distinct text within a kind (refused, pending, build, target)."""

    PREFIX: ClassVar[dict[str, str]] = {"refused": "R", "pending": "P", "build": "B", "target": "T"}

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {k: [] for k in self.PREFIX}

    def ref(self, kind: str, text: str) -> str:
        texts = self.texts[kind]
        if text not in texts:
            texts.append(text)
        return f"[{self.PREFIX[kind]}{texts.index(text) + 1}]"

    def lines(self, kind: str) -> list[str]:
        return [f"* [{self.PREFIX[kind]}{i}] {t}" for i, t in enumerate(self.texts[kind], 1)]


def _targets_cell(arch: str, adapter: str, notes: Notes) -> str:
    if (arch, adapter) in NOT_BUILDABLE:
        return "–"
    shown = ", ".join(targets(arch, adapter))
    ff = feedforward(arch, adapter)
    if ff:
        shown += f" (feedforward: {', '.join(ff)})"
    explicit = EXPLICIT_TARGETS.get((arch, adapter))
    if explicit is not None:
        fails = f"with the default, get_peft_model raises `` {explicit.default_fails} ``"
        shown += " " + notes.ref("target", f"named explicitly: {explicit.reason} ({fails})")
    unmatched = UNMATCHED_TARGETS.get((arch, adapter))
    if unmatched is not None:
        shown += " " + notes.ref("target", f"`{unmatched[0]}` matches nothing: {unmatched[1]}")
    return shown


def _sci(x: float) -> str:
    """4.5e5 rather than 4.5e+05."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_doc() -> str:
    """docs/architectures.md, from the data above."""
    notes = Notes()
    adapters = list(ADAPTERS)
    results = [[arch, ARCHS[arch].kind, *(_cell_summary(arch, d, notes) for d in adapters)] for arch in ARCHS]
    target_rows = [
        [arch, f"`{ARCHS[arch].model_type}`", *(_targets_cell(arch, d, notes) for d in adapters)] for arch in ARCHS
    ]
    models = [[a.name, a.kind, f"`{a.model_class.__name__}`", a.note or ""] for a in ARCHS.values()]
    n_cells = len(cells())
    n_exact = sum(expected(c) == "exact" for c in cells())
    lines = [
        "# Architectures × adapters × paths",
        "",
        "<!-- generated by `python tests/architectures.py --write` from tests/architectures.py; "
        "tests/test_architectures.py checks it is current -->",
        "",
        f"{len(ARCHS)} transformers architectures × {len(ADAPTERS)} PEFT adapters × {len(PATHS)} ways to run "
        f"a coefficient: {n_cells} cells, {n_exact} exact. Every cell is a test in tests/test_architectures.py "
        f"(ids like `llama-lora-vmap`); a cell is *exact* when funcadapt agrees with an independent reference "
        f"to rtol {RTOL:g}, atol {ATOL:g} in float64 and the model is unchanged afterwards. Regenerate this file "
        f"with `python tests/architectures.py --write`.",
        "",
        "## Paths",
        "",
        f"* `call`: `funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), c), **batch)` at "
        f"c ∈ {{{', '.join(f'{c:g}' for c in COEFFS)}}}, as a float and as a 0-d tensor; logits.",
        '* `modifier`: `with funcadapt.AdapterModifier(model, "scale", c): model(**batch)`, the same c; logits.',
        f"* `vmap`: `funcadapt.vmap` over c = tensor([{', '.join(f'{c:g}' for c in VMAP_COEFFS)}]) with "
        f"different labels per coefficient: the losses (float64 token cross-entropy) and the gradients of their "
        f"sum with respect to every trainable adapter Parameter.",
        f"* `per_row`: `funcadapt.per_row(coeffs, repeat={BATCH})` on `funcadapt.tile(batch, {len(COEFFS)})`; "
        f"logits per row group.",
        f"* `generate`: the same coefficient batch through `model.generate` (greedy, KV cache, {NEW_TOKENS} new "
        f"tokens): tokens equal, and the LM head's float64 output at every step within tolerance (generate() "
        f"itself hands logits back in float32). Not applicable to encoder-only models.",
        f"* `per_token`: `funcadapt.per_token(values)`, values [{BATCH}, {SEQ + NEW_TOKENS}] drawn in [−1.5, 2); "
        f"logits.",
        f"* `per_token_generate`: `model.generate` (greedy, KV cache, {NEW_TOKENS} new tokens) inside "
        f"`AdapterModifier(model, 'scale', funcadapt.per_token(values))`: tokens equal, step logits to 1e-8 (cached "
        f"and uncached decoding differ by rounding without funcadapt). Not applicable to encoder-only models.",
        "",
        "## References (nothing from funcadapt)",
        "",
        "* every adapter: forward hooks at every adapted layer replace its output by y0 + c·(y1 − y0), y0 from "
        "the same layer with PEFT's own disable switch (`cases.reference_interpolation`); for `vmap` each "
        "coefficient runs separately under it, gradients by `torch.autograd.grad`; for `per_row` each "
        "coefficient is a separate forward under it, for `generate` a separate `generate()` under it.",
        "* per-token paths: the same hooks with c[b, t] at token t of row b, placed from the output's own shape "
        "(`cases.per_token_reference`); for `per_token_generate`, `generate(use_cache=False)` under them, which "
        "runs the whole sequence again at every step (no positions to track).",
        "* LoRA also: PEFT's own scaling, `peft.helpers.rescale_adapter_scale(model, c)` (ΔW ↦ c·ΔW).",
        f"* tolerance: float64 throughout (`model.double()`); rtol {RTOL:g} is ~{_sci(RTOL / EPS64)} float64 ulps "
        f"and ~{_sci(EPS32 / RTOL)} times below one float32 ulp, so reordered float64 arithmetic passes (the "
        f"largest difference seen is ~3e-15) and a float32 detour or a misplaced coefficient fails.",
        "",
        "## Results",
        "",
        "*exact*: every path is exact; otherwise the paths that are not, and the rest are exact.",
        "",
        *_table(["architecture", "kind", *adapters], results),
        "",
    ]
    for kind, title in (
        ("refused", "Refused (raises, by design)"),
        ("pending", "Pending fix (a funcadapt bug; the test is a strict xfail)"),
        ("build", "PEFT cannot build the adapter (get_peft_model raises this)"),
    ):
        if notes.texts[kind]:
            lines += [f"{title}:", "", *notes.lines(kind), ""]
    lines += [
        "## Models and target modules",
        "",
        f"Random weights from tiny configs (hidden 32, 1–2 layers, vocab {VOCAB}, eager attention, dropout 0), "
        f"float64, batch {BATCH} × {SEQ} tokens. Adapters: "
        + "; ".join(
            f"{a.name} `{a.config_class.__name__}({', '.join(f'{k}={v!r}' for k, v in a.options.items())})`"
            for a in ADAPTERS.values()
        )
        + ", every trainable tensor then perturbed (`cases.randomize_adapters`). Target modules are PEFT's "
        "defaults for the model type (no `target_modules` passed) unless marked.",
        "",
        *_table(["architecture", "kind", "class", "notes"], models),
        "",
        *_table(["architecture", "model_type", *adapters], target_rows),
        "",
        *notes.lines("target"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(render_doc())
        print(f"wrote {DOC}")
    else:
        print(render_doc())
