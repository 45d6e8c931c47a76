"""vmap over coefficients and exact gradients: a vmapped batch of coefficients equals
sequential passes (values and parameter gradients), parameter gradients equal those of
the independent reference y0 + c·(y1 − y0), d(loss)/dc passes finite-difference
gradcheck in float64 (linear and geometric), train-mode dropout draws one mask per
coefficient under funcadapt.vmap, and per-adapter coefficient dicts mean what they say.

The equalities are checked in float64 (cases.build(..., dtype=torch.float64)), up to float64 rounding
(cases.TOL64), or float32 rounding where PEFT computes part of a case in float32 (cases.tolerance)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cases import (
    CASES,
    TOL64,
    VOCAB,
    assert_unchanged,
    build,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    snapshot,
    tiny_llama,
    tolerance,
)
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer

import funcadapt

GEOMETRIC = [c for c in CASES if c.geometric]
COEFFS = (1.0, -1.0, 0.5)
F64 = torch.float64


def labels_for(n: int, batch: int, seq: int) -> torch.Tensor:
    """One label tensor per coefficient, all different, stacked on a leading axis."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (n, batch, seq), generator=g)


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    """The tree's tensors that autograd can differentiate (some variants freeze part of the
    adapter, e.g. MiCA's lora_B)."""
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads(loss: torch.Tensor, tree: funcadapt.AdapterTree) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(trainable(tree).values()), allow_unused=True))


def assert_grads_close(got, want, tree, case):
    """Same tensors get a gradient, with the same values (up to the case's rounding, cases.tolerance);
    and the comparison is not vacuous."""
    nonzero = 0
    for key, g, w in zip(trainable(tree), got, want, strict=True):
        assert (g is None) == (w is None), f"{key}: gradient is None on one side only"
        if g is None:
            continue
        torch.testing.assert_close(g, w, **tolerance(w, case), msg=lambda m, key=key: f"grad of {key}: {m}")
        nonzero += bool(w.abs().max() > 0)
    assert nonzero > 0, "no adapter parameter received a non-zero gradient"


def f64_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the logits' dtype (float64 for gradcheck)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------
# 1. vmap over a coefficient axis == a Python loop (losses and parameter gradients)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vmap_loss_and_grads_equal_loop(case):
    model = build(case, dtype=F64)
    tree = funcadapt.extract(model)
    ids = inputs(batch=2, seq=6)["input_ids"]
    coeffs = torch.tensor(COEFFS, dtype=F64)
    labels = labels_for(len(coeffs), 2, 6)

    def loss_fn(c, lab):
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids, labels=lab).loss

    before = snapshot(model)
    losses = funcadapt.vmap(loss_fn, in_dims=(0, 0))(coeffs, labels)
    g_vmap = grads(losses.sum(), tree)
    assert_unchanged(model, before)

    loop = torch.stack([loss_fn(coeffs[i], labels[i]) for i in range(len(coeffs))])
    g_loop = grads(loop.sum(), tree)
    assert_unchanged(model, before)

    assert losses.shape == (len(coeffs),)
    torch.testing.assert_close(losses, loop, **tolerance(loop, case))
    assert_grads_close(g_vmap, g_loop, tree, case)


# ----------------------------------------------------------------------------
# 2. parameter gradients == gradients of the independent reference


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize(("c", "as_tensor"), [(-1.0, False), (2.0, True)], ids=["float-1", "tensor2"])
def test_param_grads_match_reference(case, c, as_tensor, monkeypatch):
    """Gradients reach the adapter parameters exactly as through y0 + c·(y1 − y0), where
    only y1 (PEFT's own forward) depends on them. Both coefficient paths: a Python number
    and a 0-d tensor."""
    model = build(case, dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=6)
    labels = labels_for(1, 2, 6)[0]
    coeff = torch.tensor(c, dtype=F64) if as_tensor else c

    before = snapshot(model)
    got = grads(funcadapt.call(model, funcadapt.transform(tree, coeff), **batch, labels=labels).loss, tree)
    assert_unchanged(model, before)

    for fix in case.notes.get("reference_fixes", ()):
        fix(monkeypatch)  # a PEFT bug the independent reference must not inherit (see the case)
    with reference_interpolation(model, c):
        want = grads(model(**batch, labels=labels).loss, tree)

    assert_grads_close(got, want, tree, case)


