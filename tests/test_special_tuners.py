"""Special tuners: what c means for LN Tuning, Poly, X-LoRA, PeftMixedModel, aLoRA and Arrow,
checked against references built from PEFT alone (deep copies with scaled weights, PEFT's
own disable switch), beyond what the generic case tests can see. The models are float64, so the identities
hold up to float64 rounding (cases.TOL64); the bf16 test bounds bf16's (cases.assert_bf16_as_accurate)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from cases import (
    TOL64,
    VOCAB,
    adapter_layers,
    assert_bf16_as_accurate,
    assert_unchanged,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)
from cases_special import LN_TARGETS, poly_config
from cases_xlora import make_xlora, xlora_config
from peft import LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from peft.tuners.ln_tuning.layer import LNTuningLayer
from peft.tuners.poly.layer import PolyLayer
from torch import nn

import funcadapt
from funcadapt import AdapterModifier

pytestmark = pytest.mark.filterwarnings("ignore")

COEFFS = (-1.0, 0.5, 2.0)
F64 = torch.float64


def _run(model: nn.Module, params: Any, **batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return output(funcadapt.call(model, params, **batch))


# ----------------------------------------------------------------------------
# LN Tuning: the output interpolation is the parameter interpolation of the norm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("c", COEFFS)
def test_ln_tuning_is_parameter_interpolation(arch, c):
    torch.manual_seed(0)
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]()
    model = get_peft_model(base, LNTuningConfig(target_modules=LN_TARGETS[arch]))
    randomize_adapters(model)
    model = float64(model).eval()
    batch = inputs(arch)
    tree = funcadapt.extract(model)
    roles = {role for spec in tree.layers for role in spec.keys}
    assert roles == (
        {"ln_tuning_layers.weight"} if arch == "llama" else {"ln_tuning_layers.weight", "ln_tuning_layers.bias"}
    )
    # reference: a copy whose trained norms hold W0 + c·(W1 − W0) (and the same for the bias)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.modules():
            if isinstance(layer, LNTuningLayer):
                trained = layer.ln_tuning_layers["default"]
                for name, p in trained.named_parameters():
                    p0 = getattr(layer.base_layer, name)
                    p.copy_(p0 + c * (p - p0))
        want = output(ref(**batch))
    before = snapshot(model)
    got = _run(model, funcadapt.transform(tree, c), **batch)
    assert_unchanged(model, before)
    torch.testing.assert_close(got, want, **TOL64)


# ----------------------------------------------------------------------------
# Poly: c scales the routed update of every task; the routing is unchanged


def _poly() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), poly_config("llama"))
    randomize_adapters(model)
    return float64(model).eval()


def _poly_reference(model: nn.Module, c: float, **batch: Any) -> torch.Tensor:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.modules():
            if isinstance(layer, PolyLayer):
                layer.poly_lora_B["default"].mul_(c)
        return output(ref(**batch))


TASKS = torch.tensor([0, 1, 2, 1])


def test_poly_per_task_scaling_exact():
    model = _poly()
    batch = {**inputs(batch=4), "task_ids": TASKS}
    tree = funcadapt.extract(model)
    assert {s.rule for s in tree.layers} == {"poly"}
    with torch.no_grad():
        y1 = output(model(**batch))
        with model.disable_adapter():
            y0 = output(model(**batch))
        other = output(model(**{**batch, "task_ids": torch.zeros(4, dtype=torch.long)}))
    assert not torch.allclose(y1, other, atol=1e-4), "different tasks must route differently"
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
    torch.testing.assert_close(_run(model, funcadapt.transform(tree, 0.0), **batch), y0, **TOL64)
    for c in COEFFS:
        got = _run(model, funcadapt.transform(tree, torch.tensor(c, dtype=F64)), **batch)
        torch.testing.assert_close(got, _poly_reference(model, c, **batch), **TOL64)
        with torch.no_grad(), reference_interpolation(model, c):
            torch.testing.assert_close(got, output(model(**batch)), **TOL64)
    assert_unchanged(model, before)


def test_poly_vmap_with_task_ids_equals_loop():
    model = _poly()
    batch = {**inputs(batch=4), "task_ids": TASKS}
    tree = funcadapt.extract(model)
    labels = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))

    def loss(c: torch.Tensor) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss

    cs = torch.tensor(COEFFS, dtype=F64)
    params = [p for p in tree.params.values() if p.requires_grad]
    got = funcadapt.vmap(loss)(cs)
    g_got = torch.autograd.grad(got.sum(), params)
    want = torch.stack([loss(c) for c in cs])
    g_want = torch.autograd.grad(want.sum(), params)
    torch.testing.assert_close(got, want, **TOL64)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **TOL64)
    assert any(g.abs().max() > 0 for g in g_want)


def test_poly_checkpointing_backward_fails_in_peft():
    """PEFT bug (peft 0.21.2): Poly passes task_ids through forward pre-hooks that exist only during
    ``model(...)``; a non-reentrant gradient checkpoint recomputes the layers during backward, after
    they are removed, and the router raises. Plain PEFT, no funcadapt. (The Poly case in
    cases_special.py supplies default task ids per layer so the shared checkpointing tests can run.)"""
    model = _poly()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = inputs()
    loss = model(**batch, labels=batch["input_ids"], task_ids=torch.tensor([0, 1])).loss
    with pytest.raises(ValueError, match="task_ids should not be None"):
        loss.backward()


# ----------------------------------------------------------------------------
# PeftMixedModel: LoRA, LoHa and LoKr stacked on one module


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mixed=True)
    model.add_adapter("h", LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("k", LoKrConfig(r=4, alpha=8, target_modules=["q_proj"]))
    model.set_adapter(["default", "h", "k"])
    randomize_adapters(model)
    return float64(model).eval()


def test_mixed_model_three_types_on_one_module():
    model = _mixed()
    batch = inputs()
    tree = funcadapt.extract(model)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    on_q = {s.adapter: s.rule for s in tree.layers if s.path.startswith(q0)}
    assert on_q == {"default": "lora", "h": "loha", "k": "lokr"}  # PEFT nests them: LoKr(LoHa(LoRA(q)))
    with torch.no_grad():
        y1 = output(model(**batch))
        with model.disable_adapter():
            y0 = output(model(**batch))
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
    assert torch.equal(_run(model, funcadapt.transform(tree, None, "disable"), **batch), y0)
    for c in COEFFS:
        with torch.no_grad(), reference_interpolation(model, c):
            ref = output(model(**batch))
        torch.testing.assert_close(_run(model, funcadapt.transform(tree, c), **batch), ref, **TOL64)
        with torch.no_grad(), AdapterModifier(model, "scale", c):
            torch.testing.assert_close(output(model(**batch)), ref, **TOL64)
    # invert: all three are additive, so invert == scale(−1)
    torch.testing.assert_close(
        _run(model, funcadapt.transform(tree, op="invert"), **batch),
        _run(model, funcadapt.transform(tree, -1.0), **batch),
        **TOL64,
    )
    assert_unchanged(model, before)


def test_mixed_model_per_adapter_coefficients():
    """{adapter: c} scales each type separately: c = 1 for one adapter and 0 for the others is that
    adapter alone (a copy of the model with only it active)."""
    model = _mixed()
    batch = inputs()
    tree = funcadapt.extract(model)
    for alone in ("default", "h", "k"):
        got = _run(model, funcadapt.transform(tree, {a: float(a == alone) for a in tree.adapters}), **batch)
        ref = copy.deepcopy(model)
        ref.set_adapter([alone])
        with torch.no_grad():
            want = output(ref(**batch))
        torch.testing.assert_close(got, want, **TOL64)


def test_mixed_model_vmap_and_grads():
    model = _mixed()
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=6)
    labels = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))

    def loss(c: torch.Tensor) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss

    cs = torch.tensor(COEFFS, dtype=F64)
    params = list(tree.params.values())
    got = funcadapt.vmap(loss)(cs)
    g_got = torch.autograd.grad(got.sum(), params)
    want = torch.stack([loss(c) for c in cs])
    g_want = torch.autograd.grad(want.sum(), params)
    torch.testing.assert_close(got, want, **TOL64)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **TOL64)


# ----------------------------------------------------------------------------
# aLoRA: only tokens from the invocation sequence on are adapted

INVOKE = [7, 9]


def _alora() -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"
    )
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model)
    return float64(model).eval()


def _alora_ids() -> torch.Tensor:
    ids = torch.randint(10, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[0, 4:6] = torch.tensor(INVOKE)  # invoked at position 4 ...
    ids[1, 6:8] = torch.tensor(INVOKE)  # ... and at 6
    return ids


def test_alora_fallback_exact_and_prefix_untouched():
    model = _alora()
    ids = _alora_ids()
    tree = funcadapt.extract(model)
    assert {s.rule for s in tree.layers} == {"lora-variant"}
    with torch.no_grad():
        y1 = model(input_ids=ids).logits
        with model.disable_adapter():
            y0 = model(input_ids=ids).logits
    # PEFT's own behaviour: the tokens before the invocation are the base model's
    torch.testing.assert_close(y1[0, :4], y0[0, :4], **TOL64)
    assert not torch.allclose(y1[0, 4:], y0[0, 4:], atol=1e-4)
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), input_ids=ids), y1)
    torch.testing.assert_close(_run(model, funcadapt.transform(tree, 0.0), input_ids=ids), y0, **TOL64)
    for c in COEFFS:
        got = _run(model, funcadapt.transform(tree, torch.tensor(c, dtype=F64)), input_ids=ids)
        with torch.no_grad(), reference_interpolation(model, c):
            ref = model(input_ids=ids).logits
        torch.testing.assert_close(got, ref, **TOL64)
        torch.testing.assert_close(got[0, :4], y0[0, :4], **TOL64)  # still untouched
        torch.testing.assert_close(got[1, :6], y0[1, :6], **TOL64)
    assert_unchanged(model, before)


def test_alora_explicit_offsets():
    """alora_offsets passed by the caller (PEFT then skips its own search) reach the layers under funcadapt."""
    model = _alora()
    ids = _alora_ids()
    tree = funcadapt.extract(model)
    offsets = [3, 5]  # adapt the last 3 / 5 tokens
    with torch.no_grad():
        y1 = model(input_ids=ids, alora_offsets=offsets).logits
        auto = model(input_ids=ids).logits
    assert not torch.allclose(y1, auto, atol=1e-4), "explicit offsets must differ from the searched ones here"
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), input_ids=ids, alora_offsets=offsets), y1)
    got = _run(model, funcadapt.transform(tree, 0.5), input_ids=ids, alora_offsets=offsets)
    with torch.no_grad(), reference_interpolation(model, 0.5):
        ref = model(input_ids=ids, alora_offsets=offsets).logits
    torch.testing.assert_close(got, ref, **TOL64)


def test_alora_vmap_equals_loop():
    model = _alora()
    ids = _alora_ids()
    tree = funcadapt.extract(model)

    def f(c: torch.Tensor) -> torch.Tensor:
        return output(funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids))

    cs = torch.tensor(COEFFS, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(funcadapt.vmap(f)(cs), torch.stack([f(c) for c in cs]), **TOL64)


def test_alora_generate():
    """Greedy generation under AdapterModifier: c = 1 is PEFT's, c = 0 the base model's, and c = 0.5
    the per-layer interpolation at every decoding step (reference hooks), KV cache included."""
    model = _alora()
    ids = _alora_ids()
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        peft_out = model.generate(input_ids=ids, **gen)
        with model.disable_adapter():
            base_out = model.generate(input_ids=ids, **gen)
        with reference_interpolation(model, 0.5):
            half_ref = model.generate(input_ids=ids, **gen, output_logits=True, return_dict_in_generate=True)
    assert not torch.equal(peft_out, base_out), "the adapter must change the greedy tokens here"
    before = snapshot(model)
    with torch.no_grad():
        with AdapterModifier(model, "scale", 1.0):
            assert torch.equal(model.generate(input_ids=ids, **gen), peft_out)
        with AdapterModifier(model, "scale", 0.0):
            assert torch.equal(model.generate(input_ids=ids, **gen), base_out)
        with AdapterModifier(model, "scale", 0.5):
            half = model.generate(input_ids=ids, **gen, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(half.sequences, half_ref.sequences)
    for a, b in zip(half.logits, half_ref.logits, strict=True):
        torch.testing.assert_close(a, b, **TOL64)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# Arrow: c scales the routed mixture of LoRA experts


def _save_experts(tmp_path: Any, n: int = 2, **lora: Any) -> list[str]:
    paths = []
    for i in range(n):
        torch.manual_seed(10 + i)
        expert = get_peft_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)
        )
        randomize_adapters(expert, seed=20 + i)
        path = str(tmp_path / f"expert{i}")
        expert.save_pretrained(path)
        paths.append(path)
    return paths


def test_arrow_fallback_exact(tmp_path):
    from peft import ArrowConfig, create_arrow_model

    paths = _save_experts(tmp_path, n=3)
    torch.manual_seed(0)
    model = create_arrow_model(tiny_llama(), paths, ArrowConfig(top_k=2, router_temperature=1.0))
    model = float64(model).eval()
    batch = inputs()
    with torch.no_grad():
        y1 = output(model(**batch))  # first forward: PEFT builds its prototypes (a buffer) here
        with model.disable_adapter():
            y0 = output(model(**batch))
    assert not torch.allclose(y0, y1, atol=1e-4)
    tree = funcadapt.extract(model)
    assert tree.adapters == ("arrow_router",) and {s.rule for s in tree.layers} == {"lora-variant"}
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
    torch.testing.assert_close(_run(model, funcadapt.transform(tree, 0.0), **batch), y0, **TOL64)
    for c in COEFFS:
        with torch.no_grad(), reference_interpolation(model, c):
            ref = output(model(**batch))
        torch.testing.assert_close(_run(model, funcadapt.transform(tree, c), **batch), ref, **TOL64)
    # d(output)/dc reaches the experts, which are not in the tree (the router adapter is): the
    # output interpolation runs PEFT's forward on the model's own expert weights
    c = torch.tensor(0.5, dtype=F64, requires_grad=True)
    out = output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)).square().mean()
    (dc,) = torch.autograd.grad(out, c)
    assert dc.abs() > 0
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# X-LoRA (funcadapt/rules/xlora.py): c scales every LoRA expert jointly (B_i ↦ c·B_i); with the
# default scaling_pass_value=0 the classifier's gating is PEFT's at every c. The generic case is
# tests/cases_xlora.py; these check what the generic tests cannot see.


def _xlora(seed: int = 3, **config: Any) -> nn.Module:
    """An X-LoRA model on two saved random experts (tests/cases_xlora.py), config overrides."""
    torch.manual_seed(0)
    model = make_xlora(tiny_llama(), dataclasses.replace(xlora_config("llama"), **config))
    randomize_adapters(model, seed=seed)
    return float64(model).eval()


def _xlora_reference(model: nn.Module, scales: dict[str, float], batch: dict) -> torch.Tensor:
    """PEFT alone: a deep copy with every expert's lora_B multiplied by its coefficient."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in adapter_layers(ref):
            for name, k in scales.items():
                layer.lora_B[name].weight.mul_(k)
        return output(ref(**batch))


