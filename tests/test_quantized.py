"""bitsandbytes-quantized base models (4-bit nf4, 4-bit fp4 with double quantization and
bf16 compute, 8-bit LLM.int8) under every adapter family: the coefficient means the same
as on a float model, funcadapt.vmap over coefficients equals the Python loop and the seed
two-pass AdapterModifier loop (losses and gradients), gradient checkpointing gives the
same gradients, the quantized weights and their quant state are never touched or left
dequantized, and quantization backends funcadapt cannot handle are refused by name.

The tiny Llama is saved once per session and loaded back with a BitsAndBytesConfig, so
every linear layer is a real bitsandbytes layer: the adapted q_proj/v_proj (and down_proj
for IA3) and the non-adapted k_proj, o_proj and MLP, which all stay in the forward.
References are PEFT's own quantized forwards, never a float model: 8-bit on CPU casts
its inputs to fp16 and quantizes them row-wise, 4-bit fp4 here computes in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from cases import (
    VOCAB,
    inputs,
    output,
    per_token_reference,
    randomize_adapters,
    reference_interpolation,
    tiny_llama,
)
from cases import snapshot as cases_snapshot
from peft import (
    AdaLoraConfig,
    HiraConfig,
    IA3Config,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PveraConfig,
    RandLoraConfig,
    RoadConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch._C._functorch import is_batchedtensor
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import funcadapt
from funcadapt import AdapterModifier, quantized, swap
from funcadapt.ops import Interpolate, Rotate

pytestmark = pytest.mark.filterwarnings("ignore")

BNB_LINEARS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
BNB_PARAMS = {bnb.nn.Linear4bit: (bnb.nn.Params4bit, torch.uint8), bnb.nn.Linear8bitLt: (bnb.nn.Int8Params, torch.int8)}

IDS = inputs(batch=2, seq=8)["input_ids"]
LABELS = torch.randint(0, VOCAB, (2, *IDS.shape), generator=torch.Generator().manual_seed(123))  # one per coefficient
COEFFS = (1.0, -1.0)


# ----------------------------------------------------------------------------
# models


QUANT: dict[str, Callable[[], BitsAndBytesConfig]] = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "fp4-dq-bf16": lambda: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}

ATTN = ["q_proj", "v_proj"]
ADAPTERS: dict[str, Callable[[], Any]] = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True),
    "ia3": lambda: IA3Config(target_modules=[*ATTN, "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ATTN),
    "randlora": lambda: RandLoraConfig(r=4, target_modules=ATTN),
    "road_1": lambda: RoadConfig(variant="road_1", group_size=8, target_modules=ATTN),
    "hira": lambda: HiraConfig(r=4, target_modules=ATTN),
    "pvera": lambda: PveraConfig(r=4, target_modules=ATTN),
    "vera": lambda: VeraConfig(r=4, target_modules=ATTN),
    "oft": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=ATTN),
}
RULE = {"road_1": "road"}

# Adapters acting on the *input* of the quantized kernel (IA3 on the feed-forward down_proj
# scales its input, OFT rotates it). A layer is affine in its input only when its kernel
# is. The 8-bit kernel quantizes each input row to int8 (before funcadapt switched those
# layers to output interpolation, the parameter transform was off by up to 6% of the
# adapter's effect), so funcadapt interpolates their output: exact, tested at 1e-5 below.
# The bf16-compute 4-bit kernel only rounds its input to bf16, so there the parameter
# transform and the per-layer reference differ by bf16 rounding (≤ 1.5% of the effect).
INPUT_SIDE = ("ia3", "oft")
LOSSY_INPUT = {"fp4-dq-bf16": 0.05}

PEFT_INT8_DORA = (
    "PEFT 0.21.2 + bitsandbytes 0.50.2 on CPU cannot run DoRA on an 8-bit base layer (no funcadapt involved): "
    "DoRA's dequantize_module_weight() re-assigns `module.weight = module.weight.to('cpu')`, the new Int8Params "
    "carries CB but no SCB, so the next forward's init_8bit_state() sets state.SCB = None and the second PEFT "
    "forward raises AttributeError: 'NoneType' object has no attribute 'dtype' (int8_mm_dequant); "
    "see test_peft_int8_dora_is_broken_on_cpu"
)


def _combos(*, vmapped: bool) -> list[Any]:
    """All adapters on nf4 and int8; LoRA, IA3 and OFT on fp4 + double quant + bf16 compute."""
    out = []
    for quant, names in (("nf4", ADAPTERS), ("int8", ADAPTERS), ("fp4-dq-bf16", ("lora", "ia3", "oft"))):
        for name in names:
            marks: list[Any] = []
            if (quant, name) == ("int8", "dora"):
                marks.append(pytest.mark.skip(reason=PEFT_INT8_DORA))
            out.append(pytest.param(quant, name, id=f"{quant}-{name}", marks=marks))
    return out


COMBOS = _combos(vmapped=False)
VMAP_COMBOS = _combos(vmapped=True)


def load_base(path: Path, quant: str) -> nn.Module:
    return LlamaForCausalLM.from_pretrained(path, quantization_config=QUANT[quant](), device_map="cpu")


def build(
    path: Path, quant: str, adapter: str, *, train: bool = False, bnb_train: bool = False, convert: bool = True
) -> nn.Module:
    """``bnb_train``: the bitsandbytes layers in train mode whatever ``train`` is. On CPUs with
    AVX512-BF16, a 4-bit layer in eval mode converts itself, for good, to bitsandbytes' packed
    bfloat16 inference kernel on its first forward whose input does not require grad (that kernel
    has no gradient with respect to its input). The warm-up forward below runs without gradients,
    in the model's mode, so in eval mode it converts every 4-bit layer; ``convert=False`` runs it in
    train mode instead, which converts none (what a user's first training step then converts is
    what the test's own forwards convert)."""
    base = load_base(path, quant)
    torch.manual_seed(0)  # PEFT initialises from the global RNG: the same adapter whatever ran before (xdist)
    model = get_peft_model(base, ADAPTERS[adapter]())
    randomize_adapters(model, seed=1)
    model.train(train or not convert)
    if bnb_train:
        for m in bnb_layers(model).values():
            m.train()
    with torch.no_grad():
        # bitsandbytes' first 8-bit forward moves CB/SCB from the weight into the layer's
        # state (and PEFT's DoRA re-assigns the 4-bit weight on every forward): warm up so
        # that snapshots see the model's steady state.
        model(input_ids=IDS)
    if not convert:
        model.train(train)
        for m in bnb_layers(model).values():
            m.train(train or bnb_train)
    return model


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BNB_LINEARS)}


