"""Tiny hand-written torch models and a table of (model, PEFT config) cases.

The coverage bar is PEFT's own custom-model matrix (``tests/test_custom_models.py`` in
huggingface/peft): the same adapter families over the same layer kinds (Linear, an
Embedding + transformers ``Conv1D``, Conv1d / Conv2d / Conv3d including grouped and 1×1
kernels, ``nn.MultiheadAttention``, a layer that uses raw ``nn.Parameter`` weights,
LayerNorm), with config parameters chosen like PEFT's (block sizes, ranks, ... that fit
these layer shapes). Models and table are our own.

A case id is ``<family>-<model>-<tag>``; the expectation table in
``test_custom_models.py`` matches ids with regular expressions, so keep the family
prefix (it is the PEFT method name in lower case) when adding rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    AdamssConfig,
    BdLoraConfig,
    BeftConfig,
    BOFTConfig,
    C3AConfig,
    DeftConfig,
    DeloraConfig,
    FourierFTConfig,
    FrodConfig,
    GloraConfig,
    GraloraConfig,
    HiraConfig,
    HRAConfig,
    IA3Config,
    KasaConfig,
    LilyConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    MontecloraConfig,
    OFTConfig,
    OSFConfig,
    PeanutConfig,
    PsoftConfig,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    ShiraConfig,
    SupertuningConfig,
    TinyLoraConfig,
    TrainableTokensConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeloraConfig,
    VeraConfig,
    WaveFTConfig,
    get_peft_model,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

BATCH = 3

# ----------------------------------------------------------------------------
# Models. Each is tiny, deterministic (no dropout) and ends in a small linear head; the
# adapted layers keep the names PEFT's configs below target (lin0, lin1, emb, conv1d,
# conv2d, conv3d, mha, layernorm0/1).


class Mlp(nn.Module):
    """lin0 -> ReLU -> lin1, optionally with a LayerNorm in front of each linear."""

    def __init__(self, hidden: int = 20, layernorm: bool = False) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10) if layernorm else nn.Identity()
        self.lin0 = nn.Linear(10, hidden)
        self.layernorm1 = nn.LayerNorm(hidden) if layernorm else nn.Identity()
        self.lin1 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin0(self.layernorm0(x)))
        return self.lin1(self.layernorm1(h))


class ParamLinear(nn.Module):
    """A linear map written with a bare ``weight`` Parameter (``x @ weight + bias``), the kind
    of layer LoRA reaches through ``target_parameters``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class ParamMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParamLinear(10, 20)
        self.lin1 = ParamLinear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class EmbConv1D(nn.Module):
    """Token embedding -> transformers ``Conv1D`` (GPT-2's linear) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # nf=1 outputs from nx=5 inputs
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1d(self.emb(ids)))  # (B, 10, 1)
        return self.lin0(h.flatten(1))


class ConvNet(nn.Module):
    """``pre`` (optional linear producing the conv input) -> one conv layer named after its
    dimension -> tanh -> flatten -> head. (tanh, not ReLU: with a single output channel a ReLU
    can zero most of what an adapter changes.)"""

    def __init__(self, conv: nn.Module, in_shape: tuple[int, ...], n_flat: int, pre: int = 0) -> None:
        super().__init__()
        self.in_shape = in_shape
        self.pre = pre
        if pre:
            self.lin0 = nn.Linear(pre, int(torch.tensor(in_shape).prod()))
        self.conv_name = f"conv{len(in_shape) - 1}d"
        setattr(self, self.conv_name, conv)
        self.head = nn.Linear(n_flat, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = torch.relu(self.lin0(x))
        x = x.reshape(-1, *self.in_shape)
        h = torch.tanh(getattr(self, self.conv_name)(x))
        return self.head(h.flatten(1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (sequence-first) -> lin0 head."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.mha(x, x, x)
        return self.lin0(h)


@dataclass(frozen=True)
class ModelSpec:
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]


def _floats(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(BATCH, *shape, generator=g)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(Mlp, _floats(10)),
    "mlpwide": ModelSpec(lambda: Mlp(hidden=32), _floats(10)),
    "mlpln": ModelSpec(lambda: Mlp(layernorm=True), _floats(10)),
    "mlpparams": ModelSpec(ParamMlp, _floats(10)),
    "embconv1d": ModelSpec(EmbConv1D, lambda g: torch.randint(0, 100, (BATCH, 10), generator=g)),
    "conv1d": ModelSpec(lambda: ConvNet(nn.Conv1d(1, 1, 2), (1, 10), 9), _floats(1, 10)),
    "conv1dbig": ModelSpec(lambda: ConvNet(nn.Conv1d(64, 16, 2), (64, 10), 144), _floats(64, 10)),
    "conv1dgroups": ModelSpec(lambda: ConvNet(nn.Conv1d(8, 8, 3, groups=2), (8, 10), 64), _floats(8, 10)),
    "conv2d": ModelSpec(lambda: ConvNet(nn.Conv2d(5, 10, 3), (5, 3, 3), 10), _floats(5, 3, 3)),
    "conv2dpre": ModelSpec(lambda: ConvNet(nn.Conv2d(8, 32, 3), (8, 3, 3), 32, pre=10), _floats(10)),
    "conv2d1x1": ModelSpec(lambda: ConvNet(nn.Conv2d(1, 10, 1), (1, 3, 3), 90), _floats(1, 3, 3)),
    "conv2dgroups": ModelSpec(lambda: ConvNet(nn.Conv2d(16, 16, 3, groups=8), (16, 3, 3), 16), _floats(16, 3, 3)),
    "conv2dgroups2": ModelSpec(
        lambda: ConvNet(nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 4, 4), 512), _floats(16, 4, 4)
    ),
    "conv3d": ModelSpec(lambda: ConvNet(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10), _floats(5, 3, 3, 3)),
    "conv3dpre": ModelSpec(lambda: ConvNet(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10, pre=10), _floats(10)),
    "mha": ModelSpec(Attention, lambda g: torch.randn(4, BATCH, 10, generator=g)),
}


# ----------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class CustomCase:
    id: str
    model: str
    config_cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Any:
        return self.config_cls(**self.kwargs)


CASES: list[CustomCase] = []


def add(family: str, model: str, tag: str, cls: type, **kwargs: Any) -> None:
    CASES.append(CustomCase(f"{family}-{model}-{tag}", model, cls, kwargs))


def mlp_sweep(family: str, cls: type, **common: Any) -> None:
    """The targets every family is run on: lin0 (as a regex string and as a list), lin1,
    both, and lin0 with lin1 fully trained (modules_to_save)."""
    add(family, "mlp", "lin0str", cls, target_modules="lin0", **common)
    add(family, "mlp", "lin0", cls, target_modules=["lin0"], **common)
    add(family, "mlp", "lin1", cls, target_modules=["lin1"], **common)
    add(family, "mlp", "both", cls, target_modules=["lin0", "lin1"], **common)
    add(family, "mlp", "lin0+save1", cls, target_modules=["lin0"], modules_to_save=["lin1"], **common)


# --- LoRA and its variants
mlp_sweep("lora", LoraConfig)
add("lora", "mlp", "alpha4-dropout", LoraConfig, target_modules=["lin0"], lora_alpha=4, lora_dropout=0.1)
add("lora", "mlp", "bias-both", LoraConfig, target_modules=["lin0", "lin1"], lora_bias=True, lora_alpha=32)
add("lora", "mlp", "kasa", LoraConfig, target_modules=["lin0"], kasa_config=KasaConfig(), r=4)
add("lora", "mlp", "mica", LoraConfig, target_modules=["lin0"], init_lora_weights="mica", r=4)
add("lora", "mlp", "velora-random", LoraConfig, target_modules=["lin0"],
    velora_config=VeloraConfig(num_groups=2, init_type="random"))  # fmt: skip
add("lora", "mlp", "velora-avg", LoraConfig, target_modules=["lin0", "lin1"],
    velora_config=VeloraConfig(num_groups=2, init_type="batch_average"))  # fmt: skip
add("lora", "mlp", "velora-avg-once", LoraConfig, target_modules=["lin0"],
    velora_config=VeloraConfig(num_groups=2, init_type="batch_average_once"))  # fmt: skip
add("lora", "mlp", "monteclora", LoraConfig, target_modules=["lin0"], monteclora_config=MontecloraConfig(num_samples=2))
add("lora", "mlp", "bdlora-a", LoraConfig, target_modules=["lin0", "lin1"],
    use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False))  # fmt: skip
add("lora", "mlp", "bdlora-b", LoraConfig, target_modules=["lin0", "lin1"],
    use_bdlora=BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False))  # fmt: skip
add("lora", "mlp", "bdlora-ab", LoraConfig, target_modules=["lin0", "lin1"],
    use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2))  # fmt: skip
add("lora", "embconv1d", "conv1d", LoraConfig, target_modules=["conv1d"])
add("lora", "embconv1d", "emb", LoraConfig, target_modules=["emb"])
add("lora", "embconv1d", "emb+conv1d", LoraConfig, target_modules=["emb", "conv1d"])
add("lora", "embconv1d", "conv1d+tokens", LoraConfig, target_modules=["conv1d"],
    trainable_token_indices={"emb": [0, 10]})  # fmt: skip
add("lora", "conv1d", "conv", LoraConfig, target_modules=["conv1d"])
add("lora", "conv2d", "conv", LoraConfig, target_modules=["conv2d"])
add("lora", "conv2d", "conv+bias", LoraConfig, target_modules=["conv2d"], lora_bias=True, lora_alpha=32)
add("lora", "conv2dpre", "conv+lin0", LoraConfig, target_modules=["conv2d", "lin0"])
add("lora", "conv2dgroups", "conv", LoraConfig, target_modules=["conv2d"])
add("lora", "conv2dgroups2", "conv", LoraConfig, target_modules=["conv2d"])
add("lora", "conv3d", "conv", LoraConfig, target_modules=["conv3d"])
add("lora", "conv3dpre", "conv+lin0", LoraConfig, target_modules=["conv3d", "lin0"])
add("lora", "conv3d", "conv+bias", LoraConfig, target_modules=["conv3d"], lora_bias=True, lora_alpha=32)
add("lora", "mha", "mha", LoraConfig, target_modules=["mha"])
add("lora", "mha", "mha+lin0", LoraConfig, target_modules=["mha", "lin0"])
add("lora", "mlpparams", "param-lin0", LoraConfig, target_parameters=["lin0.weight"])
add("lora", "mlp", "lin0+param-lin1", LoraConfig, target_modules=["lin0"], target_parameters=["lin1.weight"])
# DoRA (use_dora=True)
add("dora", "mlp", "lin0", LoraConfig, target_modules=["lin0"], use_dora=True)
add("dora", "mlp", "both", LoraConfig, target_modules=["lin0", "lin1"], use_dora=True)
add("dora", "mlp", "lin1-alpha32", LoraConfig, target_modules="lin1", use_dora=True, lora_alpha=32)
add("dora", "embconv1d", "conv1d", LoraConfig, target_modules=["conv1d"], use_dora=True)
add("dora", "embconv1d", "emb", LoraConfig, target_modules=["emb"], use_dora=True)
add("dora", "embconv1d", "emb+conv1d", LoraConfig, target_modules=["emb", "conv1d"], use_dora=True)
add("dora", "conv1d", "conv", LoraConfig, target_modules=["conv1d"], use_dora=True)
add("dora", "conv2d", "conv", LoraConfig, target_modules=["conv2d"], use_dora=True)
add("dora", "conv2dpre", "conv+lin0", LoraConfig, target_modules=["conv2d", "lin0"], use_dora=True)
add("dora", "conv2dgroups", "conv", LoraConfig, target_modules=["conv2d"], use_dora=True)
add("dora", "conv2dgroups2", "conv", LoraConfig, target_modules=["conv2d"], use_dora=True)
add("dora", "conv3d", "conv", LoraConfig, target_modules=["conv3d"], use_dora=True)
add("dora", "conv3dpre", "conv+lin0", LoraConfig, target_modules=["conv3d", "lin0"], use_dora=True)

# --- AdaLoRA
_ada = {"init_lora_weights": False, "total_step": 1}
add("adalora", "mlp", "lin0", AdaLoraConfig, target_modules=["lin0"], orth_reg_weight=0, **_ada)
add("adalora", "mlp", "both", AdaLoraConfig, target_modules=["lin0", "lin1"], **_ada)
add("adalora", "conv2d", "conv", AdaLoraConfig, target_modules=["conv2d"], **_ada)
add("adalora", "conv2dpre", "conv+lin0", AdaLoraConfig, target_modules=["conv2d", "lin0"], **_ada)

# --- IA3 (ff: feed-forward, scales the input; otherwise scales the output)
for _t, _ff in [("lin0", []), ("lin0", ["lin0"]), ("lin1", []), ("lin1", ["lin1"])]:
    add("ia3", "mlp", f"{_t}-ff{len(_ff)}", IA3Config, target_modules=[_t], feedforward_modules=_ff)
add("ia3", "mlp", "lin0str-ff", IA3Config, target_modules="lin0", feedforward_modules="lin0")
add("ia3", "mlp", "both-ff0", IA3Config, target_modules=["lin0", "lin1"], feedforward_modules=[])
add("ia3", "mlp", "both-ff2", IA3Config, target_modules=["lin0", "lin1"], feedforward_modules=["lin0", "lin1"])
add("ia3", "mlp", "lin0-ff+save1", IA3Config, target_modules=["lin0"], feedforward_modules=["lin0"],
    modules_to_save=["lin1"])  # fmt: skip
add("ia3", "embconv1d", "conv1d-ff", IA3Config, target_modules=["conv1d"], feedforward_modules=["conv1d"])
add("ia3", "embconv1d", "conv1d+lin0-ff", IA3Config, target_modules=["conv1d", "lin0"],
    feedforward_modules=["conv1d", "lin0"])  # fmt: skip
add("ia3", "embconv1d", "conv1d-ff+save", IA3Config, target_modules=["conv1d"], feedforward_modules=["conv1d"],
    modules_to_save=["lin0"])  # fmt: skip
for _conv in ("conv2d", "conv3d"):
    _pre = f"{_conv}pre"  # the same conv with lin0 in front of it
    add("ia3", _conv, "conv-ff0", IA3Config, target_modules=[_conv], feedforward_modules=[])
    add("ia3", _conv, "conv-ff1", IA3Config, target_modules=[_conv], feedforward_modules=[_conv])
    add("ia3", _pre, "conv+lin0-ff0", IA3Config, target_modules=[_conv, "lin0"], feedforward_modules=[])
    add("ia3", _pre, "conv+lin0-ff1", IA3Config, target_modules=[_conv, "lin0"], feedforward_modules=[_conv])
    add("ia3", _pre, "conv+lin0-ff2", IA3Config, target_modules=[_conv, "lin0"],
        feedforward_modules=[_conv, "lin0"])  # fmt: skip

# --- LyCORIS: LoHa and LoKr
for _fam, _cls in [("loha", LoHaConfig), ("lokr", LoKrConfig)]:
    mlp_sweep(_fam, _cls)
    add(_fam, "mlp", "alpha4-moddrop", _cls, target_modules=["lin0"], alpha=4, module_dropout=0.1)
    add(_fam, "mlp", "rankdrop", _cls, target_modules="lin0", rank_dropout=0.5)
    add(_fam, "conv1d", "conv", _cls, target_modules=["conv1d"])
    add(_fam, "conv1d", "conv-r2", _cls, target_modules=["conv1d"], r=2)
    add(_fam, "conv1dgroups", "conv-r4", _cls, target_modules=["conv1d"], r=4)
    add(_fam, "conv1dbig", "conv-r2-eff", _cls, target_modules=["conv1d"], r=2, use_effective_conv2d=True)
    add(_fam, "conv1dbig", "conv-r2", _cls, target_modules=["conv1d"], r=2, use_effective_conv2d=False)
    add(_fam, "conv2d", "conv", _cls, target_modules=["conv2d"])
    add(_fam, "conv2dpre", "conv+lin0", _cls, target_modules=["conv2d", "lin0"])
    add(_fam, "conv2d", "conv-eff", _cls, target_modules=["conv2d"], use_effective_conv2d=True)
    add(_fam, "conv2dpre", "conv+lin0-eff", _cls, target_modules=["conv2d", "lin0"], use_effective_conv2d=True)
    add(_fam, "conv2d1x1", "conv", _cls, target_modules=["conv2d"])
    add(_fam, "conv2dgroups", "conv", _cls, target_modules=["conv2d"])
    add(_fam, "conv2dgroups2", "conv", _cls, target_modules=["conv2d"])
add("lokr", "mlp", "decompose-both-r1", LoKrConfig, target_modules="lin0", decompose_both=True, r=1, alpha=1)
_eff = {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}
add("lokr", "conv2dpre", "eff-decompose-both", LoKrConfig, decompose_both=True, **_eff)
add("lokr", "conv2dpre", "eff-factor4", LoKrConfig, decompose_factor=4, **_eff)
add("lokr", "conv2dpre", "eff-both-factor4", LoKrConfig, decompose_both=True, decompose_factor=4, **_eff)

# --- OFT
_oft_r2 = {"r": 2, "oft_block_size": 0}
add("oft", "mlp", "lin0str", OFTConfig, target_modules="lin0", use_cayley_neumann=False, **_oft_r2)
add("oft", "mlp", "lin0", OFTConfig, target_modules=["lin0"], use_cayley_neumann=False, **_oft_r2)
add("oft", "mlp", "lin0+save1", OFTConfig, target_modules=["lin0"], modules_to_save=["lin1"],
    use_cayley_neumann=False, **_oft_r2)  # fmt: skip
add("oft", "mlp", "moddrop", OFTConfig, target_modules=["lin0"], module_dropout=0.1, use_cayley_neumann=False,
    **_oft_r2)  # fmt: skip
add("oft", "mlp", "coft", OFTConfig, target_modules=["lin0"], coft=True, eps=1e-2, **_oft_r2)
add("oft", "mlp", "share", OFTConfig, target_modules=["lin0"], block_share=True, use_cayley_neumann=False, **_oft_r2)
add("oft", "mlp", "coft-share", OFTConfig, target_modules=["lin0"], coft=True, eps=1e-2, block_share=True, **_oft_r2)
_oft_b2 = {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"]}
add("oft", "mlp", "bs2-neumann", OFTConfig, use_cayley_neumann=True, **_oft_b2)
add("oft", "mlp", "bs2-cayley", OFTConfig, use_cayley_neumann=False, **_oft_b2)
add("oft", "mlp", "bs2-coft-share-neumann", OFTConfig, coft=True, eps=1e-2, block_share=True,
    use_cayley_neumann=True, **_oft_b2)  # fmt: skip
add("oft", "mlp", "bs2-coft-share-cayley", OFTConfig, coft=True, eps=1e-2, block_share=True,
    use_cayley_neumann=False, **_oft_b2)  # fmt: skip
add("oft", "embconv1d", "emb-r1", OFTConfig, r=1, oft_block_size=0, target_modules=["emb"])
add("oft", "embconv1d", "emb-r1-share", OFTConfig, r=1, oft_block_size=0, target_modules=["emb"], block_share=True)
_oft_r5 = {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}
add("oft", "conv2d", "r5", OFTConfig, **_oft_r5)
# COFT's default eps (6e-5) keeps R within 6e-5 of the identity: an adapter with no visible effect
add("oft", "conv2d", "r5-coft", OFTConfig, coft=True, eps=1e-1, **_oft_r5)
add("oft", "conv2d", "r5-share", OFTConfig, block_share=True, **_oft_r5)
add("oft", "conv2d", "r5-coft-share", OFTConfig, coft=True, eps=1e-1, block_share=True, **_oft_r5)

# --- BOFT
add("boft", "mlp", "bs2", BOFTConfig, target_modules=["lin1"], boft_block_size=2)
add("boft", "mlp", "bs2+save0", BOFTConfig, target_modules=["lin1"], modules_to_save=["lin0"], boft_block_size=2)
add("boft", "mlp", "bs2-dropout", BOFTConfig, target_modules=["lin1"], boft_block_size=2, boft_dropout=0.1)
add("boft", "mlp", "bs2-nb0-bf1", BOFTConfig, target_modules=["lin1"], boft_block_size=2, boft_block_num=0,
    boft_n_butterfly_factor=1)  # fmt: skip
add("boft", "mlp", "bn2-bf1", BOFTConfig, target_modules=["lin1"], boft_block_size=0, boft_block_num=2,
    boft_n_butterfly_factor=1)  # fmt: skip
add("boft", "mlp", "bs10-bf2", BOFTConfig, target_modules=["lin1"], boft_block_size=10, boft_block_num=0,
    boft_n_butterfly_factor=2)  # fmt: skip
add("boft", "conv2d", "bs45-bf1", BOFTConfig, target_modules=["conv2d"], boft_block_size=45, boft_block_num=0,
    boft_n_butterfly_factor=1)  # fmt: skip
add("boft", "conv2d", "bn1-bf1", BOFTConfig, target_modules=["conv2d"], boft_block_size=0, boft_block_num=1,
    boft_n_butterfly_factor=1)  # fmt: skip
add("boft", "mlpwide", "bs2-bf3", BOFTConfig, target_modules=["lin1"], boft_block_size=2, boft_block_num=0,
    boft_n_butterfly_factor=3)  # fmt: skip
add("boft", "mlpwide", "bn8-bf3", BOFTConfig, target_modules=["lin1"], boft_block_size=0, boft_block_num=8,
    boft_n_butterfly_factor=3)  # fmt: skip
add("boft", "conv2dpre", "bs2-bf2", BOFTConfig, target_modules=["conv2d"], boft_block_size=2, boft_block_num=0,
    boft_n_butterfly_factor=2)  # fmt: skip
add("boft", "conv2dpre", "bs2-bf3", BOFTConfig, target_modules=["conv2d"], boft_block_size=2, boft_block_num=0,
    boft_n_butterfly_factor=3)  # fmt: skip

# --- HRA, HiRA
add("hra", "mlp", "lin0str", HRAConfig, target_modules="lin0")
add("hra", "mlp", "lin0", HRAConfig, target_modules=["lin0"])
add("hra", "mlp", "both", HRAConfig, target_modules=["lin0", "lin1"])
add("hra", "mlp", "lin0+save1", HRAConfig, target_modules=["lin0"], modules_to_save=["lin1"])
add("hra", "conv2d", "conv", HRAConfig, target_modules=["conv2d"])
mlp_sweep("hira", HiraConfig)
add("hira", "mlp", "dropout", HiraConfig, target_modules=["lin0"], hira_dropout=0.1)
add("hira", "embconv1d", "conv1d", HiraConfig, target_modules=["conv1d"])
add("hira", "embconv1d", "emb", HiraConfig, target_modules=["emb"])
add("hira", "embconv1d", "emb+conv1d", HiraConfig, target_modules=["emb", "conv1d"])
add("hira", "conv1d", "conv", HiraConfig, target_modules=["conv1d"])
add("hira", "conv2d", "conv", HiraConfig, target_modules=["conv2d"])
add("hira", "conv2dpre", "conv+lin0", HiraConfig, target_modules=["conv2d", "lin0"])
add("hira", "conv3d", "conv", HiraConfig, target_modules=["conv3d"])
add("hira", "conv3dpre", "conv+lin0", HiraConfig, target_modules=["conv3d", "lin0"])

# --- VeRA-like shared-projection families
mlp_sweep("vera", VeraConfig)
add("vera", "embconv1d", "conv1d", VeraConfig, target_modules=["conv1d"])
mlp_sweep("pvera", PveraConfig)
add("pvera", "embconv1d", "conv1d", PveraConfig, target_modules=["conv1d"])
_rl = {"randlora_alpha": 1}
add("randlora", "mlp", "lin0str", RandLoraConfig, target_modules="lin0", **_rl)
add("randlora", "mlp", "lin0", RandLoraConfig, target_modules=["lin0"], **_rl)
add("randlora", "mlp", "lin1", RandLoraConfig, target_modules=["lin1"], **_rl)
add("randlora", "mlp", "both", RandLoraConfig, target_modules=["lin0", "lin1"], **_rl)
add("randlora", "mlp", "both-sparse", RandLoraConfig, target_modules=["lin0", "lin1"], sparse=True, **_rl)
add("randlora", "mlp", "both-verysparse", RandLoraConfig, target_modules=["lin0", "lin1"], very_sparse=True, **_rl)
add("randlora", "mlp", "lin0+save1", RandLoraConfig, target_modules=["lin0"], modules_to_save=["lin1"], **_rl)
_vb = {"vector_length": 1, "num_vectors": 5}
add("vblora", "mlp", "lin0str", VBLoRAConfig, target_modules="lin0", **_vb)
add("vblora", "mlp", "lin0", VBLoRAConfig, target_modules=["lin0"], **_vb)
add("vblora", "mlp", "lin1-vl2", VBLoRAConfig, target_modules=["lin1"], vector_length=2, num_vectors=5)
add("vblora", "mlp", "both", VBLoRAConfig, target_modules=["lin0", "lin1"], **_vb)
add("vblora", "mlp", "lin0+save1", VBLoRAConfig, target_modules=["lin0"], modules_to_save=["lin1"], **_vb)
add("vblora", "embconv1d", "conv1d", VBLoRAConfig, target_modules=["conv1d"], vector_length=1, num_vectors=2)
_ul = {"theta_d_length": 101}
mlp_sweep("unilora", UniLoraConfig, **_ul)
add("unilora", "embconv1d", "conv1d", UniLoraConfig, target_modules=["conv1d"], **_ul)
_tl = {"r": 2, "u": 16}
add("tinylora", "mlp", "lin0str", TinyLoraConfig, target_modules="lin0", **_tl)
add("tinylora", "mlp", "lin0", TinyLoraConfig, target_modules=["lin0"], **_tl)
add("tinylora", "mlp", "lin1", TinyLoraConfig, target_modules=["lin1"], **_tl)
add("tinylora", "mlp", "both-u32", TinyLoraConfig, target_modules=["lin0", "lin1"], r=2, u=32)
add("tinylora", "mlp", "lin0+save1", TinyLoraConfig, target_modules=["lin0"], modules_to_save=["lin1"], **_tl)
add("tinylora", "mlp", "tied", TinyLoraConfig, target_modules=["lin0", "lin1"], r=2, u=8, weight_tying=1.0)
add("tinylora", "embconv1d", "conv1d", TinyLoraConfig, target_modules=["conv1d"], init_v_bound=0.5, **_tl)
add("tinylora", "embconv1d", "emb", TinyLoraConfig, target_modules=["emb"], **_tl)

# --- Spectral / sparse / structured additive families
_ff = {"n_frequency": 10, "init_weights": True}
add("fourierft", "mlp", "lin0str", FourierFTConfig, target_modules="lin0", **_ff)
add("fourierft", "mlp", "lin0", FourierFTConfig, target_modules=["lin0"], **_ff)
add("fourierft", "mlp", "lin1", FourierFTConfig, target_modules=["lin1"], **_ff)
add("fourierft", "mlp", "lin0+save1", FourierFTConfig, target_modules=["lin0"], modules_to_save=["lin1"], **_ff)
add("fourierft", "mlp", "both+save1", FourierFTConfig, target_modules=["lin0", "lin1"], modules_to_save=["lin1"],
    **_ff)  # fmt: skip
add("fourierft", "mlp", "pattern+save1", FourierFTConfig, n_frequency_pattern={"lin0": 5, "lin1": 10},
    target_modules=["lin0", "lin1"], modules_to_save=["lin1"], init_weights=True)  # fmt: skip
_wf = {"n_frequency": 8}
mlp_sweep("waveft", WaveFTConfig, **_wf)
add("waveft", "mlp", "scaling25-db1", WaveFTConfig, target_modules=["lin0"], scaling=25.0, wavelet_family="db1", **_wf)
add("waveft", "mlp", "lin1-noidwt", WaveFTConfig, target_modules="lin1", use_idwt=False, **_wf)
add("waveft", "mlp", "sym2", WaveFTConfig, target_modules="lin0", n_frequency=16, wavelet_family="sym2")
add("waveft", "mlp", "sym2-noidwt", WaveFTConfig, target_modules="lin0", n_frequency=16, wavelet_family="sym2",
    use_idwt=False)  # fmt: skip
add("waveft", "mlp", "db1-proportional", WaveFTConfig, target_modules="lin0", n_frequency=16, wavelet_family="db1",
    proportional_parameters=True)  # fmt: skip
_c3 = {"init_weights": True}
add("c3a", "mlp", "lin0str-b2", C3AConfig, block_size=2, target_modules="lin0", **_c3)
add("c3a", "mlp", "lin0-b2", C3AConfig, block_size=2, target_modules=["lin0"], **_c3)
add("c3a", "mlp", "lin1-b2", C3AConfig, block_size=2, target_modules=["lin1"], **_c3)
add("c3a", "mlp", "lin0+save1-b10", C3AConfig, block_size=10, target_modules=["lin0"], modules_to_save=["lin1"],
    **_c3)  # fmt: skip
add("c3a", "mlp", "both+save1-b10", C3AConfig, block_size=10, target_modules=["lin0", "lin1"],
    modules_to_save=["lin1"], **_c3)  # fmt: skip
add("c3a", "mlp", "pattern+save1", C3AConfig, block_size_pattern={"lin0": 5, "lin1": 10},
    target_modules=["lin0", "lin1"], modules_to_save=["lin1"], **_c3)  # fmt: skip
add("shira", "mlp", "lin0str", ShiraConfig, r=1, target_modules="lin0")
add("shira", "mlp", "lin0", ShiraConfig, r=1, target_modules=["lin0"])
add("shira", "mlp", "lin1", ShiraConfig, r=1, target_modules=["lin1"])
add("shira", "mlp", "both-seed56", ShiraConfig, r=1, target_modules=["lin0", "lin1"], random_seed=56)
_st = {"sparsity": 0.5}
add("supertuning", "mlp", "lin0str", SupertuningConfig, target_modules="lin0", **_st)
add("supertuning", "mlp", "lin0", SupertuningConfig, target_modules=["lin0"], **_st)
add("supertuning", "mlp", "lin1", SupertuningConfig, target_modules=["lin1"], **_st)
add("supertuning", "mlp", "both-bottomk", SupertuningConfig, target_modules=["lin0", "lin1"], select_top=False, **_st)
add("supertuning", "mlp", "supra-r2", SupertuningConfig, target_modules=["lin0"], r=2, **_st)

# --- Other LoRA-like families
for _fam, _cls in [("glora", GloraConfig), ("gralora", GraloraConfig)]:
    mlp_sweep(_fam, _cls)
    add(_fam, "mlp", "both+save1", _cls, target_modules=["lin0", "lin1"], modules_to_save=["lin1"])
add("gralora", "mlp", "hybrid-r4", GraloraConfig, target_modules=["lin0", "lin1"], modules_to_save=["lin1"], hybrid_r=4)
add("gralora", "embconv1d", "conv1d-k1", GraloraConfig, target_modules=["conv1d"], gralora_k=1)
mlp_sweep("beft", BeftConfig)
mlp_sweep("frod", FrodConfig)
mlp_sweep("delora", DeloraConfig)
add("delora", "mlp", "moddrop", DeloraConfig, target_modules=["lin0"], module_dropout=0.1)
add("deft", "mlp", "lin0str", DeftConfig, target_modules="lin0")
add("deft", "mlp", "lin0", DeftConfig, target_modules=["lin0"])
add("deft", "mlp", "both", DeftConfig, target_modules=["lin0", "lin1"])
add("deft", "mlp", "qr", DeftConfig, target_modules=["lin0"], decomposition_method="qr")
add("deft", "mlp", "lin0+save1", DeftConfig, target_modules=["lin0"], modules_to_save=["lin1"])
add("deft", "mlp", "qr-alpha16", DeftConfig, target_modules=["lin0"], decomposition_method="qr", alpha=16)
add("deft", "mlp", "para-relu", DeftConfig, target_modules=["lin0"], decomposition_method="relu", para=True)
add("deft", "mlp", "para-qr", DeftConfig, target_modules=["lin0"], decomposition_method="qr", para=True)
add("deft", "embconv1d", "conv1d", DeftConfig, target_modules=["conv1d"])
for _init in ("default", "bat"):
    _kw = {"r": 2} if _init == "default" else {"r": 2, "init_weights": "bat"}
    add("miss", "mlp", f"lin0str-{_init}", MissConfig, target_modules="lin0", **_kw)
    add("miss", "mlp", f"lin0-{_init}", MissConfig, target_modules=["lin0"], **_kw)
    add("miss", "mlp", f"both-{_init}", MissConfig, target_modules=["lin0", "lin1"], **_kw)
    add("miss", "mlp", f"lin0+save1-{_init}", MissConfig, target_modules=["lin0"], modules_to_save=["lin1"], **_kw)
_ps = {"r": 4, "psoft_alpha": 4, "target_modules": ["lin0"]}
add("psoft", "mlp", "lin0str", PsoftConfig, r=4, psoft_alpha=4, target_modules="lin0")
add("psoft", "mlp", "lin0", PsoftConfig, **_ps)
add("psoft", "mlp", "lin1-r2", PsoftConfig, target_modules=["lin1"], r=2, psoft_alpha=2)
add("psoft", "mlp", "both-r2", PsoftConfig, target_modules=["lin0", "lin1"], r=2, psoft_alpha=2)
add("psoft", "mlp", "lin0+save1", PsoftConfig, modules_to_save=["lin1"], **_ps)
add("psoft", "mlp", "strict-orth", PsoftConfig, psoft_mag_a=False, psoft_mag_b=False, **_ps)
add("psoft", "mlp", "lowrank-svd", PsoftConfig, psoft_svd="lowrank", psoft_svd_lowrank_niter=10, **_ps)
add("psoft", "mlp", "neumann5", PsoftConfig, use_cayley_neumann=True, num_cayley_neumann_terms=5,
    cayley_neumann_eps=0.9, **_ps)  # fmt: skip
add("psoft", "mlp", "non-orth", PsoftConfig, psoft_orth=False, psoft_mag_a=False, psoft_mag_b=False, **_ps)
add("psoft", "mlp", "pissa-init", PsoftConfig, ab_svd_init="pissa_init", **_ps)
_ly = {"r": 2, "stride_A": 1, "num_B": 2}
add("lily", "mlp", "lin0str", LilyConfig, target_modules="lin0", **_ly)
add("lily", "mlp", "lin0", LilyConfig, target_modules=["lin0"], **_ly)
add("lily", "mlp", "lin1", LilyConfig, target_modules=["lin1"], **_ly)
add("lily", "mlp", "both", LilyConfig, target_modules=["lin0", "lin1"], **_ly)
add("lily", "mlp", "lin0-r4", LilyConfig, target_modules=["lin0"], r=4, stride_A=1, num_B=2)
_pn = {"r": 2, "depth": 0, "act_fn": "relu"}
add("peanut", "mlp", "lin0str", PeanutConfig, target_modules="lin0", **_pn)
add("peanut", "mlp", "lin0", PeanutConfig, target_modules=["lin0"], **_pn)
add("peanut", "mlp", "lin1", PeanutConfig, target_modules=["lin1"], **_pn)
add("peanut", "mlp", "both", PeanutConfig, target_modules=["lin0", "lin1"], **_pn)
add("peanut", "mlp", "depth1-gelu", PeanutConfig, target_modules="lin0", r=2, depth=1, act_fn="gelu")
add("adamss", "mlp", "lin0str", AdamssConfig, target_modules="lin0", r=8)
add("adamss", "mlp", "lin0", AdamssConfig, target_modules=["lin0"], r=8)
add("adamss", "mlp", "lin1-r2", AdamssConfig, target_modules=["lin1"], r=2)
add("adamss", "mlp", "both", AdamssConfig, target_modules=["lin0", "lin1"], r=8)
add("adamss", "mlp", "subspaces", AdamssConfig, target_modules=["lin0", "lin1"], r=8, num_subspaces=3, subspace_rank=2)
add("adamss", "mlp", "asa", AdamssConfig, target_modules=["lin0", "lin1"], r=8, num_subspaces=6, use_asa=True,
    asa_target_subspaces=3)  # fmt: skip
add("adamss", "mlp", "dynamic-rank", AdamssConfig, target_modules=["lin0"], r=8, num_subspaces=3,
    use_dynamic_rank=True, svd_threshold=0.1)  # fmt: skip

# --- RoAd
_rd = {"group_size": 2}
add("road", "mlp", "lin0str", RoadConfig, target_modules="lin0", **_rd)
add("road", "mlp", "lin0", RoadConfig, target_modules=["lin0"], **_rd)
add("road", "mlp", "lin1", RoadConfig, target_modules=["lin1"], **_rd)
add("road", "mlp", "both", RoadConfig, target_modules=["lin0", "lin1"], **_rd)
add("road", "mlp", "road2", RoadConfig, target_modules=["lin0"], variant="road_2", **_rd)
add("road", "mlp", "road4", RoadConfig, target_modules=["lin0"], variant="road_4", **_rd)

# --- Whole-module and token-level methods
add("lntuning", "mlpln", "ln0str", LNTuningConfig, target_modules="layernorm0")
add("lntuning", "mlpln", "ln0", LNTuningConfig, target_modules=["layernorm0"])
add("lntuning", "mlpln", "ln0+save-ln1", LNTuningConfig, target_modules=["layernorm0"], modules_to_save=["layernorm1"])
add("lntuning", "mlpln", "lin0str", LNTuningConfig, target_modules="lin0")
add("lntuning", "mlpln", "lin0", LNTuningConfig, target_modules=["lin0"])
add("trainabletokens", "embconv1d", "emb", TrainableTokensConfig, target_modules=["emb"], token_indices=[0, 1, 3],
    init_weights=False)  # fmt: skip
add("osf", "mlp", "default", OSFConfig)
add("osf", "mlp", "svd-config", OSFConfig, target_svd_config={"lin0.weight": 5, "lin1.weight": 1})

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# ----------------------------------------------------------------------------
# Building


def randomize_trainable(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Perturb every trainable tensor (PEFT initialises many adapters to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


FLOAT32_INSIDE: dict[str, str] = {
    "hra": "PEFT's HRA forward with no active adapter (funcadapt's y0 there) starts from a float32 torch.eye",
    "fourierft": "PEFT's FourierFT builds its spectrum with spectrum.float() and inverts it in float32",
    "c3a": "PEFT's C3A computes its circular convolution in float32",
    "deft": "PEFT's DeFT computes its projection and update in float32",
}
"""family -> where PEFT computes in float32 even in a float64 model: comparisons of such a case take
cases.tolerance(..., float32_inside=...) instead of float64's."""