def _latest(model: nn.Module) -> torch.Tensor:
    return model.get_latest_scalings()


def test_xlora_scales_experts_jointly():
    model = _xlora()
    batch = inputs()
    tree = funcadapt.extract(model)
    assert tree.adapters == ("0", "1") and {s.rule for s in tree.layers} == {"xlora"}
    # the gating classifier is trainable but not in the tree: no coefficient acts on it
    classifier = {k for k, p in model.named_parameters() if p.requires_grad and "internal_xlora_classifier" in k}
    assert classifier and not classifier & set(tree.params)
    with torch.no_grad():
        y1 = output(model(**batch))
        gating = _latest(model).clone()
        with model.disable_adapter():
            y0 = output(model(**batch))
    assert not torch.allclose(y0, y1, atol=1e-4)
    before = snapshot(model)
    assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
    assert torch.equal(_run(model, funcadapt.transform(tree, 0.0), **batch), y0)
    for c in COEFFS:
        got = _run(model, funcadapt.transform(tree, torch.tensor(c, dtype=F64)), **batch)
        torch.testing.assert_close(got, _xlora_reference(model, {"0": c, "1": c}, batch), **TOL64)
        # scaling_pass_value=0: the scaling pass is the base model, so the gating is PEFT's at every c
        torch.testing.assert_close(_latest(model), gating, **TOL64)
    got = _run(model, funcadapt.transform(tree, {"0": 2.0, "1": -1.0}), **batch)
    torch.testing.assert_close(got, _xlora_reference(model, {"0": 2.0, "1": -1.0}, batch), **TOL64)
    assert_unchanged(model, before)


