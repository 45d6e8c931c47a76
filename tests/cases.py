"""Tiny models and one adapter configuration per rule (and per notable variant).

Every rule in ``funcadapt.RULES`` must have at least one case here or in a
``tests/cases_<family>.py`` file (``test_registry_coverage`` checks it), so a new rule
cannot land untested.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from peft import (
    AdaLoraConfig,
    DeloraConfig,
    FourierFTConfig,
    HiraConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    TrainableTokensConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.xlora.layer import XLoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.masking_utils import eager_mask
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel, LlamaRMSNorm, repeat_kv

VOCAB = 64


def tiny_llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    )


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            attn_implementation="eager",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def tiny_bert() -> nn.Module:
    return BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
    )


class TinyCNN(nn.Module):
    """Conv2d layers (PEFT's conv code paths) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(h.flatten(1))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "cnn": tiny_cnn,
}
ATTN = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "cnn": ["conv1", "conv2"]}
FFN = {"llama": ["down_proj"], "gpt2": ["c_proj"], "bert": ["output.dense"], "cnn": ["conv2"]}


@dataclass(frozen=True)
class Case:
    id: str
    rule: str
    config: Callable[[str], Any]  # arch -> peft config
    archs: tuple[str, ...] = ("llama",)
    geometric: bool = True
    notes: dict = field(default_factory=dict)
    make: Callable[[nn.Module, Any], nn.Module] | None = None
    """Builds the adapted model from (base model, config) instead of ``get_peft_model``: for
    adapters that need more than a config (Poly's task ids)."""


def _lora(**kw: Any) -> Callable[[str], Any]:
    return lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN[arch], fan_in_fan_out=arch == "gpt2", **kw)


HRA_FLOAT32 = (
    "PEFT's HRA forward with no active adapter (funcadapt's y0 for the output interpolation) starts from a "
    "float32 torch.eye and so rounds the layer's output to float32"
)