def peft_reassigned(model: nn.Module) -> set[str]:
    """Parameter keys PEFT itself replaces on every forward: DoRA's dequantize_module_weight
    does ``module.weight = module.weight.to('cpu')`` on the bnb base layer."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and getattr(module, "lora_variant", None):
            keys.add(f"{name}.base_layer.weight")
    return keys


def kernel_weight(m: nn.Module) -> torch.Tensor:
    """A 4-bit layer's weight as its kernel computes with it: the layer applied to the identity
    (any change of the weight or its quantization state shows here). In train mode, so that this
    probe never converts the layer to bitsandbytes' packed CPU inference kernel itself (an eval
    no-grad forward would); a layer already converted is read through that kernel."""
    was = m.training
    m.train()
    try:
        with torch.no_grad():
            return m(torch.eye(m.in_features, dtype=m.compute_dtype or torch.float32)).clone()
    finally:
        m.train(was)


def dequantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's weight as its kernel computes with it."""
    return {name: kernel_weight(m) for name, m in bnb_layers(model).items() if isinstance(m, bnb.nn.Linear4bit)}


def assert_model_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """cases.assert_unchanged, except for the object identity of the weights PEFT re-assigns
    itself (DoRA), whose class, dtype and bytes are still compared; 4-bit quantization state is
    compared through what the kernel computes (see :func:`snapshot`)."""
    after = snapshot(model)
    for key in peft_reassigned(model):
        assert key in before["ids"]
        before["ids"][key] = after["ids"][key]
    for key in ("ids", "buffer_ids", "grad", "training", "dicts", "classes"):
        assert after[key] == before[key], f"{key} changed"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and torch.equal(v, w), f"state_dict entry {k} changed"
    decoded = dequantized(model)
    assert decoded.keys() == before["dequantized"].keys()
    for name, w in decoded.items():
        assert torch.equal(w, before["dequantized"][name]), f"{name}: the 4-bit weight decodes differently"


def snapshot(model: nn.Module) -> dict[str, Any]:
    """cases.snapshot read from parameters and buffers, plus each 4-bit layer's weight as its kernel
    computes with it. Not through ``state_dict()``: on a CPU with AVX512-BF16 (AMD EPYC, 2026-11-27),
    bitsandbytes 0.50.2's 4-bit state_dict packing re-lays out the quant state so that the layer's
    outputs change afterwards (no funcadapt involved); the packed quant-state tensors it would
    expose are covered by the kernel-computed weight instead."""
    return {**cases_snapshot(model, state_dict=False), "dequantized": dequantized(model)}


# The weight-carrying fields of bitsandbytes' MatmulLtState. (``idx``, the outlier columns of
# the last input, is per-forward scratch that bitsandbytes rewrites in every forward, PEFT's too.)
INT8_STATE = ("CB", "SCB", "SB", "CBt", "SBt", "subB", "has_fp16_weights", "threshold")


def _int8_state(state: Any) -> dict[str, Any]:
    return {k: getattr(state, k) for k in INT8_STATE}


