"""The per-model structure cache: it follows the model through structural changes, never keeps
a model alive, and params computed for an adapter that is no longer in effect are refused."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from cases import TOL64, assert_unchanged, build, case, inputs, output, reference_interpolation, snapshot
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from transformers import LlamaConfig, LlamaModel

import funcadapt
from funcadapt import structure

pytestmark = pytest.mark.filterwarnings("ignore")


def injected_llama_model():
    base = LlamaModel(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), base)


@pytest.mark.parametrize("root", ["model", "layer"])
def test_cache_does_not_keep_models_alive(root):
    """The cache drops a root's entry when the root is collected; a root that is itself cached (an adapter layer, a
    transformers base model with a gradient_checkpointing attribute) must not keep itself alive."""
    model = injected_llama_model()
    target = model if root == "model" else model.layers[0].self_attn.q_proj
    funcadapt.extract(target)
    x = torch.randint(0, 64, (1, 3)) if root == "model" else torch.randn(1, 3, 32)
    with torch.no_grad():
        funcadapt.call(target, funcadapt.transform(funcadapt.extract(target), -1.0), x)
    assert id(target) in structure._CACHE
    key = id(target)
    ref = weakref.ref(target)
    del model, target
    gc.collect()
    assert ref() is None
    assert key not in structure._CACHE


def test_cache_follows_structural_changes():
    model = build(case("lora"))
    first = funcadapt.extract(model)
    assert funcadapt.extract(model).layers == first.layers
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    assert {s.adapter for s in funcadapt.extract(model).layers} == {"default", "other"}
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert {s.adapter for s in funcadapt.extract(model).layers} == {"default"}
    # replaced Parameters (load_state_dict(assign=True)): the tree holds the live ones
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    tree = funcadapt.extract(model)
    live = dict(model.named_parameters())
    assert all(tree.params[k] is live[k] for k in tree.params)
    # a replaced submodule
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"] = torch.nn.Linear(4, 32, bias=False)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert funcadapt.extract(model).params[key] is layer.lora_B["default"].weight


def test_params_from_before_merge_are_refused():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    model.merge_adapter()
    before = snapshot(model)
    for coeff in (0.0, funcadapt.per_row([0.0, 1.0])):
        with pytest.raises(ValueError, match=r"merged.*unmerge_adapter"):
            funcadapt.call(model, funcadapt.transform(tree, coeff), **inputs(batch=2))
    assert_unchanged(model, before)
    # the model's own tensors (c = 1, the identity) change nothing and are fine
    with torch.no_grad():
        funcadapt.call(model, funcadapt.transform(tree, 1.0), **inputs(batch=2))


def test_params_for_an_adapter_no_longer_active_are_refused():
    model = build(case("dora"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    tree = funcadapt.extract(model)  # "default" only
    model.set_adapter("other")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not in effect"):
        funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs())
    with model.disable_adapter(), pytest.raises(ValueError, match="not in effect"):
        funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs())
    assert_unchanged(model, before)


def test_mixed_adapter_batch_is_refused_where_it_would_be_wrong():
    """PEFT's adapter_names routing ignores the switch the output interpolation uses for y0;
    refused with a pointer to per_row (parameter-space rules are unaffected)."""
    model = build(case("dora"))
    names = ["default", "__base__"]
    with pytest.raises(ValueError, match=r"adapter_names.*per_row"):
        funcadapt.call(
            model, funcadapt.transform(funcadapt.extract(model), 0.5), **inputs(batch=2), adapter_names=names
        )
    # a parameter-space rule composes with PEFT's routing: row 0 (adapter) at c, row 1 (base) unchanged
    lora = build(case("lora"), dtype=torch.float64)  # the rows equal the separate runs up to float64 rounding
    tree = funcadapt.extract(lora)
    with torch.no_grad():
        got = output(funcadapt.call(lora, funcadapt.transform(tree, 0.5), **inputs(batch=2), adapter_names=names))
        at_half = output(funcadapt.call(lora, funcadapt.transform(tree, 0.5), **inputs(batch=2)))
        with lora.disable_adapter():
            base = output(lora(**inputs(batch=2)))
    assert not torch.allclose(at_half[0], base[0], atol=1e-4)
    torch.testing.assert_close(got[0], at_half[0], **TOL64)
    torch.testing.assert_close(got[1], base[1], **TOL64)


def test_peft_scaling_is_read_live():
    """A tree extracted before PEFT's float scaling changed (set_scale) still means the current
    adapter: the transform acts on tensors, the scaling is read by PEFT's forward."""
    model = build(case("lora"), dtype=torch.float64)
    tree = funcadapt.extract(model)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.scaling["default"] *= 3
    with torch.no_grad():
        got = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs()))
        with reference_interpolation(model, -1.0):
            want = output(model(**inputs()))
    torch.testing.assert_close(got, want, **TOL64)


def test_call_that_changes_nothing_builds_no_frame(monkeypatch):
    """``call`` at c = 1 with the model's own tree runs the plain forward (no frame built); a tree from
    another model, or a coefficient that changes something, still goes through a frame (which refuses
    the first and applies the second)."""
    import sys

    call_module = sys.modules["funcadapt.call"]
    built: list[int] = []
    real = call_module.frame
    monkeypatch.setattr(call_module, "frame", lambda *a, **k: built.append(1) or real(*a, **k))
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    x = inputs()
    with torch.no_grad():
        plain = output(model(**x))
        got = output(funcadapt.call(model, funcadapt.transform(tree, 1.0), **x))
    assert not built
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    with torch.no_grad():
        funcadapt.call(model, funcadapt.transform(tree, 0.5), **x)
    assert built == [1]
    other = build(case("lora"))
    with pytest.raises(ValueError, match="extracted from another model"):
        funcadapt.call(other, funcadapt.transform(tree, 1.0), **x)
    assert built == [1, 1]