# ----------------------------------------------------------------------------
# 3./4. d(loss)/d(coeff) passes finite-difference gradcheck in float64


# batch 1, seq 4; small token ids so that token-level adapters (trainable tokens) act too
GRADCHECK_IDS = torch.tensor([[1, 2, 3, 5]])


def _gradcheck_coeff(case, mode: str, c0: float) -> None:
    model = build(case, dtype=F64)  # float64 throughout, also transformers' RMSNorm and softmax (cases.float64)
    tree = funcadapt.extract(model)
    ids = GRADCHECK_IDS

    def f(c):
        return f64_lm_loss(output(funcadapt.call(model, funcadapt.transform(tree, c, mode=mode), input_ids=ids)), ids)

    c = torch.tensor(c0, dtype=torch.float64, requires_grad=True)
    before = snapshot(model)
    (dc,) = torch.autograd.grad(f(c), c)
    # a derivative that is ~0 would make the check vacuous
    assert dc.abs() > 1e-4, f"d(loss)/dc = {dc.item():.3g}: the coefficient has (almost) no effect"
    # Where PEFT computes, in float32 whatever the model dtype, a part of the forward that c changes
    # (FourierFT's inverse FFT, HRA's y0, C3A's convolution, DeFT's update), float32 rounding of the loss
    # (~1e-7 of it) divided by the finite-difference step 2·eps must stay below gradcheck's atol: eps = 1e-3
    # makes that ~1e-4 (atol 1e-4 with rtol 1e-3 of |dc|), while truncation, O(eps²) = 1e-6, stays
    # negligible. Elsewhere gradcheck's float64 defaults hold, adaption prompt's float32 softmax included
    # (the gate c scales comes after it, so c reaches it only through the earlier layer's output).
    steps = {"eps": 1e-3, "atol": 1e-4} if case.rule in ("fourierft", "hra", "c3a", "deft") else {}
    assert torch.autograd.gradcheck(f, (c,), **steps)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradcheck_coeff_linear(case):
    _gradcheck_coeff(case, "linear", 0.7)


# ----------------------------------------------------------------------------
# 4. mode="geometric": vmap == loop, and gradcheck


@pytest.mark.parametrize("case", GEOMETRIC, ids=lambda c: c.id)
def test_vmap_equals_loop_geometric(case):
    model = build(case, dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=6)
    coeffs = torch.tensor(COEFFS, dtype=F64)

    def f(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c, mode="geometric"), **batch))

    before = snapshot(model)
    with torch.no_grad():
        got = funcadapt.vmap(f)(coeffs)
        want = torch.stack([f(c) for c in coeffs])
    assert_unchanged(model, before)
    assert not torch.allclose(want[0], want[1], atol=1e-4), "coefficients must change the output"
    torch.testing.assert_close(got, want, **tolerance(want, case))


@pytest.mark.parametrize("case", GEOMETRIC, ids=lambda c: c.id)
def test_gradcheck_coeff_geometric(case):
    _gradcheck_coeff(case, "geometric", 0.7)


# ----------------------------------------------------------------------------
# 5. train-mode dropout under vmap


def _dropout_lora():
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapters(model, seed=1)
    model.train()
    return model


def test_vmap_dropout_randomness():
    model = _dropout_lora()
    tree = funcadapt.extract(model)
    batch = inputs(batch=1, seq=4)
    coeffs = torch.tensor([1.0, 1.0])

    def f(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **batch))

    before = snapshot(model)
    with torch.no_grad():
        with model.disable_adapter():
            base = output(model(**batch))  # no LoRA, so no dropout: deterministic
        different = funcadapt.vmap(f)(coeffs)
        same = funcadapt.vmap(f, randomness="same")(coeffs)
        # torch.func.vmap's default randomness="error" refuses dropout: funcadapt's default matters
        with pytest.raises(RuntimeError, match="randomness"):
            torch.func.vmap(f)(coeffs)
    assert_unchanged(model, before)

    assert different.shape == same.shape == (2, *base.shape)
    for row in (*different, *same):
        assert not torch.allclose(row, base, atol=1e-4), "the adapter must act in every row"
    assert not torch.allclose(different[0], different[1], atol=1e-4), "randomness='different' shared one mask"
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------
# 6. per-adapter coefficient dicts