def bnb_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per bitsandbytes layer: the weight object and its class, dtype and storage, the
    quant_state object (4-bit) or the LLM.int8 state (8-bit), and copies of every tensor in them."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in bnb_layers(model).items():
        w = m.weight
        rec: dict[str, Any] = {"weight": w, "type": type(w), "dtype": w.dtype, "ptr": w.data_ptr()}
        if isinstance(m, bnb.nn.Linear4bit):
            qs = w.quant_state
            rec["quant_state"] = qs
            rec["dequantized"] = kernel_weight(m)
        else:
            rec["state"] = m.state
            rec["state_fields"] = {
                k: (v, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _int8_state(m.state).items()
            }
            rec["weight_attrs"] = {k: getattr(w, k, None) for k in ("CB", "SCB")}
        out[name] = rec
    return out


def assert_bnb_untouched(model: nn.Module, before: dict[str, dict[str, Any]]) -> None:
    now = bnb_layers(model)
    assert now.keys() == before.keys(), "bitsandbytes layers were replaced"
    reassigned = {k.rsplit(".", 1)[0] for k in peft_reassigned(model)}
    for name, m in now.items():
        rec = before[name]
        w = m.weight
        cls, dtype = BNB_PARAMS[type(m)]
        assert type(w) is cls and w.dtype == dtype, f"{name}.weight is a {type(w).__name__} {w.dtype}: dequantized?"
        assert type(w) is rec["type"] and w.dtype == rec["dtype"]
        if name not in reassigned:
            assert w is rec["weight"], f"{name}.weight object was replaced"
            assert w.data_ptr() == rec["ptr"], f"{name}.weight storage was replaced"
        if isinstance(m, bnb.nn.Linear4bit):
            if name not in reassigned:
                assert w.quant_state is rec["quant_state"], f"{name}: quant_state object was replaced"
            # the packed quant state's layout is bitsandbytes' own business (see quant_state_keys);
            # what it encodes must not change
            assert torch.equal(kernel_weight(m), rec["dequantized"]), f"{name}: the 4-bit weight decodes differently"
        else:
            assert m.state is rec["state"], f"{name}: LLM.int8 state object was replaced"
            assert m.state.CB is not None and m.state.SCB is not None, f"{name}: the int8 weight left the state"
            fields = _int8_state(m.state)
            for k, (obj, copy) in rec["state_fields"].items():
                assert fields[k] is obj, f"{name}: state.{k} was replaced"
                if isinstance(obj, torch.Tensor):
                    assert torch.equal(obj, copy), f"{name}: state.{k} changed"
            for k, v in rec["weight_attrs"].items():
                assert getattr(w, k, None) is v, f"{name}: weight.{k} changed"


# ----------------------------------------------------------------------------
# helpers


def logits(model: nn.Module, params: dict[str, Any] | None = None, ids: torch.Tensor = IDS) -> torch.Tensor:
    if params is None:
        return output(model(input_ids=ids))
    return output(funcadapt.call(model, params, input_ids=ids))


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads_of(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(params, gs, strict=True))


def take_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The accumulated ``.grad`` of each parameter (zeros where none arrived), then cleared."""
    out = {}
    for k, p in params.items():
        out[k] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        p.grad = None
    return out


def assert_grads_close(got, want, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    assert max(float(w.abs().max()) for w in want.values()) > 0, "reference gradients are all zero"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad of {k}: {m}")


def loss_call(model: nn.Module, tree: funcadapt.AdapterTree, c: Any, labels: torch.Tensor) -> torch.Tensor:
    return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=IDS, labels=labels).loss


def loss_modifier(model: nn.Module, tree: funcadapt.AdapterTree, c: Any, labels: torch.Tensor) -> torch.Tensor:
    with AdapterModifier(model, "scale", c):
        return model(input_ids=IDS, labels=labels).loss


@contextlib.contextmanager
def peft_at(model: nn.Module, params: funcadapt.Transformed) -> Iterator[None]:
    """PEFT's own forward at transformed parameters: the tensors of ``params`` are written into
    the model's Parameters (and restored bit for bit), and OFT's forward-time coefficient
    becomes a forward hook x + c·(R·x − x) on PEFT's rotation module. Nothing from funcadapt runs."""
    named = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        with torch.no_grad():
            for e in params.effects:
                lerps = [op for op in e.ops if isinstance(op, Rotate) and op.how == "lerp"]
                assert len(lerps) == len(e.ops), f"no independent reference for {e.ops}"
                for op in lerps:
                    rot = model.get_submodule(e.spec.path).oft_R[e.spec.adapter]
                    c = float(op.coeff)

                    def hook(module: Any, args: tuple, y: torch.Tensor, c: float = c) -> torch.Tensor:
                        return args[0] + c * (y - args[0])

                    handles.append(rot.register_forward_hook(hook))
            values = dict(params.items())  # every value read before any is written
            for key, value in values.items():
                if value is not named[key]:
                    saved[key] = named[key].detach().clone()
                    named[key].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                named[key].copy_(value)
        for h in handles:
            h.remove()


@contextlib.contextmanager
def count_mlp_forwards(model: Any) -> Iterator[list[int]]:
    """How often layer 0's (quantized) MLP runs: twice per forward+backward when checkpointed."""
    count = [0]
    handle = (
        model.get_base_model()
        .model.layers[0]
        .mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    )
    try:
        yield count
    finally:
        handle.remove()


# ----------------------------------------------------------------------------
# 1. what the coefficient means, on a quantized base


@pytest.mark.parametrize(("quant", "adapter"), COMBOS)
def test_endpoints_and_linear_mode(llama_dir, quant, adapter):
    """c = 1 is PEFT's quantized forward, c = 0 / op="disable" is PEFT with adapters disabled,
    linear mode at c = −1 and 2 is the per-layer reference y0 + c·(y1 − y0), and at every c
    funcadapt.call equals PEFT run at the transformed parameters."""
    model = build(llama_dir, quant, adapter)
    layers = bnb_layers(model)
    names = {n.rsplit(".", 1)[-1] for n in layers}
    assert {"base_layer", "k_proj", "o_proj", "gate_proj", "up_proj"} <= names, "not a quantized model"
    assert all(
        isinstance(m.get_base_layer(), BNB_LINEARS) for _, m in model.named_modules() if isinstance(m, BaseTunerLayer)
    )
    tree = funcadapt.extract(model)
    assert RULE.get(adapter, adapter) in {s.rule for s in tree.layers}
    before = snapshot(model)

    with torch.no_grad():
        y1 = logits(model)
        with model.disable_adapter():
            y0 = logits(model)
        effect = float((y1 - y0).abs().max())
        assert effect > 1e-2, "the adapter must be non-trivial for this test to mean anything"
        lossy = adapter in INPUT_SIDE and quant in LOSSY_INPUT

        def close(got: torch.Tensor, want: torch.Tensor, lossy_share: float) -> None:
            """Normwise within PATH_TOL (two computations of one value); input-side adapters on a
            bf16-compute base: elementwise within a share of the adapter's effect (see LOSSY_INPUT)."""
            if lossy:
                torch.testing.assert_close(got, want, rtol=0, atol=lossy_share * effect)
                return
            err = float((got - want).norm() / want.norm())
            assert err <= PATH_TOL[quant], f"{err:.2e} (normwise), allowed {PATH_TOL[quant]:.0e}"

        assert torch.equal(logits(model, funcadapt.transform(tree, 1.0)), y1)
        close(logits(model, funcadapt.transform(tree, torch.tensor(1.0))), y1, 1e-2)
        assert torch.equal(logits(model, funcadapt.transform(tree, None, "disable")), y0)
        torch.testing.assert_close(logits(model, funcadapt.transform(tree, 0.0)), y0, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(model, funcadapt.transform(tree, torch.tensor(0.0))), y0, rtol=0, atol=1e-6)

        for c in (-1.0, 2.0):
            with reference_interpolation(model, c):
                ref = logits(model)
            assert not torch.allclose(ref, y1, atol=1e-3)
            for coeff in (c, torch.tensor(c)):
                params = funcadapt.transform(tree, coeff)
                got = logits(model, params)
                close(got, ref, LOSSY_INPUT.get(quant, 0.0))
                if params.ops_of(Interpolate):
                    continue  # DoRA's linear mode *is* the output interpolation: compared just above
                with peft_at(model, params):
                    want = logits(model)
                close(got, want, 1e-2)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize(("quant", "adapter"), COMBOS)
def test_per_row_coefficients(llama_dir, quant, adapter):
    """One coefficient per row of a tiled batch on the quantized model equals separate calls: the
    independent per-layer reference y0 + c·(y1 − y0) run on each coefficient's rows alone, the
    model unchanged. (On 8-bit layers that needs funcadapt to run each coefficient's rows as a call
    of their own: LLM.int8 picks its fp16 outlier columns over all rows of a call.) Normwise
    tolerance as between any two paths of one computation (PATH_TOL)."""
    model = build(llama_dir, quant, adapter)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    coeffs = torch.tensor([-1.0, 0.0, 2.0])
    tiled = funcadapt.tile(IDS, len(coeffs))
    with torch.no_grad():
        got = logits(model, funcadapt.transform(tree, funcadapt.per_row(coeffs, repeat=IDS.shape[0])), ids=tiled)
        separate = []
        for c in coeffs.tolist():
            with reference_interpolation(model, c):
                separate.append(logits(model))
        ref = torch.cat(separate)
        assert not torch.allclose(separate[0], separate[-1], atol=1e-3)
    err = float((got - ref).norm() / ref.norm())
    assert err <= PATH_TOL[quant], f"{err:.2e} (normwise) from separate calls"
    assert_model_unchanged(model, before)


@pytest.mark.parametrize(("quant", "adapter"), COMBOS)
def test_per_token_coefficients(llama_dir, quant, adapter):
    """Per-token coefficients on the quantized model equal the hook reference that interpolates each
    token's output (on the same batch: a per-token coefficient changes nothing about which rows run in
    one call), the model unchanged. Normwise tolerance as between two paths of one computation."""
    model = build(llama_dir, quant, adapter)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    g = torch.Generator().manual_seed(3)
    values = torch.rand(IDS.shape[0], IDS.shape[1] + 2, generator=g) * 3.5 - 1.5
    with torch.no_grad():
        got = logits(model, funcadapt.transform(tree, funcadapt.per_token(values)))
        with reference_interpolation(model, per_token_reference(values)):
            ref = logits(model)
    err = float((got - ref).norm() / ref.norm())
    assert err <= PATH_TOL[quant], f"{err:.2e} (normwise) from the token-by-token reference"
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_export_onto_a_quantized_base_and_merge_refused(llama_dir, quant, tmp_path):
    """A LoRA on a bitsandbytes base exports at c (its tensors are float; PEFT reloads it onto a fresh
    quantized base with funcadapt's logits, normwise within PATH_TOL); merge refuses, naming the reason."""
    model = build(llama_dir, quant, "lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match="bitsandbytes-quantized base"):
        funcadapt.merge(model, 0.5)
    path = funcadapt.export(model, -0.5, tmp_path / "adapter")
    assert_model_unchanged(model, before)
    reloaded = PeftModel.from_pretrained(load_base(llama_dir, quant), str(path)).eval()
    with torch.no_grad():
        got = logits(model, funcadapt.transform(funcadapt.extract(model), -0.5))
        reloaded(input_ids=IDS)  # the same warm-up as build's (bitsandbytes' first forward sets state)
        want = logits(reloaded)
    err = float((got - want).norm() / want.norm())
    assert err <= PATH_TOL[quant], f"{err:.2e} (normwise) from the reloaded adapter"


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_vmap_over_per_token_values(llama_dir, quant):
    """funcadapt.vmap over a batch of per-token values equals one call per value (normwise within PATH_TOL)."""
    model = build(llama_dir, quant, "lora")
    tree = funcadapt.extract(model)
    g = torch.Generator().manual_seed(4)
    stacked = torch.rand(3, IDS.shape[0], IDS.shape[1], generator=g) * 3.5 - 1.5

    def at(values: torch.Tensor) -> torch.Tensor:
        return logits(model, funcadapt.transform(tree, funcadapt.per_token(values)))

    with torch.no_grad():
        together = funcadapt.vmap(at)(stacked)
        separate = torch.stack([at(v) for v in stacked])
    err = float((together - separate).norm() / separate.norm())
    assert err <= PATH_TOL[quant], f"{err:.2e} (normwise) from one call per value"


def test_generate_per_row_on_4bit(llama_dir):
    """generate() at three coefficients from one batch on an nf4 model: the greedy tokens
    equal three separate generations."""
    model = build(llama_dir, "nf4", "lora")
    config = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    coeffs = [-2.0, 0.0, 2.0]
    separate = []
    for c in coeffs:
        with AdapterModifier(model, "scale", c):
            separate.append(model.generate(input_ids=IDS, **config))
    with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=IDS.shape[0])):
        together = model.generate(input_ids=funcadapt.tile(IDS, 3), **config)
    assert torch.equal(together, torch.cat(separate))
    assert not torch.equal(separate[0], separate[2])


