"""Edge cases found in review: each test would fail on the defect it names. Equalities that are not bit for
bit are checked in float64, up to its rounding (cases.TOL64)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    TOL64,
    assert_unchanged,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    snapshot,
    tiny_llama,
)
from peft import IA3Config, LoHaConfig, LoKrConfig, get_peft_model

import funcadapt

pytestmark = pytest.mark.filterwarnings("ignore")
F64 = torch.float64


def test_coft_geometric_scales_the_projected_generator():
    """COFT projects Q first; geometric c must give Cayley(c·P(Q)), not Cayley(P(c·Q)) (which saturates)."""
    model = build(case("oft-coft"), dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs()
    one, two = torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    with torch.no_grad():
        y1 = output(funcadapt.call(model, funcadapt.transform(tree, one, mode="geometric"), **batch))
        y2 = output(funcadapt.call(model, funcadapt.transform(tree, two, mode="geometric"), **batch))
        # reference: PEFT on a copy whose stored weight is 2·P(Q) with the projection switched off
        ref_model = copy.deepcopy(model)
        for layer in ref_model.modules():
            if hasattr(layer, "oft_R"):
                for rot in layer.oft_R.values():
                    rot.weight.copy_(2 * rot._project_batch(rot.weight, eps=rot.eps))
                    rot.coft = False
        ref = output(ref_model(**batch))
    assert not torch.allclose(y1, y2, atol=1e-4)
    torch.testing.assert_close(y2, ref, **TOL64)


def test_one_coefficient_object_for_several_adapters_is_one_coefficient():
    """{a: t, b: t} with the same (int) tensor means one shared coefficient: stacked IA3 stays layer-linear."""
    torch.manual_seed(0)
    cfg = IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    model = get_peft_model(tiny_llama(), cfg)
    model.add_adapter("other", IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model)
    model = float64(model).eval()
    tree = funcadapt.extract(model)
    t = torch.tensor(2)
    with torch.no_grad():
        shared = output(funcadapt.call(model, funcadapt.transform(tree, 2.0), **inputs()))
        same_object = output(funcadapt.call(model, funcadapt.transform(tree, {"default": t, "other": t}), **inputs()))
        equal_values = output(
            funcadapt.call(
                model, funcadapt.transform(tree, {"default": torch.tensor(2.0), "other": torch.tensor(2.0)}), **inputs()
            )
        )
    torch.testing.assert_close(same_object, shared, **TOL64)
    torch.testing.assert_close(equal_values, shared, **TOL64)


def test_call_ties_shared_parameters_like_functional_call():
    model = build(case("lora"), "gpt2")  # GPT-2 ties lm_head to wte
    key = "base_model.model.transformer.wte.weight"
    zeros = torch.zeros_like(dict(model.named_parameters())[key])
    with torch.no_grad():
        want = torch.func.functional_call(model, {key: zeros}, kwargs=inputs("gpt2")).logits
        got = funcadapt.call(model, {key: zeros}, **inputs("gpt2")).logits
    assert want.abs().max() == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # logits through an all-zero tied head: exactly 0


def test_instance_forward_hooks_on_quantized_layers_still_run():
    """An instance-level forward (accelerate's hooks, e.g. offloading) on a bitsandbytes layer is wrapped,
    not bypassed."""
    pytest.importorskip("bitsandbytes")
    import tempfile

    from accelerate.hooks import ModelHook, add_hook_to_module
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(config).save_pretrained(d)
        base = LlamaForCausalLM.from_pretrained(
            d, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
        )
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).eval()
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    add_hook_to_module(model.base_model.model.model.layers[0].mlp.down_proj, Counting())
    tree = funcadapt.extract(model)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)
        assert len(calls) == 1
        funcadapt.call(model, funcadapt.transform(tree, -1.0), input_ids=ids)
        assert len(calls) == 2
        funcadapt.vmap(lambda c: funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids).logits)(
            torch.tensor([1.0, -1.0])
        )
        # on the CPU in eval mode the vmapped call runs the 4-bit kernel once per coefficient, as a loop
        # does (funcadapt.quantized.one_call_per_member), each through the instance's hooks
        assert len(calls) == 4


def test_reentrant_checkpointing_is_fine_without_grad():
    model = build(case("lora"), dtype=F64)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tree = funcadapt.extract(model)
    with torch.no_grad():
        got = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs()))
    model.gradient_checkpointing_disable()
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs()))
    torch.testing.assert_close(got, want, **TOL64)


def test_hooks_registered_inside_a_context_survive_it():
    model = build(case("lora"))
    model.enable_input_require_grads()
    emb = model.get_input_embeddings()
    seen = []
    with funcadapt.AdapterModifier(model, "scale", -1.0):
        handle = emb.register_forward_hook(lambda *a: seen.append(1))
    model(**inputs())
    assert seen == [1]
    with funcadapt.AdapterModifier(model, "scale", -1.0):
        handle.remove()
    model(**inputs())
    assert seen == [1]


@pytest.mark.parametrize("config", [LoHaConfig, LoKrConfig], ids=["loha", "lokr"])
def test_lycoris_c1_is_bitwise_peft_in_training_with_dropouts(config):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), config(r=4, alpha=8, target_modules=["q_proj"], module_dropout=0.5, rank_dropout=0.3)
    )
    randomize_adapters(model)
    model.train()
    before = snapshot(model)
    tree = funcadapt.extract(model)
    torch.manual_seed(7)
    want = model(**inputs()).logits
    torch.manual_seed(7)
    got = funcadapt.call(model, funcadapt.transform(tree, 1.0), **inputs()).logits
    assert torch.equal(got, want)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["dora", "oft"])
def test_bf16_fallback_keeps_a_tensor_coefficient_in_float32(case_id):
    model = build(case(case_id), dtype=torch.bfloat16)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        as_number = output(funcadapt.call(model, funcadapt.transform(tree, 0.3), **inputs()))
        as_tensor = output(funcadapt.call(model, funcadapt.transform(tree, torch.tensor(0.3)), **inputs()))
    torch.testing.assert_close(as_tensor, as_number, rtol=0, atol=0)


def test_bf16_transforms_round_once():
    """docs/support.md: transforms compute in float32 and cast back once (bf16 adapters get one rounding)."""
    lora = build(case("lora"), dtype=torch.bfloat16)
    tree = funcadapt.extract(lora)
    key = next(k for k in tree.params if "lora_B" in k)
    b = tree.params[key]
    for c in (-0.3, torch.tensor(-0.3)):
        got = funcadapt.transform(tree, c)[key]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (b.float() * torch.tensor(-0.3)).to(torch.bfloat16))
    ia3 = build(case("ia3"), dtype=torch.bfloat16)
    tree = funcadapt.extract(ia3)
    key = next(iter(tree.params))
    lam = tree.params[key]
    c = torch.tensor(0.3)
    assert torch.equal(funcadapt.transform(tree, c)[key], (1 + c * (lam.float() - 1)).to(torch.bfloat16))


@pytest.mark.parametrize(("case_id", "mode"), [("lora", "linear"), ("ia3", "linear"), ("oft", "geometric")])
def test_params_apply_to_the_weights_the_layer_holds_when_it_runs(case_id, mode):
    """A Transformed describes an effect, applied when each layer runs to the tensors it holds then:
    params computed before an optimizer step use the stepped weights, at c = −1 exactly as at c = 1
    (no stale copy of the pre-step weights is ever run)."""
    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    minus, one = funcadapt.transform(tree, -1.0, mode=mode), funcadapt.transform(tree, 1.0, mode=mode)
    with torch.no_grad():
        for p in tree.params.values():
            if p.requires_grad:
                p.add_(0.05)  # what optimizer.step() does: in place, same Parameter objects
        fresh = funcadapt.extract(model)
        want_minus = output(funcadapt.call(model, funcadapt.transform(fresh, -1.0, mode=mode), **inputs()))
        torch.testing.assert_close(output(funcadapt.call(model, minus, **inputs())), want_minus, rtol=0, atol=0)
        torch.testing.assert_close(output(funcadapt.call(model, one, **inputs())), output(model(**inputs())), **TOL64)


def test_a_failing_restore_step_does_not_stop_the_others():
    """If one undo step raises, every other step still runs (the model is restored as far as it can
    be) and the error is raised after them."""
    from funcadapt.swap import run_undo

    ran: list[int] = []

    def fail() -> None:
        ran.append(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_undo([lambda: ran.append(0), fail, lambda: ran.append(2)])
    assert ran == [2, 1, 0]


def test_adapter_parameter_tied_across_layers_follows_the_coefficient_everywhere():
    """One Parameter registered under two adapter layers (tied by hand) is keyed once in the tree;
    each layer, when it runs, must still compute with the transformed tensor under its own name."""
    model = build(case("lora"), dtype=F64)
    layers = model.base_model.model.model.layers
    shared = layers[0].self_attn.q_proj.lora_B["default"].weight
    layers[1].self_attn.q_proj.lora_B["default"].weight = shared
    tree = funcadapt.extract(model)
    assert sum(t is shared for t in tree.params.values()) == 1
    before = snapshot(model)
    with torch.no_grad():
        got = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **inputs()))
        with funcadapt.AdapterModifier(model, "scale", -1.0):
            got_modifier = output(model(**inputs()))
        for p in tree.params.values():  # the reference: ΔW ↦ −ΔW written into every B itself
            if ".lora_B." in next(k for k, v in tree.params.items() if v is p):
                p.neg_()
        want = output(model(**inputs()))
        for p in tree.params.values():
            if ".lora_B." in next(k for k, v in tree.params.items() if v is p):
                p.neg_()
    torch.testing.assert_close(got, want, **TOL64)
    torch.testing.assert_close(got_modifier, want, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["lora", "dora"])  # a recomputed tensor; an effect at forward time
def test_torch_compile_follows_the_coefficient(case_id):
    """A model compiled before the context is entered runs the context's coefficient (Dynamo guards
    on the patched forwards and recompiles), and c = 1 again after exit: exact, never a stale graph.
    The 'eager' backend exercises Dynamo's capture and guards, where a coefficient could be lost."""
    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        want = {c: output(funcadapt.call(model, funcadapt.transform(tree, c), **inputs())) for c in (1.0, -1.0, 0.5)}
        torch.testing.assert_close(output(compiled(**inputs())), want[1.0], **TOL64)
        for c in (-1.0, 0.5):
            with funcadapt.AdapterModifier(model, "scale", c):
                torch.testing.assert_close(output(compiled(**inputs())), want[c], **TOL64)
        torch.testing.assert_close(output(compiled(**inputs())), want[1.0], **TOL64)