def test_xlora_nonzero_scaling_pass_value():
    """With scaling_pass_value ≠ 0 the scaling pass runs the scaled experts, so the gating follows c:
    the result is still exactly the per-layer interpolation of every layer call (both passes)."""
    model = _xlora(scaling_pass_value=0.5)
    batch = inputs()
    tree = funcadapt.extract(model)
    with torch.no_grad():
        model(**batch)
        gating = _latest(model).clone()
    for c in COEFFS:
        with torch.no_grad(), reference_interpolation(model, c):
            ref = output(model(**batch))
        torch.testing.assert_close(_run(model, funcadapt.transform(tree, c), **batch), ref, **TOL64)
        got = _run(model, funcadapt.transform(tree, torch.tensor(c, dtype=F64)), **batch)
        torch.testing.assert_close(got, ref, **TOL64)
        assert not torch.allclose(_latest(model), gating, atol=1e-6), "the gating was expected to follow c here"


@pytest.mark.parametrize(
    "config",
    [{}, {"top_k_lora": 1, "enable_softmax": False, "enable_softmax_topk": True}, {"layerwise_scalings": True}],
    ids=["dense", "topk-softmax", "layerwise"],
)
def test_xlora_under_torch_func(config):
    """vmap over c equals the loop, torch.func.grad equals autograd, and the scalings X-LoRA stores
    on the model (get_latest_scalings) are not left as dead transform tensors."""
    model = _xlora(**config)
    tree = funcadapt.extract(model)
    batch = inputs()
    with torch.no_grad():
        model(**batch)
    latest = _latest(model)
    before = snapshot(model)

    def f(c: torch.Tensor) -> torch.Tensor:
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)).square().mean()

    cs = torch.tensor(COEFFS, dtype=F64)
    with torch.no_grad():
        batched = funcadapt.vmap(f)(cs)
        loop = torch.stack([f(c) for c in cs])
    torch.testing.assert_close(batched, loop, **TOL64)
    assert _latest(model) is not latest  # the loop (outside transforms) stored PEFT's scalings ...
    latest = _latest(model)
    funcadapt.vmap(f)(cs)
    assert _latest(model) is latest  # ... a transformed call restores the value from before
    c = torch.tensor(0.5, dtype=F64, requires_grad=True)
    (want,) = torch.autograd.grad(f(c), c)
    got = torch.func.grad(f)(torch.tensor(0.5, dtype=F64))
    assert want.abs() > 0
    torch.testing.assert_close(got, want, **TOL64)
    assert_unchanged(model, before)