CASES: list[Case] = [
    Case("lora", "lora", _lora(), archs=("llama", "gpt2", "bert", "cnn")),
    Case("lora-rslora-bias", "lora", _lora(use_rslora=True, lora_bias=True)),
    Case(
        "lora-embedding",
        "lora",
        lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    ),
    Case("dora", "dora", _lora(use_dora=True), archs=("llama", "gpt2", "cnn"), geometric=False),
    Case("lora-variant-mica", "lora-variant", _lora(init_lora_weights="mica"), geometric=False),
    Case(
        "adalora",
        "adalora",
        lambda arch: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ATTN[arch]),
        archs=("llama", "bert"),
    ),
    Case(
        "ia3",
        "ia3",
        lambda arch: IA3Config(
            target_modules=ATTN[arch] + FFN[arch], feedforward_modules=FFN[arch], fan_in_fan_out=arch == "gpt2"
        ),
        archs=("llama", "gpt2", "bert", "cnn"),
    ),
    Case("vera", "vera", lambda arch: VeraConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case("loha", "loha", lambda arch: LoHaConfig(r=4, alpha=8, target_modules=ATTN[arch]), archs=("llama", "cnn")),
    Case(
        "loha-cp",
        "loha",
        lambda arch: LoHaConfig(r=4, alpha=8, target_modules=ATTN[arch], use_effective_conv2d=True),
        archs=("cnn",),
    ),
    Case("lokr", "lokr", lambda arch: LoKrConfig(r=4, alpha=8, target_modules=ATTN[arch]), archs=("llama", "cnn")),
    Case(
        "lokr-full-w2",
        "lokr",
        lambda arch: LoKrConfig(r=4, alpha=8, target_modules=ATTN[arch], decompose_both=True, decompose_factor=4),
    ),
    Case(
        "fourierft",
        "fourierft",
        lambda arch: FourierFTConfig(n_frequency=50, target_modules=ATTN[arch]),
        notes={"float32_inside": "PEFT builds FourierFT's spectrum with spectrum.float() and inverts it in float32"},
    ),
    Case("delora", "delora", lambda arch: DeloraConfig(r=4, target_modules=ATTN[arch])),
    Case("hira", "hira", lambda arch: HiraConfig(r=4, target_modules=ATTN[arch])),
    Case("pvera", "pvera", lambda arch: PveraConfig(r=4, target_modules=ATTN[arch])),
    Case("randlora", "randlora", lambda arch: RandLoraConfig(r=4, target_modules=ATTN[arch])),
    Case(
        "oft",
        "oft",
        lambda arch: OFTConfig(r=0, oft_block_size=36 if arch == "cnn" else 8, target_modules=ATTN[arch]),
        archs=("llama", "bert", "cnn"),
    ),
    Case(
        "oft-exact-cayley",
        "oft",
        lambda arch: OFTConfig(r=0, oft_block_size=8, target_modules=ATTN[arch], use_cayley_neumann=False),
    ),
    Case(
        "oft-block-share",
        "oft",
        lambda arch: OFTConfig(r=0, oft_block_size=8, target_modules=ATTN[arch], block_share=True),
    ),
    Case(
        "oft-coft",
        "oft",
        lambda arch: OFTConfig(r=0, oft_block_size=8, target_modules=ATTN[arch], coft=True, eps=1e-1),
    ),
    Case(
        "modules-to-save",
        "modules-to-save",
        lambda arch: LoraConfig(r=4, target_modules=ATTN[arch], modules_to_save=["lm_head"]),
    ),
    Case(
        "trainable-tokens",
        "trainable-tokens",
        lambda arch: TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 2, 3, 5, 8]),
    ),
    Case(
        "hra",
        "hra",
        lambda arch: HRAConfig(r=4, target_modules=ATTN[arch]),
        archs=("llama", "cnn"),
        geometric=False,
        notes={"float32_inside": HRA_FLOAT32},
    ),
    Case(
        "hra-gs",
        "hra",
        lambda arch: HRAConfig(r=4, target_modules=ATTN[arch], apply_GS=True),
        geometric=False,
        notes={"float32_inside": HRA_FLOAT32},
    ),
    Case("road_1", "road", lambda arch: RoadConfig(variant="road_1", group_size=8, target_modules=ATTN[arch])),
    Case(
        "road_2",
        "road",
        lambda arch: RoadConfig(variant="road_2", group_size=8, target_modules=ATTN[arch]),
        geometric=False,
    ),
    Case(
        "road_4",
        "road",
        lambda arch: RoadConfig(variant="road_4", group_size=8, target_modules=ATTN[arch]),
        geometric=False,
    ),
]

# More cases live in tests/cases_<family>.py files, each defining CASES (a list of Case);
# they are appended here so every test that iterates CASES covers them.
for _file in sorted(Path(__file__).parent.glob("cases_*.py")):
    CASES.extend(importlib.import_module(_file.stem).CASES)
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

CASE_IDS = [c.id for c in CASES]
CASE_ARCH = [(c, a) for c in CASES for a in c.archs]


def case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """PEFT initialises many adapters to the identity; make every trainable adapter tensor non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def build(case_: Case, arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The case's adapted model, every trainable tensor perturbed, in eval mode. ``dtype=torch.float64``
    (what tests that claim exactness use) casts it after the adapter is created and makes it compute in
    float64 throughout (:func:`float64`)."""
    torch.manual_seed(seed)
    base = ARCHS[arch]()
    if dtype == torch.float64 and "float64_before_peft" in case_.notes:
        base = float64(base)  # see the note: the adapter must be created on a float64 base
    config = case_.config(arch)
    model = (case_.make or get_peft_model)(base, config)
    randomize_adapters(model, seed=seed + 1)
    if dtype == torch.float64:
        model = float64(model)
    elif dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    if any(isinstance(m, LoraMultiheadAttention) for m in model.modules()):
        with torch.no_grad():  # PEFT's first forward re-registers (and in bf16 rounds) MHA's base weights
            model(**inputs(arch, dtype=dtype))
    if getattr(config, "coft", False):
        with torch.no_grad():  # PEFT's COFT projects its stored weights in place on the first forward
            model(**inputs(arch, dtype=dtype))
    return model