# ----------------------------------------------------------------------------
# 2. vmap over coefficients == the Python loop == the seed's two-pass AdapterModifier loop


@pytest.mark.parametrize(("quant", "adapter"), VMAP_COMBOS)
def test_vmap_equals_loop_and_seed_loop(llama_dir, quant, adapter):
    # PVeRA samples its bottleneck in train mode, so no two passes can agree there; in eval
    # mode it uses the mean, and gradients flow the same way. All other dropouts are 0.
    model = build(llama_dir, quant, adapter, train=adapter != "pvera", bnb_train=True)
    tree = funcadapt.extract(model)
    params = trainable(tree)
    coeffs = torch.tensor(COEFFS)

    def loss_fn(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_call(model, tree, c, labels)

    before = snapshot(model)
    losses = funcadapt.vmap(loss_fn)(coeffs, LABELS)
    g_vmap = grads_of(losses.sum(), params)
    assert_model_unchanged(model, before)

    loop = torch.stack([loss_fn(coeffs[i], LABELS[i]) for i in range(len(COEFFS))])
    g_loop = grads_of(loop.sum(), params)

    # the seed: two passes through the AdapterModifier context, one backward after both exits
    with AdapterModifier(model, "scale", 1.0):
        lp = model(input_ids=IDS, labels=LABELS[0]).loss
    with AdapterModifier(model, "scale", -1.0):
        ln = model(input_ids=IDS, labels=LABELS[1]).loss
    (lp + ln).backward()
    g_seed = take_grads(params)
    assert_model_unchanged(model, before)

    assert losses.shape == (len(COEFFS),)
    assert not torch.allclose(loop[0], loop[1], atol=1e-4)
    tol = PATH_TOL[quant]
    torch.testing.assert_close(losses, loop, rtol=tol, atol=0)
    torch.testing.assert_close(torch.stack([lp, ln]).detach(), loop.detach(), rtol=tol, atol=0)
    for name, got in (("vmap", g_vmap), ("two passes", g_seed)):
        err = normwise_error(got, g_loop)
        assert err <= tol, f"{name}: gradients {err:.2e} (normwise) from the loop's, allowed {tol:.0e}"


def normwise_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all tensors together (gradients of every adapter parameter)."""
    assert got.keys() == want.keys()
    diff = torch.cat([(got[k] - want[k]).flatten() for k in want])
    ref = torch.cat([w.flatten() for w in want.values()])
    assert float(ref.norm()) > 0, "reference gradients are all zero"
    return float(diff.norm() / ref.norm())


PATH_TOL = {"nf4": 1e-4, "int8": 1e-3, "fp4-dq-bf16": 1e-2}
"""Normwise tolerance between two paths of one computation (vmap, loop, two passes, coefficient
batch) that differ only in the order of float32 sums (batched against unbatched kernels). nf4 with
float32 compute: that reordering costs a few float32 eps per step, ~1e-6 here, so 1e-4 leaves
margin and a wrong gradient (the bug this guards was 61 %) is far outside. int8: each layer
quantises its input per row to 1/127 of the row's largest value, so a float32 difference upstream
can flip one element by one quantum; that moves an output by ~(1/127)/√(row length · rows) ≈ 1e-4
normwise, and 1e-3 allows several. bf16 compute: a flip there is one bf16 ulp (2^-8 ≈ 3.9e-3) of
the element, and 1e-2 normwise bounds every element flipping at once."""


def _coefficient_batch_losses(model: nn.Module, coeffs: tuple[float, ...], labels: torch.Tensor) -> torch.Tensor:
    """One forward of the tiled batch at funcadapt.per_row(coeffs): each coefficient's loss, computed
    from its rows' logits as LlamaForCausalLM computes its loss (shifted tokens, mean cross-entropy)."""
    with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=IDS.shape[0])):
        out = model(input_ids=funcadapt.tile(IDS, len(coeffs))).logits.float()
    parts = out.chunk(len(coeffs))
    return torch.stack(
        [
            nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), y[:, 1:].reshape(-1))
            for x, y in zip(parts, labels, strict=True)
        ]
    )


