"""Per-token coefficients (funcadapt.per_token): token t of row b gets y0 + c[b, t]·(y1 − y0) at every
adapted layer, with t the absolute position (KV cache included).

References use nothing from funcadapt: forward hooks that interpolate each token's output with PEFT's
own disable switch (cases.reference_interpolation with cases.per_token_reference), generate() without
a KV cache (the whole sequence run again at every step), PEFT's aLoRA, and central differences. The
architecture matrix (tests/test_architectures.py, paths per_token and per_token_generate) runs the
same checks on every architecture in float64.
"""

from __future__ import annotations

import re

import pytest
import torch
from cases import (
    CASES,
    TOL64,
    VOCAB,
    assert_unchanged,
    build,
    case,
    inputs,
    output,
    per_token_reference,
    reference_interpolation,
    snapshot,
    tiny_llama,
)
from peft import LoraConfig, get_peft_model
from test_rows import generating_model, left_padded_prompts, token_logprob
from transformers import GenerationConfig

import funcadapt
from funcadapt import AdapterModifier
from funcadapt.rules.base import rule_named

pytestmark = pytest.mark.filterwarnings("ignore")

SEQ = 8


def values_for(rows: int, length: int, seed: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token coefficients in [−1.5, 2)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, length, generator=g, dtype=torch.float64) * 3.5 - 1.5).to(dtype)


def token_case_arch(c) -> str | None:
    """The first architecture of a case whose layers are laid out by token (None: convolutions only)."""
    return next((a for a in c.archs if a != "cnn"), None)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_every_rule_equals_the_token_by_token_reference(c):
    """Every rule: a forward at random [B, L] values (L longer than the batch) equals the hook reference;
    rules whose rows or tokens are coupled refuse with their reason, convolutions by layout."""
    arch = token_case_arch(c)
    model = build(c, arch or "cnn")
    tree = funcadapt.extract(model)
    values = values_for(2, SEQ + 3)
    coupled = rule_named(c.rule).rows_coupled
    if coupled:
        with pytest.raises(ValueError, match=re.escape(coupled)):
            funcadapt.transform(tree, funcadapt.per_token(values))
        return
    params = funcadapt.transform(tree, funcadapt.per_token(values))
    if arch is None:
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"is a Conv\dd, whose output is not laid out as \[batch, tokens"):
            funcadapt.call(model, params, **inputs("cnn", batch=2))
        assert_unchanged(model, before)
        return
    batch = inputs(arch, batch=2, seq=SEQ)
    with torch.no_grad(), reference_interpolation(model, per_token_reference(values)):
        want = output(model(**batch))  # (first: PEFT's COFT projects its weights in place in its own forward)
    before = snapshot(model)
    with torch.no_grad():
        got = output(funcadapt.call(model, params, **batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["lora", "lora-rslora-bias", "ia3", "dora", "oft"])
def test_constant_rows_are_per_row_bit_for_bit(case_id):
    """A row whose values are all equal is that row under per_row (the same operations on the same
    numbers); [L] values equal [B, L] values with every row the same."""
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=SEQ)
    rows = torch.tensor([-1.0, 0.7])
    with torch.no_grad():
        by_row = output(funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_row(rows)), **batch))
        by_token = output(
            funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(rows[:, None].expand(2, SEQ))), **batch)
        )
        line = values_for(1, SEQ)[0]
        shared = output(funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(line)), **batch))
        tiled = output(
            funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(line.expand(2, SEQ))), **batch)
        )
    assert torch.equal(by_token, by_row)
    assert torch.equal(shared, tiled)


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "dora", "loha"])
def test_gradients_to_adapter_and_values_equal_the_reference(case_id):
    """float64: the loss, its gradient to every adapter parameter and to the values, as the hook reference's."""
    model = build(case(case_id), dtype=torch.float64)
    model.train()
    tree = funcadapt.extract(model)
    keys = [k for k, p in tree.params.items() if p.requires_grad]
    ids = inputs(batch=2, seq=SEQ)["input_ids"]

    def loss_of(logits):
        return -token_logprob(logits, ids).mean()

    values = values_for(2, SEQ, dtype=torch.float64).requires_grad_()
    got_loss = loss_of(
        output(funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(values)), input_ids=ids))
    )
    got = torch.autograd.grad(got_loss, [tree.params[k] for k in keys] + [values])

    ref_values = values.detach().clone().requires_grad_()
    with reference_interpolation(model, per_token_reference(ref_values)):
        want_loss = loss_of(output(model(input_ids=ids)))
    want = torch.autograd.grad(want_loss, [tree.params[k] for k in keys] + [ref_values])
    torch.testing.assert_close(got_loss, want_loss, **TOL64)
    for name, a, b in zip([*keys, "values"], got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL64, msg=name)
    assert want[-1].abs().max() > 0


