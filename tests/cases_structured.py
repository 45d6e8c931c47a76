"""Cases for the orthogonal / multiplicative / structured families: BOFT, PSOFT, DeFT, OSF,
MiSS (every init variant), GLoRA, BEFT. Appended to ``cases.CASES`` so every generic test
covers them; their special math (geometric paths, exact inverses) is in
``test_rules_structured.py``."""

from __future__ import annotations

from cases import ATTN, FFN, Case
from peft import BeftConfig, BOFTConfig, DeftConfig, GloraConfig, MissConfig, OSFConfig, PsoftConfig


def _boft(arch: str) -> BOFTConfig:
    # Conv2d: the rotation acts on in·k·k = 36 (conv1) and 72 (conv2) filter entries
    return BOFTConfig(boft_block_size=12 if arch == "cnn" else 8, target_modules=ATTN[arch])


DEFT_NOTES = {"float32_inside": "PEFT computes DeFT's projection and update in float32"}


def _deft(**kw: object):
    return lambda arch: DeftConfig(r=4, target_modules=ATTN[arch], fan_in_fan_out=arch == "gpt2", **kw)


CASES: list[Case] = [
    Case("boft", "boft", _boft, archs=("llama", "bert", "cnn")),
    Case(
        "boft-block-num",
        "boft",
        lambda arch: BOFTConfig(boft_block_num=2, boft_block_size=0, target_modules=ATTN[arch] + FFN[arch]),
    ),
    Case("psoft", "psoft", lambda arch: PsoftConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case(
        # eps small enough that PEFT's rescaling of Q is active on the randomised adapters
        "psoft-neumann-eps",
        "psoft",
        lambda arch: PsoftConfig(
            r=4, target_modules=ATTN[arch], use_cayley_neumann=True, cayley_neumann_eps=0.3, ab_svd_init="pissa_init"
        ),
    ),
    Case(
        "psoft-free",
        "psoft",
        lambda arch: PsoftConfig(r=4, target_modules=ATTN[arch], psoft_orth=False, psoft_mag_a=False),
        geometric=False,
    ),
    Case("deft", "deft", _deft(), archs=("llama", "gpt2", "bert"), geometric=False, notes=DEFT_NOTES),
    Case("deft-para-relu", "deft", _deft(para=True, decomposition_method="relu"), geometric=False, notes=DEFT_NOTES),
    Case("osf", "osf", lambda arch: OSFConfig(target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case("miss", "miss", lambda arch: MissConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case("miss-mini", "miss", lambda arch: MissConfig(r=4, mini_r=4, init_weights="mini", target_modules=ATTN[arch])),
    Case("miss-random", "miss", lambda arch: MissConfig(r=3, init_weights=False, target_modules=ATTN[arch])),
    Case(
        "miss-bat",
        "miss-bat",
        lambda arch: MissConfig(r=4, init_weights="bat", target_modules=ATTN[arch]),
        archs=("llama", "bert"),
        geometric=False,
    ),
    Case("glora", "glora", lambda arch: GloraConfig(r=4, target_modules=ATTN[arch]), archs=("llama", "bert")),
    Case(
        "glora-vector",
        "glora",
        lambda arch: GloraConfig(
            r=4, target_modules=ATTN[arch], config_A_B="vector", config_C="lora", config_D_E="constant"
        ),
        archs=("llama", "bert"),
    ),
    Case("beft", "beft", lambda arch: BeftConfig(target_modules=ATTN[arch]), archs=("llama", "bert")),
]