FLOAT64_BEFORE_PEFT: dict[str, str] = {
    "adamss": "PEFT's AdaMSS Linear caches the base weight dtype at construction (a model cast later fails)",
}
"""family -> why ``build`` creates its adapter on a float64 base (the others are cast after: PEFT refuses
to initialise some, MiCA and PSOFT, in float64)."""


def family(case: CustomCase) -> str:
    return case.id.split("-", 1)[0]


def inputs(case: CustomCase, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The model's input batch: floats in ``dtype`` (drawn in float32 whatever the dtype), or token ids."""
    x = MODELS[case.model].inputs(torch.Generator().manual_seed(seed))
    return x.to(dtype) if x.is_floating_point() else x


def build(case: CustomCase, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The base model with the case's adapter, every trainable tensor perturbed, in eval mode, cast to
    ``dtype``: float64 by default, since every test of these models claims exactness (one computation
    equals another up to rounding) and float64 is where rounding is far below any real difference (see
    cases.TOL64). Two forwards run before returning, so PEFT's lazy state is settled before any test takes
    a snapshot: some methods (COFT's projection, VeLoRA's batch-average init) settle their
    stored tensors on the first forward, and ``disable_adapter()`` gives layers that only had
    the class default an instance attribute ``_disable_adapters``."""
    torch.manual_seed(seed)
    base = MODELS[case.model].make()
    if family(case) in FLOAT64_BEFORE_PEFT:
        base.to(dtype)
    model = get_peft_model(base, case.config())
    randomize_trainable(model, seed=seed + 1)
    model.to(dtype)
    model.eval()
    with torch.no_grad():
        model(inputs(case, dtype=dtype))
        with model.disable_adapter():
            model(inputs(case, dtype=dtype))
    return model