def inputs(
    arch: str = "llama", batch: int = 2, seq: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Token ids, or for the CNN an image batch in ``dtype`` (drawn in float32 whatever the dtype)."""
    g = torch.Generator().manual_seed(seed)
    if arch == "cnn":
        return {"x": torch.randn(batch, 4, 6, 6, generator=g).to(dtype)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ----------------------------------------------------------------------------
# float64 and the tolerances of exactness checks
#
# A test that claims two computations are the same function (vmap == loop, funcadapt == an independent
# reference, a fast path == the fallback, ...) runs them in float64, where they can differ by rounding
# only: the reduction order of a kernel (it changes with the CPU's vector width and with vmap's batched
# kernels), or an algebraically equal formula. On these tiny models a value goes through at most a few
# hundred roundings of relative size eps64 = 2**-53 = 1.1e-16, each scaled by the magnitude of the terms
# it sums; with a forward/backward's modest amplification that stays within ~1e-13 of the values'
# magnitude (measured: under 1e-14). TOL64 allows 1e-10 relative and 1e-12 absolute (the values are
# O(1); the absolute term covers entries that cancel to ~0): a margin of ~1000 over rounding, and still
# six orders of magnitude below float32's eps (1.2e-7), so even one float32 rounding inside the float64
# computation fails the check, as does any real difference (a wrong sign, a missing term: O(1e-2)).
TOL64: dict[str, float] = {"rtol": 1e-10, "atol": 1e-12}


# Where float32 rounding cannot be avoided — a PEFT method that computes part of itself in float32 whatever
# the model's dtype (the case's note ``float32_inside`` says which part), a funcadapt path that does (the
# reason is given where it is used), or a test whose point is a float32 model (bitsandbytes, the README) —
# two computations of the same function differ by float32 rounding: u32 = 2**-24 = 6e-8 per rounding, and
# a rounded sum of n <= 64 terms is off by at most n·u32 = 4e-6 of the sum of the terms' magnitudes
# (typically √n·u32), an error the rest of a tiny model carries on at about the same relative size. So the
# tolerance is 1e-5 of the compared tensor's largest entry (measured: at most 3e-7), absolute because
# entries that cancel to ~0 keep the error of the terms they came from, and 1e-5 relative: still ~1000
# times below a real difference (a wrong sign, a missing term, a factor: O(1e-2) and more).
def tolerance(want: torch.Tensor, float32_inside: Case | str | bool = False) -> dict[str, float]:
    """The tolerance for comparing a computation with ``want``: float64's (TOL64), or, where float32 rounds
    some or all of it (``float32_inside``: a Case with that note, or the reason), float32's bound above."""
    if isinstance(float32_inside, Case):
        float32_inside = float32_inside.notes.get("float32_inside", False)
    if not float32_inside:
        return TOL64
    return {"rtol": 1e-5, "atol": 1e-5 * float(want.detach().abs().max())}


# bf16 keeps 8 significant bits: one rounding moves a value by up to u = 2**-8 = 3.9e-3 of it, and a bf16
# forward of these models lands ~1-5 u (of the logits' largest entry) off the float64 evaluation of the
# same bf16 weights, several times more where an adapter sums many terms in bf16 (RandLoRA: ~50 u). So a
# bf16 test does not compare funcadapt's bf16 result with PEFT's bf16 reference at a fixed tolerance: both
# are compared with that float64 evaluation, and funcadapt may be off by twice what PEFT's own bf16 forward
# of the same function is (the same computation: as many roundings, in other places) plus 4 u of the
# largest entry (the few roundings in which the two differ: the interpolation's, the output's).
def assert_bf16_as_accurate(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, wrong: torch.Tensor) -> None:
    """``got`` (funcadapt in bf16) is as close to ``exact`` (the float64 evaluation of the same bf16 weights)
    as ``ref`` (PEFT's bf16 evaluation of the same function) is, up to the bound above; and ``wrong`` (what
    a wrong coefficient gives, e.g. c = +1 where −1 was asked for) is not, so the check can fail."""
    u = 2.0**-8
    exact = exact.double()
    bound = 2 * float((ref.double() - exact).abs().max()) + 4 * u * float(exact.abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= bound, f"bf16 result off the float64 evaluation by {err:.3g}, PEFT's own bf16 allows {bound:.3g}"
    miss = float((wrong.double() - exact).abs().max())
    assert miss > bound, f"bf16 cannot tell this adapter's effect ({miss:.3g}) from rounding ({bound:.3g})"


class _Float64RMSNorm(LlamaRMSNorm):
    """``LlamaRMSNorm`` that upcasts to float32 but never downcasts: transformers casts the input to
    float32, which in a float64 model rounds every hidden state to float32."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _float64_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (Llama's), with the softmax in float64 for float64 inputs (transformers
    takes it in float32)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("eager_float64", _float64_eager_attention)
AttentionMaskInterface.register("eager_float64", eager_mask)


def _float64_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss without its ``logits.float()`` (a downcast in a float64 model)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    return fixed_cross_entropy(
        logits.view(-1, vocab_size), shift_labels.view(-1), num_items_in_batch, ignore_index, **kwargs
    )


def float64(model: nn.Module) -> nn.Module:
    """``model`` cast to float64 (in place, returned) and computing in float64 throughout: transformers'
    Llama rounds to float32 in its RMSNorm and its eager softmax, and its causal-LM loss (Llama's and
    GPT-2's) casts the logits to float32, roundings (~1e-7) that would swamp every float64 comparison and
    make a finite difference with gradcheck's step (2e-6) off by ~5%. Those three are switched to float64
    on this model only (its norms' class, its attention implementation, its loss function), the same math
    in the input's dtype. PEFT's own float32 islands stay (see the ``float32_inside`` note of a case)."""
    model.to(torch.float64)
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = _Float64RMSNorm
        if isinstance(module, PreTrainedModel):
            if module.config._attn_implementation == "eager" and isinstance(module, LlamaPreTrainedModel):
                module.config._attn_implementation = "eager_float64"
            if hasattr(module, "lm_head"):
                module.loss_function = _float64_causal_lm_loss
    return model


def adapter_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextlib.contextmanager
def reference_interpolation(model: nn.Module, coeff: Any) -> Iterator[None]:
    """Independent reference for mode='linear': at every adapter layer, replace the output by
    y0 + c·(y1 − y0), with y0 computed by PEFT with the layer's adapters disabled.
    Uses only forward hooks and PEFT's own disable switches, nothing from funcadapt.

    ``coeff``: one coefficient for every layer, or a function from a layer's module path to its
    coefficient (None: that layer is left as it is). A coefficient may be a :class:`ByOutput`: the
    coefficient of each element of the output, computed from the output (per-token references)."""
    coeff_at = coeff if callable(coeff) else lambda name: coeff
    handles = []
    for name, layer in adapter_layers(model):
        c = coeff_at(name)
        if c is None:
            continue

        def hook(module: Any, args: tuple, kwargs: dict, y1: torch.Tensor, coeff: Any = c) -> torch.Tensor:
            switches = [(obj, flag, getattr(obj, flag)) for obj, flag in _disable_switches(module)]
            for obj, flag, _ in switches:
                setattr(obj, flag, True)
            try:
                y0 = module.forward(*args, **kwargs)
            finally:
                for obj, flag, was in switches:
                    setattr(obj, flag, was)
            # attention layers return tuples: interpolate the floating tensors, keep the rest of y1
            return pytree.tree_map(
                lambda a, b: (
                    (a + _at(coeff, a) * (b - a)).to(b.dtype)
                    if isinstance(a, torch.Tensor) and a.is_floating_point()
                    else b
                ),
                y0,
                y1,
            )

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, _BaseAdaptedAttention) and coeff_at(name) is not None:
            handles += _adaption_prompt_reference(wrapper, coeff_at(name))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class ByOutput:
    """A reference coefficient that depends on the layer output it multiplies: ``at(y)`` is broadcastable to y."""

    at: Callable[[torch.Tensor], torch.Tensor]


def _at(coeff: Any, y: torch.Tensor) -> Any:
    return coeff.at(y) if isinstance(coeff, ByOutput) else coeff


def per_token_reference(values: torch.Tensor) -> ByOutput:
    """The reference coefficient of per-token ``values`` ([B, L]) for a forward over the whole sequence
    (no KV cache, positions 0 … T−1): ``values[b, t]`` at ``[b, t, …]``, and at row ``b·T + t`` of an
    output the model computed on its batch flattened ([B·T, …], OPT's fc1/fc2)."""

    def at(y: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0]
        if y.dim() >= 2 and y.shape[0] == rows:
            k = values[:, : y.shape[1]]
            return k.reshape(*k.shape, *([1] * (y.dim() - 2))).to(y.dtype)
        length = y.shape[0] // rows
        return values[:, :length].reshape(-1, *([1] * (y.dim() - 1))).to(y.dtype)

    return ByOutput(at)


def _disable_switches(layer: Any) -> list[tuple[Any, str]]:
    """(object, flag) pairs that switch ``layer``'s adapters off: PEFT's ``_disable_adapters``, and
    for an X-LoRA layer (PEFT replaced its ``forward`` with an ``XLoraLayer``'s, which ignores that
    flag) its ``XLoraModel``'s ``disabled``."""
    switches: list[tuple[Any, str]] = [(layer, "_disable_adapters")]
    xlora = getattr(layer.__dict__.get("forward"), "__self__", None)
    if isinstance(xlora, XLoraLayer):
        switches.append((xlora.model, "disabled"))
    return switches


def _adaption_prompt_reference(wrapper: nn.Module, coeff: float) -> list[Any]:
    """Adaption prompt wraps a whole attention module (``wrapper.model``, what ``disable_adapter()``
    swaps back in); y0 is that module's output, captured while the wrapper runs (running it a
    second time would append to a KV cache twice)."""
    seen: list[Any] = []

    def grab(module: Any, args: tuple, y0: Any) -> None:
        seen.append(y0)

    def lerp(module: Any, args: tuple, y1: Any) -> Any:
        y0 = seen.pop()
        return (y0[0] + _at(coeff, y0[0]) * (y1[0] - y0[0]), *y1[1:])

    return [wrapper.model.register_forward_hook(grab), wrapper.register_forward_hook(lerp)]


def _reregistered(model: nn.Module) -> set[str]:
    """Parameters PEFT itself replaces by new objects on every forward and ``named_modules()``
    call (LoRA on nn.MultiheadAttention re-registers its base weights): their identity cannot
    be compared, their values still are."""
    names = set()
    for n, m in model.named_modules():
        if isinstance(m, LoraMultiheadAttention):
            names |= {f"{n}.base_layer.in_proj_weight", f"{n}.base_layer.out_proj.base_layer.weight"}
    return names


def snapshot(model: nn.Module, state_dict: bool = True) -> dict[str, Any]:
    """Everything 'nothing about the model changed' promises: values, objects, flags. With
    ``state_dict=False`` the values are read from parameters and buffers, never through
    ``state_dict()`` (which bitsandbytes' 4-bit layers do not leave as they were)."""
    skip = _reregistered(model)
    if state_dict:
        values = model.state_dict(keep_vars=True).items()
    else:
        values = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "state": {k: v.detach().clone() for k, v in values},
        "ids": {k: id(v) for k, v in model.named_parameters(remove_duplicate=False) if k not in skip},
        "buffer_ids": {k: id(v) for k, v in model.named_buffers(remove_duplicate=False)},
        "grad": {k: v.requires_grad for k, v in model.named_parameters(remove_duplicate=False)},
        "training": {k: m.training for k, m in model.named_modules(remove_duplicate=False)},
        "dicts": {k: sorted(m.__dict__) for k, m in model.named_modules(remove_duplicate=False)},
        "classes": {k: type(v) for k, v in model.named_parameters(remove_duplicate=False)},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"], "Parameter objects were replaced"
    assert after["buffer_ids"] == before["buffer_ids"], "buffers were replaced"
    assert after["grad"] == before["grad"], "requires_grad changed"
    assert after["training"] == before["training"], "training flags changed"
    assert after["dicts"] == before["dicts"], "module attributes were left behind"
    assert after["classes"] == before["classes"], "parameters are no longer Parameters"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and torch.equal(v, w), f"state_dict entry {k} changed"