def test_token_attribution_equals_central_differences():
    """torch.func.grad of a metric with respect to the per-token values (float64) equals central
    differences of the metric at each position's coefficient."""
    model = build(case("lora"), dtype=torch.float64)
    tree = funcadapt.extract(model)
    ids = inputs(batch=1, seq=6)["input_ids"]
    target = ids[:, 1:]

    def metric(values):
        logits = output(funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(values)), input_ids=ids))
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, target[..., None]).sum()

    values = torch.full((1, 6), 0.5, dtype=torch.float64)
    grad = torch.func.grad(metric)(values)
    h = 1e-5
    numeric = torch.zeros_like(values)
    with torch.no_grad():
        for t in range(6):
            step = torch.zeros_like(values)
            step[0, t] = h
            numeric[0, t] = (metric(values + step) - metric(values - step)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert grad[0, -1] == 0  # the last position predicts nothing the metric reads
    assert grad[0, :-1].abs().min() > 0


def test_vmap_over_per_token_values_equals_separate_calls():
    model = build(case("dora"), dtype=torch.float64)
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=SEQ)
    stacked = torch.stack([values_for(2, SEQ, seed=s, dtype=torch.float64) for s in range(3)])

    def logits(values):
        return output(funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(values)), **batch))

    with torch.no_grad():
        together = funcadapt.vmap(logits)(stacked)
        for k in range(3):
            torch.testing.assert_close(together[k], logits(stacked[k]), **TOL64)