@pytest.mark.parametrize(("quant", "adapter"), VMAP_COMBOS)
def test_eval_mode_vmap_loop_two_passes_and_rows_agree(llama_dir, quant, adapter):
    """In eval mode (how contrastive steps usually run: no dropout), vmap over c = [+1, −1], the loop,
    the seed's two AdapterModifier passes and the coefficient batch give the same losses and
    gradients. bitsandbytes picks its kernel per call: on CPUs with AVX512-BF16, a 4-bit layer in
    eval mode whose input does not require grad converts itself to a bfloat16 inference kernel. vmap
    once ran first on float32 kernels, the loop then converted layer 0's q/k/v, and the gradients
    were 61 % apart (../shared/repro/bnb_vmap_randlora.py); now no call with gradients converts a
    layer, so every path runs the kernels the first one ran."""
    model = build(llama_dir, quant, adapter, convert=False)
    assert not model.training and not any(m.training for m in bnb_layers(model).values())
    tree = funcadapt.extract(model)
    params = trainable(tree)
    coeffs = torch.tensor(COEFFS)
    before = snapshot(model)  # also: no path converts a layer (calls with gradients never do)

    def loss_fn(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_call(model, tree, c, labels)

    losses = {"vmap": funcadapt.vmap(loss_fn)(coeffs, LABELS)}
    grads = {"vmap": grads_of(losses["vmap"].sum(), params)}
    losses["loop"] = torch.stack([loss_fn(coeffs[i], LABELS[i]) for i in range(len(COEFFS))])
    grads["loop"] = grads_of(losses["loop"].sum(), params)
    losses["two passes"] = torch.stack([loss_modifier(model, tree, c, LABELS[i]) for i, c in enumerate(COEFFS)])
    grads["two passes"] = grads_of(losses["two passes"].sum(), params)
    losses["coefficient batch"] = _coefficient_batch_losses(model, COEFFS, LABELS)
    grads["coefficient batch"] = grads_of(losses["coefficient batch"].sum(), params)
    assert_model_unchanged(model, before)

    assert not torch.allclose(losses["loop"][0], losses["loop"][1], atol=1e-4)
    tol = PATH_TOL[quant]
    for name in ("vmap", "two passes", "coefficient batch"):
        torch.testing.assert_close(losses[name].detach(), losses["loop"].detach(), rtol=tol, atol=0, msg=name)
        err = normwise_error(grads[name], grads["loop"])
        assert err <= tol, f"{name}: gradients {err:.2e} (normwise) from the loop's, allowed {tol:.0e}"


def test_packed_4bit_kernel_with_an_input_that_requires_grad_is_refused(llama_dir):
    """bitsandbytes' packed CPU inference kernel (what an eval-mode no-grad forward converts a 4-bit
    layer to, on CPUs with AVX512-BF16) has no gradient with respect to its input; bitsandbytes
    only warns, and every gradient before that layer is lost. Under funcadapt that forward is
    refused, naming the layer and the fix. The conversion is simulated by its flag on layer 1's
    q_proj (so the check is tested on every CPU; the real kernel is not run)."""
    model = build(llama_dir, "nf4", "lora", convert=False)
    tree = funcadapt.extract(model)
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.k_proj")
    assert not quantized.packed_for_cpu(layer)
    before = snapshot(model)
    layer.weight.quant_state.packing_format_for_cpu = True
    try:
        pattern = r"layers\.1\.self_attn\.k_proj.*packed CPU inference kernel.*train mode"
        with pytest.raises(RuntimeError, match=pattern):
            loss_call(model, tree, -1.0, LABELS[0])
        with pytest.raises(RuntimeError, match=pattern), AdapterModifier(model, "scale", -1.0):
            model(input_ids=IDS, labels=LABELS[0])
        with pytest.raises(RuntimeError, match=pattern):
            funcadapt.vmap(lambda c: loss_call(model, tree, c, LABELS[0]))(torch.tensor(COEFFS))
        assert not swap.active_frames()
        layer.weight.quant_state.packing_format_for_cpu = False  # so the snapshot's kernel runs
        assert_model_unchanged(model, before)
    finally:
        layer.weight.quant_state.packing_format_for_cpu = False


INT8_OUTLIERS = {"int8-outliers": lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.5)}
"""LLM.int8 with a low outlier threshold, so that this tiny model's activations have outlier columns:
bitsandbytes then computes those columns in fp16 for every row of the call, so one row's output
depends on which other rows share the call."""


