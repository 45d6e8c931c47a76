"""Prompt learning and adaption prompt.

Prompt tuning, prefix tuning, P-tuning, multitask prompt tuning, CPT and cartridges act
through virtual tokens (input embeddings or a key/value cache), not through a layer's
weights, so there is no per-layer effect y1 − y0 for a coefficient to scale (PEFT reports
``is_prompt_learning`` for all of them). Each is refused with a message that says why and
what to use instead, before anything touches the model, and the model is unchanged and
still runs.

Adaption prompt (LLaMA-Adapter) is the exception in PEFT's taxonomy: ``is_prompt_learning``
is False and its ``AdaptedAttention`` wrappers carry the effect inside the attention blocks,
``attn(x) + o_proj(gate · softmax(q·kᵀ_prompt) · v_prompt)``. funcadapt supports it
(funcadapt/rules/adaption_prompt.py): gate ↦ c·gate where that is exact (bias-free o_proj,
GPT-2), the block's output interpolation where o_proj has a bias. The generic tests run its
cases (tests/cases_prompt.py); the tests here check what they cannot: the exact parameter
meaning against PEFT models with a scaled gate, PEFT's biased-o_proj bug, adapter switching,
generation with a KV cache, and the messages. Equalities that are not bit for bit are checked in float64,
up to its rounding, or float32's where PEFT takes the prompt's softmax in float32 (cases.tolerance).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import TOL64, VOCAB, assert_unchanged, build, case, float64, inputs, output, snapshot, tiny_llama, tolerance
from cases_prompt import biased_o_proj
from peft import (
    AdaptionPromptConfig,
    CartridgeConfig,
    CPTConfig,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

import funcadapt
from funcadapt import AdapterModifier, swap
from funcadapt.ops import Interpolate

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT_LEARNING: dict[str, Callable[[], Any]] = {
    "PROMPT_TUNING": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "PREFIX_TUNING": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "P_TUNING": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "MULTITASK_PROMPT_TUNING": lambda: MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2
    ),
    "CPT": lambda: CPTConfig(
        task_type="CAUSAL_LM", cpt_token_ids=[1, 2, 3, 4], cpt_mask=[1, 1, 1, 1], cpt_tokens_type_mask=[1, 2, 2, 3]
    ),
    "CARTRIDGE": lambda: CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def _extra(name: str) -> dict[str, Any]:
    return {"task_ids": torch.tensor([0, 1])} if name == "MULTITASK_PROMPT_TUNING" else {}


def _build(config: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    return float64(model).eval()


def _attempts(model: torch.nn.Module, adapter_names: Any) -> list[Callable[[], Any]]:
    def modifier() -> None:
        with AdapterModifier(model, "scale", 0.5, adapter_names=adapter_names):
            pass

    return [lambda: funcadapt.extract(model, adapter_names), modifier]


@pytest.mark.parametrize("name", PROMPT_LEARNING, ids=str)
@pytest.mark.parametrize("adapter_names", [None, "default"], ids=["active", "named"])
def test_prompt_learning_refused_model_unchanged(name, adapter_names):
    model = _build(PROMPT_LEARNING[name]())
    config = model.peft_config["default"]
    assert config.is_prompt_learning, f"PEFT no longer reports {name} as prompt learning"
    assert config.peft_type.value == name
    batch = {**inputs(), **_extra(name)}
    with torch.no_grad():
        before_out = model(**batch).logits
    before = snapshot(model)
    for attempt in _attempts(model, adapter_names):
        with pytest.raises(ValueError) as info:
            attempt()
        message = str(info.value)
        # names the adapter and its method, says why (virtual tokens, no per-layer effect) and what to do
        assert f"'default' is {name}" in message
        assert "prompt-learning" in message and "virtual tokens" in message
        assert "no per-layer coefficient" in message
        assert "LoRA" in message  # what to use instead
        assert not swap.active_frames()
        assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before_out), "the model must still run exactly as before"


def _adaption_prompt(config: Any = None) -> torch.nn.Module:
    model = _build(config or AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2))
    with torch.no_grad():  # the gate starts at zero: make the adapter act
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                p.fill_(0.5)
    return model


def _gates(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("adaption_gate")]


def _scaled_gate_reference(model: torch.nn.Module, c: float, batch: dict) -> torch.Tensor:
    """PEFT alone: a copy of the model whose gates are multiplied by c."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for gate in _gates(ref):
            gate.mul_(c)
        return output(ref(**batch))