def test_groups_give_each_block_its_own_column():
    """values [B, L, G]: the layers of group g take column g of every token's vector."""
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    names = list(groups)
    g = torch.Generator().manual_seed(4)
    vectors = torch.rand(2, SEQ, len(names), generator=g) * 3 - 1
    batch = inputs(batch=2, seq=SEQ)
    block_of = {path: i for i, name in enumerate(names) for path in groups[name]}

    def coeff_at(path):
        i = next((i for p, i in block_of.items() if path == p or path.endswith("." + p) or p.endswith(path)), None)
        return None if i is None else per_token_reference(vectors[..., i])

    with torch.no_grad():
        got = output(
            funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(vectors, groups=groups)), **batch)
        )
        with reference_interpolation(model, coeff_at):
            want = output(model(**batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_with_the_forwards_positions():
    """Under non-reentrant checkpointing, the recompute in backward (after the forward left the model)
    places the coefficients as the forward did: the gradients of a run without checkpointing."""
    torch.manual_seed(0)
    base = tiny_llama().double()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    model.train()
    ids = inputs(batch=2, seq=SEQ)["input_ids"]
    values = values_for(2, SEQ + 4, dtype=torch.float64)
    keys = [n for n, p in model.named_parameters() if p.requires_grad]

    def grads():
        with AdapterModifier(model, "scale", funcadapt.per_token(values)):
            loss = model(input_ids=ids, labels=ids).loss
        return torch.autograd.grad(loss, [dict(model.named_parameters())[k] for k in keys])

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    for name, a, b in zip(keys, checkpointed, plain, strict=True):
        torch.testing.assert_close(a, b, **TOL64, msg=name)


# ----------------------------------------------------------------------------
# generate()

GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


def generating_model64(attn: str = "sdpa"):
    """test_rows' generating model in float64: decoding with a cache and the uncached reference round
    differently, and in float32 a near tie could pick another token on another CPU."""
    return generating_model(attn).double()


def reference_generate(model, prompts, values, config):
    """generate() without a KV cache under the hook reference: every step runs the whole sequence."""
    uncached = GenerationConfig(**{**config.to_dict(), "use_cache": False})
    with torch.no_grad(), reference_interpolation(model, per_token_reference(values)):
        return model.generate(**prompts, generation_config=uncached)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_left_padding_equals_the_uncached_reference(attn):
    model = generating_model64(attn)
    prompts = left_padded_prompts()
    values = values_for(3, 7 + GREEDY.max_new_tokens, seed=9)
    before = snapshot(model)
    with AdapterModifier(model, "scale", funcadapt.per_token(values)):
        got = model.generate(**prompts, generation_config=GREEDY)
    assert torch.equal(got, reference_generate(model, prompts, values, GREEDY))
    with model.disable_adapter():
        base = model.generate(**prompts, generation_config=GREEDY)
    assert not torch.equal(got, base), "the coefficients must change the generated tokens"
    assert_unchanged(model, before)


def test_generate_with_beams_needs_each_row_repeated():
    """num_beams = k runs k copies of each row: [B, L] values are refused with the fix, and the fix
    (per_token(values, repeat=k)) equals the uncached reference."""
    model = generating_model64()
    prompts = left_padded_prompts()
    config = GenerationConfig(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    values = values_for(3, 7 + 5, seed=11)
    before = snapshot(model)
    refusal = re.escape("funcadapt.per_token(values, repeat=n)")
    with pytest.raises(ValueError, match=refusal), AdapterModifier(model, "scale", funcadapt.per_token(values)):
        model.generate(**prompts, generation_config=config)
    assert_unchanged(model, before)
    with AdapterModifier(model, "scale", funcadapt.per_token(values, repeat=2)):
        got = model.generate(**prompts, generation_config=config)
    assert torch.equal(got, reference_generate(model, prompts, values.repeat_interleave(2, dim=0), config))


def test_after_prompt_steers_the_generated_tokens_only():
    """after_prompt: the prompt at 0 (the base model's KV cache, and so the first generated token is the
    base model's), every generated token's position at c; with steer_last_prompt_token the first too."""
    model = generating_model64()
    prompts = left_padded_prompts()
    steered = funcadapt.after_prompt(prompts, GREEDY.max_new_tokens, 1.5)
    assert steered.values.shape == (7 + 8,)
    assert steered.values[:7].eq(0).all() and steered.values[7:].eq(1.5).all()
    assert funcadapt.after_prompt(prompts, 8, 1.5, steer_last_prompt_token=True).values[6] == 1.5
    with AdapterModifier(model, "scale", steered):
        got = model.generate(**prompts, generation_config=GREEDY)
    with model.disable_adapter():
        base = model.generate(**prompts, generation_config=GREEDY)
    with AdapterModifier(model, "scale", 1.5):
        whole = model.generate(**prompts, generation_config=GREEDY)
    assert torch.equal(got[:, 7], base[:, 7])  # predicted at the last prompt position, at c = 0
    assert torch.equal(got, reference_generate(model, prompts, steered.values.expand(3, -1), GREEDY))
    assert not torch.equal(got, base) and not torch.equal(got, whole)


def test_alora_is_per_token_zero_before_the_invocation_and_one_from_it():
    """PEFT's aLoRA switches a LoRA on from the start of its invocation tokens: the same LoRA weights in a
    plain LoRA model under per_token (0 before, 1 from there on) give its logits."""
    torch.manual_seed(0)
    base = tiny_llama().double()
    invocation = [5, 6, 7]
    alora = get_peft_model(
        base,
        LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            alora_invocation_tokens=invocation,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    ).eval()
    torch.manual_seed(0)
    plain = get_peft_model(
        tiny_llama().double(),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    plain.load_state_dict(alora.state_dict())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, VOCAB, (2, 12), generator=g)
    ids[0, 4:7] = torch.tensor(invocation)  # invoked at position 4 in row 0, at 8 in row 1
    ids[1, 8:11] = torch.tensor(invocation)
    starts = torch.tensor([4, 8])
    values = (torch.arange(12)[None] >= starts[:, None]).double()
    with torch.no_grad():
        want = alora(input_ids=ids).logits
        with AdapterModifier(plain, "scale", funcadapt.per_token(values)):
            got = plain(input_ids=ids).logits
        whole = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL64)
    assert (got - whole).abs().max() > 1e-3  # not the LoRA on every token


def test_contrastive_step_on_completion_tokens():
    """The ±1 contrast on completion tokens only (0 on the prompt), as one forward on [pos; neg]: loss and
    gradients of the reference's two passes."""
    model = build(case("lora"), dtype=torch.float64)
    model.train()
    tree = funcadapt.extract(model)
    keys = [k for k, p in tree.params.items() if p.requires_grad]
    pos, neg = inputs(batch=2, seq=SEQ, seed=1)["input_ids"], inputs(batch=2, seq=SEQ, seed=2)["input_ids"]
    prompt = 5
    completion = (torch.arange(SEQ) >= prompt).double()
    values = torch.cat([completion.expand(2, -1), -completion.expand(2, -1)])

    def loss_of(lp):
        return -(lp[:2].mean() - lp[2:].mean())

    ids = torch.cat([pos, neg])
    with AdapterModifier(model, "scale", funcadapt.per_token(values)):
        got_loss = loss_of(token_logprob(output(model(input_ids=ids)), ids))
    got = torch.autograd.grad(got_loss, [tree.params[k] for k in keys])
    lps = []
    for half, sign in ((pos, 1.0), (neg, -1.0)):
        with reference_interpolation(model, per_token_reference(sign * completion.expand(2, -1))):
            lps.append(token_logprob(output(model(input_ids=half)), half))
    want_loss = loss_of(torch.cat(lps))
    want = torch.autograd.grad(want_loss, [tree.params[k] for k in keys])
    torch.testing.assert_close(got_loss, want_loss, **TOL64)
    for name, a, b in zip(keys, got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL64, msg=name)


# ----------------------------------------------------------------------------
# refusals


def test_per_token_misuse_is_refused_and_the_model_unchanged():
    model = build(case("ia3"))
    tree = funcadapt.extract(model)
    values = funcadapt.per_token(values_for(2, SEQ))
    before = snapshot(model)
    with pytest.raises(ValueError, match="mode='linear' only"):
        funcadapt.transform(tree, values, mode="geometric")
    with pytest.raises(ValueError, match="per_token is for op='scale'"):
        funcadapt.transform(tree, values, op="shift")
    with pytest.raises(ValueError, match=r"\[B, L\] or \[L\]"):
        funcadapt.per_token(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="repeat"):
        funcadapt.per_token(torch.ones(2, 3), repeat=0)
    with pytest.raises(ValueError, match=re.escape("cover positions 0…5 (L = 6)")):
        funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(torch.ones(2, 6))), **inputs(seq=SEQ))
    alone = r"call the model .* itself, not one of its submodules"
    with pytest.raises(ValueError, match=alone), AdapterModifier(model, "scale", values):
        model.base_model.model.model.layers[0](torch.randn(2, SEQ, 32))
    with pytest.raises(ValueError, match="per-token coefficients have 3 rows, but the model's input has 2"):
        funcadapt.call(model, funcadapt.transform(tree, funcadapt.per_token(values_for(3, SEQ))), **inputs(seq=SEQ))
    assert_unchanged(model, before)