@pytest.mark.parametrize("adapter", ["lora", "road_1", "ia3"])
def test_int8_outliers_vmap_and_coefficient_batch_equal_separate_calls(llama_dir, adapter, monkeypatch):
    """With outlier columns, LLM.int8 couples the rows of a call. funcadapt.vmap runs each int8
    kernel once per coefficient and a coefficient batch runs it once per run of rows sharing a
    coefficient, so both equal separate calls, where folding every row into one call was 3e-3
    (normwise) off; the control shows that coupling. Tolerance: the paths differ otherwise only in
    float32 summation order, which can flip one int8 input quantum (see PATH_TOL), ~1e-4 normwise."""
    monkeypatch.setitem(QUANT, "int8-outliers", INT8_OUTLIERS["int8-outliers"])
    model = build(llama_dir, "int8-outliers", adapter)
    tree = funcadapt.extract(model)
    coeffs = (-1.0, 0.0, 2.0)
    tiled = funcadapt.tile(IDS, len(coeffs))
    with torch.no_grad():
        separate = torch.cat([logits(model, funcadapt.transform(tree, c)) for c in coeffs])
        vmapped = funcadapt.vmap(lambda c: logits(model, funcadapt.transform(tree, c)))(torch.tensor(coeffs))
        rows = logits(model, funcadapt.transform(tree, funcadapt.per_row(coeffs, repeat=IDS.shape[0])), ids=tiled)
        with reference_interpolation(model, torch.tensor(coeffs).repeat_interleave(IDS.shape[0]).view(-1, 1, 1)):
            coupled = model(input_ids=tiled).logits  # no funcadapt: every row in one call

    def error(got: torch.Tensor) -> float:
        return float((got - separate).norm() / separate.norm())

    assert error(coupled) > 2e-3, "no outlier coupling: the test would mean nothing"
    assert error(vmapped.flatten(0, 1)) < 5e-4
    assert error(rows) < 5e-4


