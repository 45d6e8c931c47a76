"""Bad inputs: each raises an error that names the problem (and the fix), and leaves the
model exactly as it was."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import VOCAB, assert_unchanged, build, case, inputs, output, snapshot, tiny_llama
from peft import LoHaConfig, LoraConfig, PromptTuningConfig, ShadowConfig, get_peft_model
from torch import nn

import funcadapt
from funcadapt import AdapterModifier, LayerEffect, Transformed, swap
from funcadapt.ops import Interpolate

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = inputs()
Q = "base_model.model.model.layers.0.self_attn.q_proj"
Q_B = f"{Q}.lora_B.default.weight"


def raises_cleanly(
    model: nn.Module, exc: type[BaseException], match: str, fn: Callable[[], Any], *, modifier: tuple | None = None
) -> None:
    """``fn()`` raises ``exc`` matching ``match`` and the model is unchanged; with ``modifier=(op,
    value, kwargs)`` the same error also comes out of ``AdapterModifier.__enter__`` untouched."""
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fn()
    assert not swap.active_frames()
    assert_unchanged(model, before)
    if modifier is not None:
        op, value, kwargs = modifier
        m = AdapterModifier(model, op, value, **kwargs)
        with pytest.raises(exc, match=match), m:
            pytest.fail("the context body must not run")
        assert not swap.active_frames()
        assert_unchanged(model, before)
        assert "inactive" in repr(m)


# ---------------------------------------------------------------- extract


def test_merged_adapter():
    model = build(case("lora"))
    model.merge_adapter()
    raises_cleanly(
        model,
        ValueError,
        rf"layer '{Q}' has adapter 'default' merged.*unmerge_adapter",
        lambda: funcadapt.extract(model),
        modifier=("scale", -1.0, {}),
    )
    model.unmerge_adapter()
    funcadapt.extract(model)  # the fix the message names works


def test_unknown_adapter_name():
    model = build(case("lora"))
    raises_cleanly(
        model,
        ValueError,
        r"'nope'.*\['default'\]",
        lambda: funcadapt.extract(model, "nope"),
        modifier=("scale", -1.0, {"adapter_names": "nope"}),
    )


def test_inactive_adapter_name():
    model = build(case("lora"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    raises_cleanly(
        model,
        ValueError,
        r"'other' is loaded but not active.*set_adapter",
        lambda: funcadapt.extract(model, ["other"]),
        modifier=("scale", -1.0, {"adapter_names": "other"}),
    )


def test_prompt_learning():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    raises_cleanly(
        model,
        ValueError,
        r"PROMPT_TUNING.*prompt-learning",
        lambda: funcadapt.extract(model),
        modifier=("scale", -1.0, {}),
    )


def test_no_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    raises_cleanly(
        model,
        ValueError,
        r"no PEFT adapter layer in LlamaForCausalLM",
        lambda: funcadapt.extract(model),
        modifier=("scale", -1.0, {}),
    )


def test_unsupported_adapter_type(monkeypatch):
    """A PEFT layer class without a rule (here: LoHa with its rule taken out of the registry)."""
    from funcadapt.rules import base

    monkeypatch.setattr(base, "RULES", [r for r in base.RULES if r.name != "loha"])
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    raises_cleanly(
        model,
        ValueError,
        rf"layer '{Q}' is a peft\.tuners\.loha\.layer\.Linear.*no rule.*Exclude it with adapter_names",
        lambda: funcadapt.extract(model),
        modifier=("scale", -1.0, {}),
    )


# ---------------------------------------------------------------- transform


@pytest.mark.parametrize(
    ("case_id", "match"),
    [
        ("dora", rf"layer '{Q}' adapter 'default'.*mode='geometric'.*DoRA.*Use mode='linear'"),
        ("road_2", rf"layer '{Q}'.*road_2.*geometric.*mode='linear'"),
    ],
)
def test_geometric_refused(case_id, match):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    raises_cleanly(
        model,
        ValueError,
        match,
        lambda: funcadapt.transform(tree, 0.5, mode="geometric"),
        modifier=("scale", 0.5, {"mode": "geometric"}),
    )


def test_invert_refused_on_dora():
    model = build(case("dora"))
    tree = funcadapt.extract(model)
    raises_cleanly(
        model,
        ValueError,
        r"op='invert' is undefined.*coeff=-1",
        lambda: funcadapt.transform(tree, op="invert"),
        modifier=("invert", None, {}),
    )


def test_unknown_op_and_mode():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    raises_cleanly(model, ValueError, r"unknown op 'flip'", lambda: funcadapt.transform(tree, 1.0, "flip"))
    raises_cleanly(model, ValueError, r"unknown mode 'log'", lambda: funcadapt.transform(tree, 1.0, mode="log"))
    # the modifier refuses them at construction, before any `with`
    raises_cleanly(model, ValueError, r"unknown op 'flip'", lambda: AdapterModifier(model, "flip", 1.0))
    raises_cleanly(model, ValueError, r"unknown mode 'log'", lambda: AdapterModifier(model, "scale", 1.0, mode="log"))


def test_coefficient_wrong_shape():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    c = torch.tensor([1.0, -1.0, 0.5])
    raises_cleanly(
        model,
        ValueError,
        r"0-d tensor.*shape \(3,\).*vmap",
        lambda: funcadapt.transform(tree, c),
        modifier=("scale", c, {}),
    )


def test_coefficient_wrong_type():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    raises_cleanly(
        model,
        TypeError,
        r"number or a 0-d tensor, got str",
        lambda: funcadapt.transform(tree, "1"),
        modifier=("scale", "1", {}),
    )


def test_coefficient_dict_unknown_adapter():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    coeff = {"default": 1.0, "nope": -1.0}
    raises_cleanly(
        model,
        ValueError,
        r"unknown adapter\(s\) \['nope'\].*\['default'\]",
        lambda: funcadapt.transform(tree, coeff),
        modifier=("scale", coeff, {}),
    )


def test_scale_without_coefficient():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    raises_cleanly(
        model,
        ValueError,
        r"op='scale' needs a coefficient",
        lambda: funcadapt.transform(tree),
        modifier=("scale", None, {}),
    )


def test_coefficient_given_to_invert():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    raises_cleanly(
        model,
        ValueError,
        r"op='invert' takes no coefficient",
        lambda: funcadapt.transform(tree, -1.0, "invert"),
        modifier=("invert", -1.0, {}),
    )


def test_replace_wrong_shape():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    value = {Q_B: torch.zeros(3, 3)}
    shape = tuple(tree.params[Q_B].shape)
    raises_cleanly(
        model,
        ValueError,
        rf"replace: '{Q_B}' has shape \({shape[0]}, {shape[1]}\); the tensor given, of shape \(3, 3\), must have",
        lambda: funcadapt.transform(tree, value, "replace"),
        modifier=("replace", value, {}),
    )


def test_replace_unknown_key():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    value = {"lm_head.weight": torch.zeros(VOCAB, 32)}
    raises_cleanly(
        model,
        ValueError,
        r"unknown parameter key\(s\) \['lm_head.weight'\]",
        lambda: funcadapt.transform(tree, value, "replace"),
        modifier=("replace", value, {}),
    )


# ---------------------------------------------------------------- call


def test_call_misspelled_key_suggests():
    model = build(case("lora"))
    bad = Q_B.replace("weight", "weigth")
    params = {bad: torch.zeros(funcadapt.extract(model).params[Q_B].shape)}
    raises_cleanly(
        model,
        ValueError,
        rf"'{bad}', which is not a parameter.*did you mean '{Q_B}'",
        lambda: funcadapt.call(model, params, **BATCH),
    )


def test_call_wrong_shape():
    model = build(case("lora"))
    shape = tuple(funcadapt.extract(model).params[Q_B].shape)
    raises_cleanly(
        model,
        ValueError,
        rf"params\['{Q_B}'\] has shape \(4, 4\), the model's has \({shape[0]}, {shape[1]}\)",
        lambda: funcadapt.call(model, {Q_B: torch.zeros(4, 4)}, **BATCH),
    )


def test_call_non_tensor_value():
    model = build(case("lora"))
    raises_cleanly(
        model,
        TypeError,
        rf"params\['{Q_B}'\] is a float, not a tensor",
        lambda: funcadapt.call(model, {Q_B: 1.0}, **BATCH),
    )


def test_call_effect_for_non_adapter_layer():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    stray = dataclasses.replace(tree.layers[0], path="base_model.model.lm_head")
    params = Transformed(tree, (LayerEffect(stray, ops=(Interpolate(-1.0),)),))
    raises_cleanly(
        model,
        ValueError,
        r"'base_model.model.lm_head', which is not an adapter layer",
        lambda: funcadapt.call(model, params, **BATCH),
    )


@pytest.mark.parametrize("c", [-1.0, torch.tensor(-1.0)], ids=["float", "tensor"])
def test_forward_effects_not_silently_dropped_by_functional_call(c):
    """A Transformed is not a dict, so plain torch.func.functional_call refuses it loudly
    instead of silently running the unmodified DoRA adapter (its effect is forward-time only)."""
    model = build(case("dora"))
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, c)
    assert params.ops_of(Interpolate)
    raises_cleanly(model, ValueError, r"to be a dict", lambda: torch.func.functional_call(model, params, (), BATCH))
    # funcadapt.call is the way to run them
    with torch.no_grad():
        y = output(funcadapt.call(model, params, **BATCH))
        assert not torch.allclose(y, output(model(**BATCH)), atol=1e-4)


def test_fallback_adapters_with_different_coefficients():
    model = build(case("dora"))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    coeff = {"default": -1.0, "other": 0.5}
    raises_cleanly(
        model,
        ValueError,
        r"different coefficients",
        lambda: funcadapt.call(model, funcadapt.transform(tree, coeff), **BATCH),
        modifier=("scale", coeff, {}),
    )


# ---------------------------------------------------------------- errors during the forward


class _Boom(Exception):
    pass


def _raise_in_layer1(model: Any) -> Any:
    """A forward hook that fails in the second decoder layer, after layer 0's adapters ran."""

    def hook(*args: Any) -> None:
        raise _Boom("layer 1")

    return model.get_base_model().model.layers[1].self_attn.register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "case_id", ["lora", "dora", "oft", "randlora", "adalora", "trainable-tokens", "lora-embedding"]
)
def test_error_mid_call_leaves_model_unchanged(case_id):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, -1.0)
    bad = {"input_ids": BATCH["input_ids"].clone()}
    bad["input_ids"][0, 3] = VOCAB + 5  # the embedding lookup fails (inside the patched forward for embeddings)
    before = snapshot(model)

    def in_modifier(**batch: Any) -> Any:
        with AdapterModifier(model, "scale", -1.0):
            return model(**batch)

    for run in (lambda **b: funcadapt.call(model, params, **b), in_modifier):
        with pytest.raises(IndexError):
            run(**bad)
        assert not swap.active_frames()
        assert_unchanged(model, before)
        handle = _raise_in_layer1(model)
        try:
            with pytest.raises(_Boom):
                run(**BATCH)
        finally:
            handle.remove()
        assert not swap.active_frames()
        assert_unchanged(model, before)

    # and the model still works, both ways
    with torch.no_grad():
        ref = output(funcadapt.call(model, params, **BATCH))
        got = output(in_modifier(**BATCH))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert_unchanged(model, before)


