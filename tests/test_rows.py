"""Coefficient batches: one coefficient per batch row (funcadapt.per_row + funcadapt.tile).

Each row must get exactly what running its coefficient alone gives: forward outputs for
every rule, greedy tokens from generate() (KV cache, left padding, SDPA), the sampling
distributions of generate(do_sample=True), and losses and gradients of a ±1 contrastive
step as one forward on the doubled batch.
"""

from __future__ import annotations

import re

import pytest
import torch
from cases import CASES, VOCAB, assert_unchanged, build, case, inputs, output, snapshot
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import funcadapt
from funcadapt import AdapterModifier, interpret
from funcadapt.rules.base import rule_named

pytestmark = pytest.mark.filterwarnings("ignore")

COEFFS = (-1.0, 0.0, 0.5, 1.0, 2.0)


def separately(model, tree, coeffs, batch):
    with torch.no_grad():
        return [output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)) for c in coeffs]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rows_equal_separate_runs(case):
    """Every rule: row group k of the tiled batch equals a separate call at COEFFS[k]; rules
    whose rows are coupled (Lily's batch-averaging router) refuse with their reason."""
    arch = case.archs[0]
    model = build(case, arch)
    batch = inputs(arch, batch=2)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    coupled = rule_named(case.rule).rows_coupled
    if coupled:
        with pytest.raises(ValueError, match=re.escape(coupled)):
            funcadapt.transform(tree, funcadapt.per_row(torch.tensor(COEFFS), repeat=2))
        return
    expected = separately(model, tree, COEFFS, batch)
    params = funcadapt.transform(tree, funcadapt.per_row(torch.tensor(COEFFS), repeat=2))
    with torch.no_grad():
        got = output(funcadapt.call(model, params, **funcadapt.tile(batch, len(COEFFS))))
    for k, want in enumerate(expected):
        torch.testing.assert_close(got[2 * k : 2 * k + 2], want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y0 = output(funcadapt.call(model, funcadapt.transform(tree, 0.0), **batch))
    torch.testing.assert_close(got[2:4], y0, rtol=0, atol=1e-6)  # the c=0 rows are the base model
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "dora"])
def test_rows_through_modifier_and_order(case_id):
    """AdapterModifier takes per_row too; rows may come in any order (not only tiled groups)."""
    model = build(case(case_id))
    batch = inputs(batch=4)
    coeffs = torch.tensor([2.0, -1.0, -1.0, 0.5])
    tree = funcadapt.extract(model)
    expected = [
        separately(model, tree, [float(c)], {"input_ids": batch["input_ids"][i : i + 1]})[0]
        for i, c in enumerate(coeffs)
    ]
    with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_row(coeffs)):
        got = output(model(**batch))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_additive_layers_run_the_base_layer_once():
    """LoRA rows reuse the base layer's output as y0 instead of running the layer twice."""
    model = build(case("lora"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_row([1.0, -1.0])):
            model(**inputs(batch=2))
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize(("case_id", "fast"), [("lora", True), ("lora-rslora-bias", False), ("ia3", False)])
def test_lora_scales_its_rank_r_activations_per_row(case_id, fast, monkeypatch):
    """Vanilla LoRA without a B bias applies per-row coefficients by scaling B's rank-r input
    (no output interpolation at all); with lora_bias, or for other rules, the layer output is
    interpolated. Either way the rows equal separate runs (test_rows_equal_separate_runs)."""
    interpolated = []
    real = interpret.Interpolation
    monkeypatch.setattr(interpret, "Interpolation", lambda *a, **k: interpolated.append(a[0]) or real(*a, **k))
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    with torch.no_grad():
        got = output(
            funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_row([2.0, -1.0])), **inputs(batch=2))
        )
    assert (not interpolated) == fast
    expected = [
        separately(model, tree, [c], {"input_ids": inputs(batch=2)["input_ids"][i : i + 1]})[0]
        for i, c in enumerate([2.0, -1.0])
    ]
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_in_place_update_is_not_mistaken_for_the_base_output():
    """AdaLoRA's PEFT forward adds to the base output in place: reusing that tensor as y0
    would silently make every row c = 1. The version counter catches it (here under
    autograd, where PEFT's in-place forward runs)."""
    model = build(case("adalora"))
    batch = inputs(batch=2)
    tree = funcadapt.extract(model)
    expected = separately(model, tree, [-1.0, 0.0], batch)
    got = output(
        funcadapt.call(
            model, funcadapt.transform(tree, funcadapt.per_row([-1.0, 0.0], repeat=2)), **funcadapt.tile(batch, 2)
        )
    )
    torch.testing.assert_close(got.detach(), torch.cat(expected), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# generate()


def generating_model(attn: str = "sdpa"):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation=attn,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(4.0)  # a strong adapter: the coefficients must change the tokens
    return model.eval()


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    ids[2, :1], mask[2, :1] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_greedy_rows_equal_separate(attn):
    model = generating_model(attn)
    prompts = left_padded_prompts()
    coeffs = [-1.0, 0.0, 1.0]
    before = snapshot(model)
    separate = []
    for c in coeffs:
        with AdapterModifier(model, "scale", c):
            separate.append(model.generate(**prompts, generation_config=GREEDY))
    with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=3)):
        together = model.generate(**funcadapt.tile(prompts, 3), generation_config=GREEDY)
    assert torch.equal(together, torch.cat(separate))
    assert not torch.equal(separate[0], separate[2]), "the coefficient must change the generated tokens"
    with model.disable_adapter():
        assert torch.equal(model.generate(**prompts, generation_config=GREEDY), separate[1])
    assert_unchanged(model, before)