def _lora_loss_fns(model: nn.Module) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    tree = funcadapt.extract(model)

    def with_funcadapt(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_call(model, tree, c, labels)

    def plain(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # torch.func.functional_call with the same transformed params: no funcadapt patches
        params = dict(funcadapt.transform(tree, c))
        return torch.func.functional_call(model, params, (), {"input_ids": IDS, "labels": labels}).loss

    return with_funcadapt, plain


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_8bit_needs_the_folding(llama_dir, train, monkeypatch):
    """Without funcadapt's folding, bitsandbytes' MatMul8bitLt (an autograd.Function without
    setup_context) refuses torch.func.vmap: plain functional_call fails, and so does
    funcadapt.vmap with the quantized patches switched off. With them it runs."""
    model = build(llama_dir, "int8", "lora", train=train)
    with_funcadapt, plain = _lora_loss_fns(model)
    coeffs = torch.tensor(COEFFS)
    before = snapshot(model)

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(plain, randomness="different")(coeffs, LABELS)
    assert_model_unchanged(model, before)

    with monkeypatch.context() as m:
        m.setattr(quantized, "patches", lambda *args: [])
        with pytest.raises(RuntimeError, match="setup_context"):
            funcadapt.vmap(with_funcadapt)(coeffs, LABELS)
    assert not swap.active_frames()
    assert_model_unchanged(model, before)

    losses = funcadapt.vmap(with_funcadapt)(coeffs, LABELS)
    torch.testing.assert_close(losses, torch.stack([with_funcadapt(coeffs[i], LABELS[i]) for i in range(2)]))
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq-bf16"])
def test_4bit_kernel_runs_on_folded_rows(llama_dir, quant, monkeypatch):
    """4-bit: under funcadapt.vmap the bitsandbytes kernel only ever sees plain tensors, the
    coefficient axis folded into the batch (2 coefficients x batch 2 = 4 rows); without
    funcadapt, vmap hands it BatchedTensors. (On CPU bitsandbytes 0.50.2 that does not raise:
    a BatchedTensor reports requires_grad=False, so bnb takes its gemm_4bit custom op, which
    vmap runs through its slow per-sample fallback; 8-bit raises, see above.)"""
    model = build(llama_dir, quant, "lora", train=True)
    with_funcadapt, plain = _lora_loss_fns(model)
    coeffs = torch.tensor(COEFFS)
    seen: list[tuple[bool, int]] = []
    real = bnb.matmul_4bit

    def spy(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((is_batchedtensor(a), a.shape[0]))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(bnb, "matmul_4bit", spy)
    losses = funcadapt.vmap(with_funcadapt)(coeffs, LABELS)
    losses.sum().backward()
    assert seen and not any(batched for batched, _ in seen), "a BatchedTensor reached the 4-bit kernel"
    # 2 coefficients x batch 2: every block holding an adapted layer gets its input batched (see
    # funcadapt.call._vmapped_one), so every 4-bit kernel sees the folded 4 rows
    assert {rows for _, rows in seen} == {4}, seen

    seen.clear()
    with torch.no_grad():
        torch.func.vmap(plain, randomness="different")(coeffs, LABELS)
    assert any(batched for batched, _ in seen), "expected plain vmap to hand BatchedTensors to bitsandbytes"


# ----------------------------------------------------------------------------
# 3. gradient checkpointing on a quantized model


CKPT = [
    pytest.param("nf4", "lora", "peft", id="nf4-lora"),
    pytest.param("nf4", "lora", "base", id="nf4-lora-base-enabled"),
    pytest.param("nf4", "dora", "peft", id="nf4-dora"),
    pytest.param("nf4", "ia3", "peft", id="nf4-ia3"),
    pytest.param("nf4", "oft", "peft", id="nf4-oft"),
    pytest.param("nf4", "adalora", "peft", id="nf4-adalora"),
    pytest.param("fp4-dq-bf16", "lora", "peft", id="fp4-dq-bf16-lora"),
    pytest.param("fp4-dq-bf16", "oft", "peft", id="fp4-dq-bf16-oft"),
    pytest.param("int8", "lora", "peft", id="int8-lora"),
    pytest.param("int8", "lora", "base", id="int8-lora-base-enabled"),
    pytest.param("int8", "ia3", "peft", id="int8-ia3"),
    pytest.param("int8", "oft", "peft", id="int8-oft"),
    pytest.param("int8", "adalora", "peft", id="int8-adalora"),
]


@pytest.mark.parametrize(("quant", "adapter", "enable"), CKPT)
def test_checkpointed_gradients_equal(llama_dir, quant, adapter, enable):
    """Non-reentrant checkpointing recomputes the quantized decoder layers during backward,
    after call()/the context returned; adapter gradients at c = −1 equal the uncheckpointed ones."""
    model = build(llama_dir, quant, adapter, train=True)
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref = grads_of(loss_call(model, tree, -1.0, LABELS[1]), params)
    assert_grads_close(grads_of(loss_modifier(model, tree, -1.0, LABELS[1]), params), ref, rtol=0, atol=0)

    target = model if enable == "peft" else model.get_base_model()
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert sum(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()) >= 2
    before = snapshot(model)
    for path in (loss_call, loss_modifier):
        with count_mlp_forwards(model) as count:
            got = grads_of(path(model, tree, -1.0, LABELS[1]), params)  # backward after the call/context returned
        assert count[0] == 2, "layer 0 was not recomputed: checkpointing is not active"
        assert_grads_close(got, ref)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_plain_functional_call_is_wrong_under_checkpointing(llama_dir, quant):
    """Why the frames matter on quantized models too: torch.func.functional_call restores the
    adapter before backward, so the recompute sees the untransformed adapter."""
    model = build(llama_dir, quant, "lora", train=True)
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref = grads_of(loss_call(model, tree, -1.0, LABELS[1]), params)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = torch.func.functional_call(
        model, dict(funcadapt.transform(tree, -1.0)), (), {"input_ids": IDS, "labels": LABELS[1]}
    ).loss
    wrong = grads_of(loss, params)
    err = (
        torch.cat([(wrong[k] - ref[k]).flatten() for k in ref]).norm()
        / torch.cat([r.flatten() for r in ref.values()]).norm()
    )
    assert err > 0.1, "plain functional_call was expected to give wrong gradients under checkpointing"
    assert_grads_close(grads_of(loss_call(model, tree, -1.0, LABELS[1]), params), ref)


# ----------------------------------------------------------------------------
# 4. nothing about the quantized model changes, nothing dequantized is left behind


@pytest.mark.parametrize(("quant", "adapter"), VMAP_COMBOS)
def test_quantized_state_untouched(llama_dir, quant, adapter):
    model = build(llama_dir, quant, adapter, train=adapter != "pvera", bnb_train=True)
    tree = funcadapt.extract(model)
    params = trainable(tree)
    before = snapshot(model)
    q_before = bnb_state(model)
    assert q_before, "no bitsandbytes layer found"

    losses = funcadapt.vmap(lambda c, lab: loss_call(model, tree, c, lab))(torch.tensor(COEFFS), LABELS)
    losses.sum().backward()
    assert_model_unchanged(model, before)
    assert_bnb_untouched(model, q_before)

    loss_call(model, tree, torch.tensor(2.0), LABELS[0]).backward()
    loss_modifier(model, tree, -1.0, LABELS[1]).backward()
    with torch.no_grad():
        logits(model, funcadapt.transform(tree, None, "disable"))
        funcadapt.vmap(lambda c: logits(model, funcadapt.transform(tree, c)))(torch.tensor(COEFFS))
    assert any(float(g.abs().max()) > 0 for g in take_grads(params).values()), "no gradient arrived"
    assert_model_unchanged(model, before)
    assert_bnb_untouched(model, q_before)


def test_peft_int8_dora_is_broken_on_cpu(llama_dir):
    """Documents the int8-dora skip: PEFT's own forward fails from the second call on. When
    this test fails, PEFT/bitsandbytes fixed it: remove the skip in _combos."""
    model = get_peft_model(load_base(llama_dir, "int8"), ADAPTERS["dora"]())
    with torch.no_grad():
        model(input_ids=IDS)
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'dtype'"):
            model(input_ids=IDS)


# ----------------------------------------------------------------------------
# 5. quantization backends funcadapt does not handle are refused by name


class QuantLinear(nn.Module):
    """Stands in for a GPTQ / AWQ packed linear: the attributes PEFT reads, int32 packed weights."""

    def __init__(self, like: nn.Linear) -> None:
        super().__init__()
        self.in_features = self.infeatures = like.in_features
        self.out_features = self.outfeatures = like.out_features
        self.register_buffer("qweight", torch.zeros(like.in_features // 8, like.out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, like.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class GPTQQuantLinear(QuantLinear):
    pass


class WQLinear_GEMM(QuantLinear):  # AutoAWQ's class name
    pass


class HQQLinear(QuantLinear):
    pass


class AQLMQuantizedLinear(QuantLinear):
    pass


class EetqLinear(QuantLinear):
    pass


class AffineQuantizedTensor(nn.Parameter):
    """Stands in for a torchao quantized weight (a tensor subclass on a plain nn.Linear)."""


GPTQQuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda_old"
GPTQQuantLinear.__qualname__ = GPTQQuantLinear.__name__ = "QuantLinear"
WQLinear_GEMM.__module__ = "awq.modules.linear.gemm"
AffineQuantizedTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"
HQQLinear.__module__ = "hqq.core.quantize"
AQLMQuantizedLinear.__module__ = "aqlm.inference"
AQLMQuantizedLinear.__qualname__ = AQLMQuantizedLinear.__name__ = "QuantizedLinear"
EetqLinear.__module__ = "eetq.modules.qlinear"

LORA_QV = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN)
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"


def _swap_base_layer(cls: type) -> tuple[nn.Module, str]:
    """PEFT refuses to wrap an unknown module, so wrap the nn.Linear and swap in the quantized base."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LORA_QV)
    layer = model.get_submodule(V1)
    layer.base_layer = cls(layer.base_layer)
    return model, V1


def _gptq_peft_layer() -> tuple[nn.Module, str]:
    """PEFT's own GPTQ LoRA layer class (peft.tuners.lora.gptq) around the stand-in QuantLinear."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LORA_QV)
    attn = model.get_submodule(Q0.rsplit(".", 1)[0])
    attn.q_proj = GPTQLoraLinear(GPTQQuantLinear(attn.q_proj.base_layer), "default", config=LORA_QV, r=4, lora_alpha=8)
    return model, Q0


def _torchao_weight() -> tuple[nn.Module, str]:
    """A torchao-style weight on a plain nn.Linear: PEFT wraps it as an ordinary lora.Linear."""
    torch.manual_seed(0)
    base = tiny_llama()
    v = base.model.layers[1].self_attn.v_proj
    v.weight = AffineQuantizedTensor(v.weight.detach())
    model = get_peft_model(base, LORA_QV)
    assert type(model.get_submodule(V1).get_base_layer().weight) is AffineQuantizedTensor
    return model, V1


UNSUPPORTED = [
    pytest.param(lambda: _swap_base_layer(GPTQQuantLinear), r"GPTQ \(auto-gptq\)", id="gptq-base-layer"),
    pytest.param(_gptq_peft_layer, "GPTQ", id="gptq-peft-layer"),
    pytest.param(lambda: _swap_base_layer(WQLinear_GEMM), r"AWQ \(autoawq\)", id="awq-base-layer"),
    pytest.param(_torchao_weight, "torchao", id="torchao-weight"),
    pytest.param(lambda: _swap_base_layer(HQQLinear), "HQQ", id="hqq-base-layer"),
    pytest.param(lambda: _swap_base_layer(AQLMQuantizedLinear), "AQLM", id="aqlm-base-layer"),
    pytest.param(lambda: _swap_base_layer(EetqLinear), "EETQ", id="eetq-base-layer"),
]


@pytest.mark.parametrize(("make", "backend"), UNSUPPORTED)
def test_unsupported_backend_refused(make, backend):
    model, path = make()
    with torch.no_grad():
        model(input_ids=IDS)  # the stand-ins are real, runnable modules
    before = snapshot(model)
    pattern = rf"layer '{path}' has a {backend} quantized base layer.*does not support"
    with pytest.raises(ValueError, match=pattern) as info:
        funcadapt.extract(model)
    assert "bitsandbytes" in str(info.value), "the error should name what is supported"
    with pytest.raises(ValueError, match=pattern), AdapterModifier(model, "scale", -1.0):
        pytest.fail("the context body must not run")
    assert not swap.active_frames()
    assert_model_unchanged(model, before)


def test_support_table_bitsandbytes_column_is_what_these_tests_run():
    """The generated support table's bitsandbytes column (RuleDoc.quantized) claims exactly the
    rules and variants this file tests."""
    tested = {(p.values[0], RULE.get(p.values[1], p.values[1])) for p in COMBOS}
    claims = {r.name: r.doc.quantized for r in funcadapt.RULES if r.doc.quantized != "not tested"}
    assert set(claims) == {name for _, name in tested}
    for name, text in claims.items():
        assert ("fp4" in text) == ((("fp4-dq-bf16", name)) in tested), name
        assert "8-bit" in text and "nf4" in text, name


def test_trainable_parameter_inside_a_quantized_layer_is_refused_under_vmap(llama_dir):
    """docs/quantized.md: a trainable parameter inside a bitsandbytes layer cannot be differentiated
    through the fold under torch.func transforms; funcadapt raises, naming the fix."""
    model = build(llama_dir, "nf4", "lora")
    layer = next(iter(bnb_layers(model).values()))
    layer.register_parameter("trained", nn.Parameter(torch.zeros(1)))  # e.g. a bias left trainable
    tree = funcadapt.extract(model)

    def loss(c: torch.Tensor) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=IDS).logits.sum()

    with pytest.raises(ValueError, match=r"trainable parameter inside quantized layer.*freeze it"):
        funcadapt.vmap(loss)(torch.tensor([1.0, -1.0]))
    assert not swap.active_frames()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("adapter", INPUT_SIDE)
def test_input_side_adapters_interpolate_on_every_bnb_base(llama_dir, quant, adapter):
    """docs/quantized.md: no bitsandbytes kernel is linear in its input on every CPU, so on a 4-bit or
    8-bit base the adapters acting on the input (feed-forward IA3, OFT) take the output interpolation
    in linear mode, and the others keep their parameter transforms."""
    model = build(llama_dir, quant, adapter)
    tree = funcadapt.extract(model)
    rule = funcadapt.RULES[[r.name for r in funcadapt.RULES].index(RULE.get(adapter, adapter))]
    params = funcadapt.transform(tree, -1.0)
    interpolated = {path for path, _ in params.ops_of(Interpolate)}
    input_side = {s.path for s in tree.layers if rule.acts_on_input(s)}
    assert input_side, "the case must have layers acting on the input"
    assert interpolated == input_side
