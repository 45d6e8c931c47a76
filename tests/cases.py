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
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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
    Case("fourierft", "fourierft", lambda arch: FourierFTConfig(n_frequency=50, target_modules=ATTN[arch])),
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
    Case("hra", "hra", lambda arch: HRAConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "cnn"), geometric=False),
    Case(
        "hra-gs",
        "hra",
        lambda arch: HRAConfig(r=4, target_modules=ATTN[arch], apply_GS=True),
        geometric=False,
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
    torch.manual_seed(seed)
    base = ARCHS[arch]()
    config = case_.config(arch)
    model = (case_.make or get_peft_model)(base, config)
    randomize_adapters(model, seed=seed + 1)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    if any(isinstance(m, LoraMultiheadAttention) for m in model.modules()):
        with torch.no_grad():  # PEFT's first forward re-registers (and in bf16 rounds) MHA's base weights
            model(**inputs(arch))
    if getattr(config, "coft", False):
        with torch.no_grad():  # PEFT's COFT projects its stored weights in place on the first forward
            model(**inputs(arch))
    return model


def inputs(arch: str = "llama", batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "cnn":
        return {"x": torch.randn(batch, 4, 6, 6, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def adapter_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextlib.contextmanager
def reference_interpolation(model: nn.Module, coeff: Any) -> Iterator[None]:
    """Independent reference for mode='linear': at every adapter layer, replace the output by
    y0 + c·(y1 − y0), with y0 computed by PEFT with the layer's adapters disabled.
    Uses only forward hooks and PEFT's own disable switches, nothing from funcadapt.

    ``coeff``: one coefficient for every layer, or a function from a layer's module path to its
    coefficient (None: that layer is left as it is)."""
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
                    (a + coeff * (b - a)).to(b.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else b
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
        return (y0[0] + coeff * (y1[0] - y0[0]), *y1[1:])

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