def test_modifier_instance_is_not_reentrant():
    model = build(case("lora"))
    before = snapshot(model)
    m = AdapterModifier(model, "scale", -1.0)
    with m:
        with pytest.raises(RuntimeError, match="already active"):
            m.__enter__()
        assert len(swap.active_frames()) == 1
    assert not swap.active_frames()
    assert_unchanged(model, before)
    with m:  # usable again once exited
        pass
    assert_unchanged(model, before)


# Rules that recognise a layer type only to refuse it: how to build a model with one.
REFUSED_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "shadow": lambda: get_peft_model(tiny_llama(), ShadowConfig(r=4, shadow_dropout=0.0)),
}


@pytest.mark.parametrize("rule", [r for r in funcadapt.RULES if r.unsupported], ids=lambda r: r.name)
def test_refusing_rules(rule):
    """Every refusing rule refuses with its own explanation (not the generic 'no rule'), from
    extract and AdapterModifier alike, and the model is unchanged. A refusing rule without a
    builder here fails, so none ships untested."""
    torch.manual_seed(0)
    model = REFUSED_BUILDERS[rule.name]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(rule.unsupported[:60])):
        funcadapt.extract(model)
    with pytest.raises(ValueError, match=re.escape(rule.unsupported[:60])), AdapterModifier(model, "scale", 2.0):
        pass
    assert_unchanged(model, before)