def test_positions_that_disagree_with_the_attention_mask_are_refused():
    """A forward whose KV cache funcadapt cannot see (the mask covers 8 positions, one new token, no cache)
    raises instead of placing the token at position 0."""
    model = build(case("lora"))
    values = funcadapt.per_token(values_for(2, 12))
    ids = inputs(batch=2, seq=1)["input_ids"]
    refusal = "attention mask covers 8 positions, but funcadapt finds 0 cached and 1"
    with pytest.raises(ValueError, match=refusal), AdapterModifier(model, "scale", values):
        model(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_per_token_and_whole_batch_coefficients_on_one_layer_are_refused():
    model = build(case("dora"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"default": funcadapt.per_token(values_for(2, SEQ)), "other": 0.5})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"per-token coefficients.*same kind of coefficient"):
        funcadapt.call(model, params, **inputs(batch=2, seq=SEQ))
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["vmap", "rows", "loop"])
@pytest.mark.parametrize("grouped", [False, True])
def test_sweep_scales_a_per_token_profile(method, grouped):
    """sweep(..., tokens=profile): coefficient c runs token t of row b at c·profile[b, t] (with groups, the
    vector c: group g at c[g]·profile[b, t]); every method gives the hook reference's metric."""
    model = build(case("ia3"), dtype=torch.float64)  # (vmap's batched kernels reduce in another order)
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=SEQ)
    profile = values_for(2, SEQ, seed=5, dtype=torch.float64)
    groups = funcadapt.layer_groups(tree, "block") if grouped else None
    coeffs = torch.tensor([[-1.0, 0.5], [2.0, -0.5]] if grouped else [-1.0, 0.5, 2.0], dtype=torch.float64)

    def metric(out):
        return out.logits[:, -3:].mean()

    result = funcadapt.sweep(model, metric, coeffs, batch, method=method, groups=groups, tokens=profile)
    assert result.method == method
    block_of = {p: i for i, g in enumerate(groups or {}) for p in groups[g]}
    for c, got in zip(coeffs, result.values, strict=True):
        if grouped:

            def coeff_at(path, c=c):
                i = next((i for p, i in block_of.items() if path.endswith(p) or p.endswith(path)), None)
                return None if i is None else per_token_reference(c[i] * profile)
        else:
            coeff_at = per_token_reference(c * profile)
        with torch.no_grad(), reference_interpolation(model, coeff_at):
            want = metric(model(**batch))
        torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("case_id", ["adaption-prompt", "adaption-prompt-o-bias", "dora", "oft"])