def test_generate_beams_need_expanded_coefficients():
    """num_beams = k runs k copies of each row in a row: coefficients for the tiled batch are refused
    with a message whose fixes run as written (on a list of coefficients and on a PerRow), and the
    expanded coefficients equal separate runs."""
    model = generating_model()
    prompts = {k: v[:2] for k, v in left_padded_prompts().items()}
    config = GenerationConfig(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    coeffs = [1.0, -1.0]  # a list, as in README
    batch = funcadapt.tile(prompts, len(coeffs))
    per_row_coeffs = funcadapt.per_row(coeffs, repeat=len(prompts["input_ids"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="num_beams") as info, AdapterModifier(model, "scale", per_row_coeffs):
        model.generate(**batch, generation_config=config)
    assert_unchanged(model, before)
    message = str(info.value)
    fixes = re.findall(r"funcadapt\.per_row\([^()]*(?:\([^()]*\))?[^()]*\)", message)
    assert len(fixes) == 2, message
    alone = []
    for c in coeffs:
        with AdapterModifier(model, "scale", c):
            alone.append(model.generate(**prompts, generation_config=config))
    for fix in fixes:  # each suggested fix, evaluated as written
        expanded = eval(
            fix,
            {
                "funcadapt": funcadapt,
                "coeffs": coeffs,
                "prompts": prompts["input_ids"],
                "per_row_coeffs": per_row_coeffs,
            },
        )
        with AdapterModifier(model, "scale", expanded):
            together = model.generate(**batch, generation_config=config)
        assert torch.equal(together, torch.cat(alone)), fix
    assert not torch.equal(alone[0], alone[1])


def test_generate_sampling_uses_each_rows_distribution():
    """do_sample=True draws different tokens per run, so compare the distributions: the raw
    logits generate() saw at every step for row group k equal a separate forward at COEFFS[k]
    over the sampled sequences."""
    model = generating_model()
    prompts = {"input_ids": torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))}
    coeffs = [-1.0, 1.0]
    config = GenerationConfig(
        max_new_tokens=6,
        do_sample=True,
        top_k=0,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.manual_seed(0)
    with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=2)):
        out = model.generate(**funcadapt.tile(prompts, 2), generation_config=config)
    steps = torch.stack(out.logits, dim=1)  # (rows, new tokens, vocab)
    prompt_len = prompts["input_ids"].shape[1]
    for k, c in enumerate(coeffs):
        rows = out.sequences[2 * k : 2 * k + 2]
        with torch.no_grad(), AdapterModifier(model, "scale", c):
            logits = model(input_ids=rows).logits[:, prompt_len - 1 : -1]
        torch.testing.assert_close(steps[2 * k : 2 * k + 2], logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# training


def token_logprob(logits, ids):
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "dora", "loha"])
def test_contrastive_step_as_one_forward(case_id):
    """loss(+1, pos) − loss(−1, neg) on the doubled batch in one forward: same loss, same
    gradients (adapter params and the coefficients) as two separate passes."""
    model = build(case(case_id))
    model.train()
    pos, neg = inputs(batch=2, seed=1)["input_ids"], inputs(batch=2, seed=2)["input_ids"]
    tree = funcadapt.extract(model)
    keys = list(tree.params)

    c_sep = torch.tensor([1.0, -1.0], requires_grad=True)
    out_p = output(funcadapt.call(model, funcadapt.transform(tree, c_sep[0]), input_ids=pos))
    out_n = output(funcadapt.call(model, funcadapt.transform(tree, c_sep[1]), input_ids=neg))
    loss_sep = -(token_logprob(out_p, pos).mean() - token_logprob(out_n, neg).mean())
    grads_sep = torch.autograd.grad(loss_sep, [tree.params[k] for k in keys] + [c_sep])

    c_rows = torch.tensor([1.0, -1.0], requires_grad=True)
    ids = torch.cat([pos, neg])
    with AdapterModifier(model, "scale", funcadapt.per_row(c_rows, repeat=2)):
        logits = output(model(input_ids=ids))
    lp = token_logprob(logits, ids)
    loss_rows = -(lp[:2].mean() - lp[2:].mean())
    grads_rows = torch.autograd.grad(loss_rows, [tree.params[k] for k in keys] + [c_rows])

    torch.testing.assert_close(loss_rows, loss_sep, rtol=1e-5, atol=1e-5)
    for name, a, b in zip([*keys, "coeffs"], grads_rows, grads_sep, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------
# errors and helpers


def test_row_count_mismatch_is_refused_and_model_unchanged():
    model = build(case("lora"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"3 per-row coefficients.*funcadapt.tile"):
        funcadapt.call(
            model, funcadapt.transform(funcadapt.extract(model), funcadapt.per_row([1.0, 0.0, -1.0])), **inputs(batch=2)
        )
    assert_unchanged(model, before)


def test_per_row_misuse_is_refused():
    model = build(case("ia3"))
    tree = funcadapt.extract(model)
    rows = funcadapt.per_row([1.0, -1.0])
    with pytest.raises(ValueError, match="mode='linear' only"):
        funcadapt.transform(tree, rows, mode="geometric")
    with pytest.raises(ValueError, match="per_row is for op='scale'"):
        funcadapt.transform(tree, rows, op="shift")
    with pytest.raises(ValueError, match="1-D"):
        funcadapt.per_row(torch.ones(2, 2))
    with pytest.raises(ValueError, match="repeat"):
        funcadapt.per_row([1.0], repeat=0)
    with pytest.raises(ValueError, match="per_row"):
        funcadapt.transform(tree, torch.tensor([1.0, -1.0]))  # a bare vector is ambiguous: say what to use


def test_per_row_and_whole_batch_coefficients_on_one_layer_are_refused():
    """Two DoRA adapters on one layer both interpolate at the output: one per-row and one
    whole-batch coefficient cannot be combined there."""
    model = build(case("dora"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"default": funcadapt.per_row([1.0, -1.0]), "other": torch.tensor(0.5)})
    before = snapshot(model)
    with pytest.raises(ValueError, match="same kind of coefficient"):
        funcadapt.call(model, params, **inputs(batch=2))
    assert_unchanged(model, before)


def test_tile_and_untile():
    batch = {"input_ids": torch.arange(6).view(2, 3), "use_cache": False}
    tiled = funcadapt.tile(batch, 3)
    assert tiled["use_cache"] is False
    assert torch.equal(tiled["input_ids"], torch.cat([batch["input_ids"]] * 3))
    model = build(case("lora"))
    with torch.no_grad():
        out = model(**inputs(batch=6), use_cache=True)
    parts = funcadapt.untile(out, 3)
    assert [type(p) for p in parts] == [type(out)] * 3
    for k, p in enumerate(parts):
        assert torch.equal(p.logits, out.logits[2 * k : 2 * k + 2])
        assert p.past_key_values is None  # the cache object is not split
    with pytest.raises(ValueError, match="first axis"):
        funcadapt.untile(torch.ones(5), 3)


def test_equal_valued_coefficients_that_need_their_own_gradients_are_not_merged():
    """Two adapters jointly interpolated on one layer, given two per-row leaves with equal values:
    treating them as one coefficient would drop one leaf's gradient, so it is refused."""
    model = build(case("dora"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    a, b = torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([1.0, -1.0], requires_grad=True)
    params = funcadapt.transform(tree, {"default": funcadapt.per_row(a), "other": funcadapt.per_row(b)})
    with pytest.raises(ValueError, match="different per-row coefficients"):
        funcadapt.call(model, params, **inputs(batch=2))
    shared = funcadapt.per_row(a)  # one object for both: fine, and a gets the gradient
    output(funcadapt.call(model, funcadapt.transform(tree, shared), **inputs(batch=2))).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