def test_xlora_peft_forward_fails_under_transforms():
    """Why the rule swaps code in under transforms, pinned on PEFT alone: X-LoRA's scaling pass toggles
    the experts' requires_grad (LoraModel.disable_adapter_layers), which torch.func refuses."""
    model = _xlora()
    batch = inputs()
    keys = [k for k, _ in model.named_parameters() if ".lora_B." in k]
    weights = dict(model.named_parameters())

    def f(c: torch.Tensor) -> torch.Tensor:
        scaled = {k: c * weights[k] for k in keys}
        return output(torch.func.functional_call(model, scaled, kwargs=batch)).sum()

    with torch.no_grad(), pytest.raises(RuntimeError, match="requires_grad_"):
        torch.func.vmap(f)(torch.tensor(COEFFS, dtype=F64))


def test_xlora_classifier_gradients():
    """The classifier trains through the model's own Parameters: its gradients under funcadapt equal
    PEFT's at c = 1 and the independent reference's at c = −1, looped or vmapped."""
    model = _xlora()
    model.train()  # all dropouts are 0
    tree = funcadapt.extract(model)
    batch = inputs()
    classifier = {k: p for k, p in model.named_parameters() if "internal_xlora_classifier" in k}
    assert classifier and all(p.requires_grad for p in classifier.values())
    labels = batch["input_ids"]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(classifier.values())))

    def loss_at(c: Any) -> torch.Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss

    plain = grads(model(**batch, labels=labels).loss)
    assert any(g.abs().max() > 0 for g in plain)
    for g, w in zip(grads(loss_at(1.0)), plain, strict=True):
        torch.testing.assert_close(g, w, **TOL64)
    with reference_interpolation(model, -1.0):
        want = grads(model(**batch, labels=labels).loss)
    for g, w in zip(grads(loss_at(torch.tensor(-1.0, dtype=F64))), want, strict=True):
        torch.testing.assert_close(g, w, **TOL64)
    cs = torch.tensor(COEFFS, dtype=F64)
    batched = grads(funcadapt.vmap(loss_at)(cs).sum())
    looped = grads(torch.stack([loss_at(c) for c in cs]).sum())
    for g, w in zip(batched, looped, strict=True):
        torch.testing.assert_close(g, w, **TOL64)