def test_misuse_messages_name_the_problem_and_the_fix():
    """The smaller user errors: each is a clear exception, and the model is unchanged."""
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        funcadapt.extract(model)
    with pytest.raises(TypeError, match="replace' takes a dict"):
        funcadapt.transform(tree, 1.0, op="replace")
    for op in ("shift", "replace"):
        with pytest.raises(ValueError, match="needs a value"):
            funcadapt.transform(tree, op=op)
    with pytest.raises(ValueError, match="params do not match the tree"):
        tree.with_params({})
    with pytest.raises(TypeError, match="batch must be a dict"):
        funcadapt.sweep(model, lambda out: out.logits.mean(), [0.0], inputs()["input_ids"])
    with pytest.raises(ValueError, match="batched tensor"):
        funcadapt.sweep(model, lambda out: out.logits.mean(), [0.0], {"input_ids": torch.tensor(3)}, method="rows")
    with pytest.raises(ValueError, match="positive int"):
        funcadapt.tile(inputs(), 0)
    assert_unchanged(model, before)


def test_transformed_with_forward_effects_is_not_a_plain_dict():
    """dict(params) of a Transformed whose effect acts at forward time would drop it (a call on the dict
    runs c = 1 at those layers): refused, naming the effects; single tensors can still be read."""
    model = build(case("dora"))
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, -1.0)
    with pytest.raises(TypeError, match=r"forward-time effects \(Interpolate at \d+ layers\).*funcadapt.call"):
        dict(params)
    assert all(params[k] is v for k, v in tree.params.items())
    lora = funcadapt.extract(build(case("lora")))
    assert dict(funcadapt.transform(lora, -1.0)).keys() == lora.params.keys()  # no forward-time effect: fine