def _run(model: torch.nn.Module, params: Any, **batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return output(funcadapt.call(model, params, **batch))


@pytest.mark.parametrize("case_arch", [("adaption-prompt", "llama"), ("adaption-prompt", "gpt2")], ids=str)
def test_adaption_prompt_is_gate_scaling(case_arch):
    """Bias-free o_proj (Llama) and no output projection (GPT-2): every mode and op is exactly a PEFT
    model whose gates are multiplied by c (c = −1 for invert), and extraction finds both tensors."""
    case_id, arch = case_arch
    model = build(case(case_id), arch, dtype=torch.float64)
    batch = inputs(arch)
    tree = funcadapt.extract(model)
    assert tree.adapters == ("default",) and len(tree.layers) == 2
    assert {role for s in tree.layers for role in s.keys} == {"adaption_prompt", "adaption_gate"}
    named = dict(model.named_parameters())
    assert all(tree.params[k] is named[k] for k in tree.params), "the tree holds the model's own Parameters"
    assert not any(s.static["o_proj_bias"] for s in tree.layers)
    before = snapshot(model)
    for c in (-1.0, 0.5, 2.0):
        want = _scaled_gate_reference(model, c, batch)
        params = funcadapt.transform(tree, torch.tensor(c, dtype=torch.float64))
        assert not any(e.ops for e in params.effects), "gate scaling is exact: no fallback"
        tol = tolerance(want, case(case_id))  # PEFT takes the prompt's softmax in float32
        torch.testing.assert_close(_run(model, params, **batch), want, **tol)
        geometric = funcadapt.transform(tree, c, mode="geometric")
        torch.testing.assert_close(_run(model, geometric, **batch), want, **tol)
    want = _scaled_gate_reference(model, -1.0, batch)
    torch.testing.assert_close(
        _run(model, funcadapt.transform(tree, None, "invert"), **batch), want, **tolerance(want, case(case_id))
    )
    assert_unchanged(model, before)


def test_adaption_prompt_biased_o_proj_peft_gate_zero_is_not_base():
    """PEFT bug (peft 0.21.2), plain PEFT: with a biased o_proj, AdaptedAttention adds
    o_proj(gate · …), whose bias survives gate 0, so the zero-initialised adapter is not the base
    model (the bias is added twice). funcadapt's c = 0 is the base model all the same (the
    block's output is interpolated against the wrapped attention), and c = 1 is PEFT."""
    model = _adaption_prompt_biased()
    batch = inputs()
    with torch.no_grad():
        y1 = output(model(**batch))
        with model.disable_adapter():
            y0 = output(model(**batch))
    gate_zero = _scaled_gate_reference(model, 0.0, batch)
    assert not torch.allclose(gate_zero, y0, atol=1e-3), "PEFT's gate 0 equals the base model: bug fixed?"
    tree = funcadapt.extract(model)
    assert all(s.static["o_proj_bias"] for s in tree.layers)
    params = funcadapt.transform(tree, 0.5)
    assert params.ops_of(Interpolate), "a biased o_proj takes the output interpolation"
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
    assert torch.equal(_run(model, funcadapt.transform(tree, 0.0), **batch), y0)
    assert torch.equal(_run(model, funcadapt.transform(tree, None, "disable"), **batch), y0)
    # the interpolation is not gate scaling there: c = 0.5 differs from PEFT with half the gate
    half = _run(model, params, **batch)
    assert not torch.allclose(half, _scaled_gate_reference(model, 0.5, batch), atol=1e-3)
    # invert and geometric are the output interpolation at −1 and c
    with torch.no_grad():
        assert torch.equal(
            _run(model, funcadapt.transform(tree, None, "invert"), **batch),
            _run(model, funcadapt.transform(tree, -1.0), **batch),
        )
        assert torch.equal(_run(model, funcadapt.transform(tree, 0.5, mode="geometric"), **batch), half)
    assert_unchanged(model, before)


def _adaption_prompt_biased() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(
        biased_o_proj(tiny_llama()), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)
    )
    with torch.no_grad():
        for gate in _gates(model):
            gate.fill_(0.5)
    model.eval()
    return model