def test_generate_of_other_families_equals_the_uncached_reference(case_id):
    """Families that interpolate the layer output (y0 from a second run, or from the wrapped attention that
    appends to the KV cache once per step) decode with a cache as the uncached reference does (float64)."""
    model = build(case(case_id), dtype=torch.float64)
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    values = values_for(2, 11, seed=12)
    with torch.no_grad():  # PEFT's first generate() leaves base_model.prepare_inputs_for_generation set
        model.generate(input_ids=prompt, generation_config=config)
    before = snapshot(model)
    with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_token(values)):
        got = model.generate(input_ids=prompt, generation_config=config)
    assert_unchanged(model, before)
    assert torch.equal(got, reference_generate(model, {"input_ids": prompt}, values, config))


def test_sequence_first_models_refuse_coefficients_that_vary_over_the_batch():
    """XLNet runs its layers on [T, B, …]: with as many rows as tokens the first axis would pass for the
    batch (found in review: B = T = 4 ran, transposed). per_token and per_row are refused there by name."""
    from transformers import XLNetConfig, XLNetLMHeadModel

    torch.manual_seed(0)
    config = XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=32, dropout=0.0)
    model = get_peft_model(XLNetLMHeadModel(config), LoraConfig(r=4, target_modules=["layer_1", "layer_2"])).eval()
    ids = inputs(batch=4, seq=4)["input_ids"]
    before = snapshot(model)
    for coeff in (funcadapt.per_token(values_for(4, 4)), funcadapt.per_row([1.0, -1.0, 0.5, 0.0])):
        refusal = pytest.raises(ValueError, match="XLNet runs its layers sequence-first")
        with refusal, torch.no_grad(), AdapterModifier(model, "scale", coeff):
            model(input_ids=ids)
    assert_unchanged(model, before)


def test_a_layer_that_sees_the_last_positions_only_takes_their_columns():
    """generate() runs the LM head on the last position only (logits_to_keep=1): a LoRA on lm_head takes the
    column of that position. The full forward equals the token-by-token reference; logits_to_keep=1 gives
    its last position (found in review: such calls were refused)."""
    torch.manual_seed(0)
    base = tiny_llama().double()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()
    ids = inputs(batch=2, seq=7)["input_ids"]
    values = values_for(2, 10, dtype=torch.float64)
    with torch.no_grad():
        with AdapterModifier(model, "scale", funcadapt.per_token(values)):
            full = model(input_ids=ids).logits
            last = model(input_ids=ids, logits_to_keep=1).logits
        with reference_interpolation(model, per_token_reference(values)):
            want = model(input_ids=ids).logits
    torch.testing.assert_close(full, want, **TOL64)
    torch.testing.assert_close(last, full[:, -1:], **TOL64)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with AdapterModifier(model, "scale", funcadapt.per_token(values)):
        model.generate(input_ids=ids, generation_config=config)  # runs (the head sees one position per step)


def test_another_threads_refused_call_leaves_no_positions_behind():
    """While thread A runs the model under per_token, thread B calls it with other positions (cache_position
    3…10) and is held after entering the model, before any layer the context changes (where it would be
    refused): A's layers still read A's positions (found in review: B's span sat on a stack shared by both threads)."""
    import threading
    import time

    model = generating_model64()
    ids = inputs(batch=2, seq=8)["input_ids"]
    values = values_for(2, 12, dtype=torch.float64)
    with torch.no_grad(), reference_interpolation(model, per_token_reference(values)):
        want = model(input_ids=ids).logits
    embed = model.get_base_model().model.embed_tokens
    first_block = model.get_base_model().model.layers[0]
    a_inside, b_entered, b_errors = threading.Event(), threading.Event(), []

    def hold_a(module, args):
        if threading.current_thread() is threading.main_thread():
            a_inside.set()
            b_entered.wait(5)

    def hold_b(module, args):
        if threading.current_thread() is not threading.main_thread():
            b_entered.set()
            time.sleep(0.5)  # B has entered the model (its positions recorded, were they recorded) and waits

    def thread_b():
        a_inside.wait(5)
        try:
            with torch.no_grad():
                model(input_ids=ids, cache_position=torch.arange(3, 11))
        except RuntimeError as e:
            b_errors.append(str(e))

    handles = [first_block.register_forward_pre_hook(hold_a), embed.register_forward_pre_hook(hold_b)]
    other = threading.Thread(target=thread_b)
    try:
        other.start()
        with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_token(values)):
            got = model(input_ids=ids).logits
        other.join()
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, **TOL64)
    assert b_entered.is_set()  # (B may finish after A's context exited, unrefused: what matters is A's result)