def test_xlora_peft_bf16_cast_fails():
    """PEFT bug (0.21), why the case carries "peft_bf16_bug": the classifier records the model's dtype
    when X-LoRA is created and makes the scaling pass's dummy scalings in it, so after
    ``model.to(bfloat16)`` float32 scalings meet bf16 experts and PEFT's own forward raises."""
    model = _xlora().to(torch.bfloat16)
    assert model.internal_xlora_classifier.dtype == torch.float32  # stale
    with torch.no_grad(), pytest.raises(RuntimeError, match="same dtype"):
        model(**inputs())


def test_xlora_bf16_built_in_bf16():
    """bf16 the way PEFT supports it: the base model is bf16 before X-LoRA is created (PEFT keeps the
    experts in float32). Endpoints exact, linear mode close to the independent reference."""
    torch.manual_seed(0)
    model = make_xlora(tiny_llama().to(torch.bfloat16), xlora_config("llama"))
    randomize_adapters(model, seed=3)
    model.eval()
    tree = funcadapt.extract(model)
    batch = inputs()
    with torch.no_grad():
        y1 = output(model(**batch))
        with model.disable_adapter():
            y0 = output(model(**batch))
        assert y1.dtype == torch.bfloat16 and not torch.equal(y0, y1)
        assert torch.equal(_run(model, funcadapt.transform(tree, 1.0), **batch), y1)
        assert torch.equal(_run(model, funcadapt.transform(tree, None, "disable"), **batch), y0)
        with reference_interpolation(model, -1.0):
            ref = output(model(**batch))
        exact = float64(copy.deepcopy(model))  # the same weights, evaluated in float64
        with reference_interpolation(exact, -1.0):
            want = output(exact(**batch))
    got = _run(model, funcadapt.transform(tree, torch.tensor(-1.0)), **batch)
    assert_bf16_as_accurate(got, ref, want, wrong=y1)


def test_xlora_peft_checkpointing_fails():
    """PEFT bug (0.21), why the case carries "peft_checkpointing_bug": X-LoRA hands the scalings to its
    layers through forward pre-hooks that exist only while the forward runs; the checkpointed
    recompute runs the experts without them, so torch's non-reentrant checkpoint sees other saved
    tensors and raises. PEFT alone, no funcadapt involved."""
    from torch.utils.checkpoint import CheckpointError

    model = _xlora()
    model.train()
    batch = inputs()
    model(**batch, labels=batch["input_ids"]).loss.backward()  # trains without checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = model(**batch, labels=batch["input_ids"]).loss
    with pytest.raises(CheckpointError, match="different number of tensors"):
        loss.backward()