def test_adaption_prompt_switching_adapters():
    """PEFT keeps only the active adapter's wrappers in the model: extraction follows set_adapter, an
    inactive adapter is named as such, and disable_adapter() leaves nothing to extract."""
    model = _adaption_prompt()
    model.add_adapter("other", AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1))
    batch = inputs()
    assert funcadapt.extract(model).adapters == ("default",)
    with pytest.raises(ValueError, match=r"'other' is loaded but its layers are not in the model.*set_adapter"):
        funcadapt.extract(model, "other")
    with (
        model.disable_adapter(),
        pytest.raises(ValueError, match=r"none of their layers is in it now.*disable_adapter"),
    ):
        funcadapt.extract(model)
    model.set_adapter("other")
    with torch.no_grad():
        for gate in _gates(model):
            gate.fill_(-0.7)
    tree = funcadapt.extract(model)
    assert tree.adapters == ("other",) and len(tree.layers) == 1
    want = _scaled_gate_reference(model, 2.0, batch)
    torch.testing.assert_close(
        _run(model, funcadapt.transform(tree, 2.0), **batch), want, **tolerance(want, case("adaption-prompt"))
    )
    with torch.no_grad():
        with model.disable_adapter():
            y0 = output(model(**batch))
        assert torch.equal(_run(model, funcadapt.transform(tree, 0.0), **batch), y0)
    model.set_adapter("default")
    assert funcadapt.extract(model).adapters == ("default",)


def test_adaption_prompt_outside_its_model_is_refused():
    """The adapter's name lives on the AdaptionPromptModel; the bare transformers model inside has none."""
    model = _adaption_prompt()
    inner = model.base_model.model
    with pytest.raises(ValueError, match=r"outside the AdaptionPromptModel.*PeftModel"):
        funcadapt.extract(inner)
    assert funcadapt.extract(model.base_model).adapters == ("default",)


@pytest.mark.parametrize("case_id", ["adaption-prompt", "adaption-prompt-o-bias"])
def test_adaption_prompt_generate_rows_equal_separate(case_id):
    """Greedy generation with a KV cache at three coefficients in one tiled batch equals three
    separate generations: the wrapped attention (which appends to the cache) runs once per step
    even where the block's output is interpolated."""
    model = build(case(case_id))
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    coeffs = [-1.0, 0.0, 1.5]
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():  # PEFT's first generate() leaves base_model.prepare_inputs_for_generation set
        model.generate(input_ids=prompt, **kwargs)
    before = snapshot(model)
    with torch.no_grad():
        with AdapterModifier(model, "scale", funcadapt.per_row(torch.tensor(coeffs), repeat=2)):
            tiled = model.generate(input_ids=funcadapt.tile(prompt, 3), **kwargs)
        separate = []
        for c in coeffs:
            with AdapterModifier(model, "scale", c):
                separate.append(model.generate(input_ids=prompt, **kwargs))
        with model.disable_adapter():
            base = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(tiled, torch.cat(separate))
    assert torch.equal(separate[1], base)
    assert not torch.equal(separate[0], separate[2]), "the coefficients must change the generated text"
    assert_unchanged(model, before)


def test_adaption_prompt_is_linear_in_gate():
    """The exact meaning a future rule would give adaption prompt: with a bias-free o_proj (Llama),
    the adapted attention output is linear in the gate, so gate ↦ c·gate is y0 + c·(y1 − y0)
    for the attention block. Checked with PEFT's own modules (no funcadapt)."""
    model = _adaption_prompt()
    attn = model.base_model.model.model.layers[-1].self_attn
    assert type(attn).__name__ == "AdaptedAttention"
    assert attn.model.o_proj.bias is None
    captured: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        captured.setdefault("kwargs", kwargs)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs(), use_cache=False)  # no cache: the captured call can be replayed
    handle.remove()
    kwargs = captured["kwargs"]
    gate = attn.adaption_gate
    g1 = gate.detach().clone()

    def out(g: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            gate.copy_(g)
            try:
                return attn(**kwargs)[0]
            finally:
                gate.copy_(g1)

    y0, y1 = out(torch.zeros_like(g1)), out(g1)
    with torch.no_grad():
        base = attn.model(**kwargs)[0]
    torch.testing.assert_close(y0, base, **TOL64)  # gate 0 is the unadapted attention
    assert not torch.allclose(y0, y1, atol=1e-4)
    for c in (-1.0, 0.5, 2.0):
        torch.testing.assert_close(out(c * g1), y0 + c * (y1 - y0), **TOL64)