def _two_loras():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # "default" (adapter a) and "b" overlap on v_proj only: layers carry a alone, b alone, or both
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]))
    model.base_model.set_adapter(["default", "b"])
    randomize_adapters(model, seed=1)
    model.eval()
    return float64(model)


def _scaled_lora_reference(model, scales: dict[str, float], batch) -> torch.Tensor:
    """Each adapter's ΔW = s·B·A scaled by its own coefficient, by scaling lora_B (and
    nothing else) on a deep copy; the model under test is never touched."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, LoraLayer):
                for name, k in scales.items():
                    if name in module.lora_B:
                        module.lora_B[name].weight.mul_(k)
        return output(ref(**batch))


@pytest.mark.parametrize("c_b", [2.0, torch.tensor(2.0)], ids=["float", "tensor"])
def test_vmap_dict_coeff_two_adapters(c_b):
    model = _two_loras()
    tree = funcadapt.extract(model)
    assert tree.adapters == ("b", "default")
    assert {s.path.rsplit(".", 1)[1] for s in tree.layers if s.adapter == "b"} == {"v_proj", "o_proj"}
    batch = inputs(batch=2, seq=6)
    coeffs = torch.tensor(COEFFS, dtype=F64)

    def f(c_a):
        return output(funcadapt.call(model, funcadapt.transform(tree, {"default": c_a, "b": c_b}), **batch))

    before = snapshot(model)
    with torch.no_grad():
        got = funcadapt.vmap(f)(coeffs)
        loop = torch.stack([f(c) for c in coeffs])
    assert_unchanged(model, before)

    refs = torch.stack([_scaled_lora_reference(model, {"default": float(c), "b": float(c_b)}, batch) for c in coeffs])
    assert_unchanged(model, before)

    torch.testing.assert_close(got, loop, **TOL64)
    torch.testing.assert_close(loop, refs, **TOL64)
    # b is really at 2.0, not 1.0: the reference with b at 1 differs
    with torch.no_grad():
        b_at_one = _scaled_lora_reference(model, {"default": 1.0, "b": 1.0}, batch)
    assert not torch.allclose(b_at_one, refs[0], atol=1e-4)


@pytest.mark.parametrize("config", ["loha", "lokr"])
def test_lycoris_dropout_under_vmap(config):
    """LyCORIS module and rank dropout branch on random draws in PEFT; under funcadapt.vmap they
    become per-coefficient random factors (train mode runs, "same" randomness gives equal rows)."""
    from cases import randomize_adapters, tiny_llama
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(0)
    cls = LoHaConfig if config == "loha" else LoKrConfig
    model = get_peft_model(
        tiny_llama(), cls(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module_dropout=0.5, rank_dropout=0.3)
    )
    randomize_adapters(model)
    model = float64(model).train()
    before = snapshot(model)
    tree = funcadapt.extract(model)
    ids = inputs()["input_ids"]

    def logits(c):
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids).logits

    ones = torch.ones(2, dtype=F64)
    same = funcadapt.vmap(logits, randomness="same")(ones)
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    different = funcadapt.vmap(logits)(ones)
    assert different.shape == same.shape
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(funcadapt.vmap(logits)(ones)[0], model(input_ids=ids).logits, **TOL64)
    model.train()
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nested_contexts_under_vmap_multiply(case):
    """Two nested contexts inside a vmapped function: the inner coefficient acts on what the outer one
    shows, under vmap as in eager mode (a rule that swaps a forward for torch.func transforms must not
    install its swap again on top of the outer context's wrappers, which would bypass them). Reference:
    one context at the product, per coefficient, eagerly."""
    model = build(case, dtype=torch.float64)
    x = inputs()

    def nested(c):
        with funcadapt.AdapterModifier(model, "scale", 0.5), funcadapt.AdapterModifier(model, "scale", c):
            return output(model(**x))

    def single(c):
        with funcadapt.AdapterModifier(model, "scale", c):
            return output(model(**x))

    coeffs = torch.tensor([3.0, -1.0], dtype=torch.float64)
    with torch.no_grad():
        got = funcadapt.vmap(nested)(coeffs)
        want = torch.stack([single(0.5 * c) for c in coeffs])
        plain = output(model(**x))
    assert not torch.allclose(want[0], plain), "the coefficients must change the output for this test"
    torch.testing.assert_close(got, want, **tolerance(want, case))
