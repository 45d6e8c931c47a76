"""Focused checks for C3A, SHiRA, VB-LoRA, GraLoRA, Lily and Uni-LoRA that the generic
tests (which run every case in cases_additive1.py) do not make:

* the ``additive`` flag is true: two adapters of a family on one layer with *different*
  coefficients give y0 + c_a·(y_a − y0) + c_b·(y_b − y0), also under vmap and for 2-D input;
* shared tensors (VB-LoRA's bank, Uni-LoRA's θ, Lily's A and experts) are never
  transformed, and the forward-time scale gives ΔW(c) = c·ΔW exactly;
* PEFT's C3A: its autograd.Function has a wrong input gradient (pinned), funcadapt's
  gradients are the exact ones; several C3A adapters on one layer chain (pinned), and
  funcadapt interpolates such a layer jointly, nests, and refuses to invert it;
* Lily refuses per-row coefficients (its router averages over the batch).

Equalities are checked in float64 up to its rounding (cases.tolerance: float32 rounding where PEFT computes
part of the adapter in float32, as C3A's convolution).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from cases import (
    TOL64,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    tiny_llama,
    tolerance,
)
from cases_additive1 import CASES as ADDITIVE1
from cases_additive1 import ExactBlockCircularConvolution, fix_c3a_backward
from peft import C3AConfig, get_peft_model
from peft.tuners.c3a.utils import BlockCircularConvolution

import funcadapt
from funcadapt import AdapterModifier
from funcadapt.rules.base import rule_named
from funcadapt.rules.c3a import circular_convolution

pytestmark = pytest.mark.filterwarnings("ignore")

ADDITIVE = [c for c in ADDITIVE1 if rule_named(c.rule).additive]
F64 = torch.float64


def two_adapters(case_: Any, seed: int = 0) -> Any:
    """A tiny llama with two adapters of the case's family ("default" and "b") on the same layers."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), case_.config("llama"))
    model.add_adapter("b", case_.config("llama"))
    model.base_model.set_adapter(["default", "b"])
    randomize_adapters(model, seed=seed + 1)
    model.eval()
    return float64(model)


def q_proj(model: Any, i: int = 1) -> Any:
    return model.base_model.model.model.layers[i].self_attn.q_proj


@contextlib.contextmanager
def only(layer: Any, adapters: list[str]) -> Iterator[None]:
    """PEFT's own forward with just these adapters active (its ``_active_adapter`` switch)."""
    saved = layer._active_adapter
    layer._active_adapter = adapters
    try:
        yield
    finally:
        layer._active_adapter = saved


def test_additive_flags_are_what_the_module_docs_say():
    assert {c.rule for c in ADDITIVE} == {"shira", "vblora", "gralora", "lily", "unilora"}
    c3a = rule_named("c3a")
    assert not c3a.additive and not c3a.commutative  # PEFT chains several C3A adapters


# ----------------------------------------------------------------------------
# additive families: per-adapter coefficients on one layer


@pytest.mark.parametrize("case_", ADDITIVE, ids=lambda c: c.id)
@pytest.mark.parametrize("flat", [False, True], ids=["3d", "2d"])
def test_two_adapters_different_coefficients(case_, flat):
    model = two_adapters(case_)
    layer = q_proj(model)
    tree = funcadapt.extract(layer)
    assert {s.adapter for s in tree.layers} == {"default", "b"}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*((2,) if flat else (2, 5)), layer.in_features, generator=g, dtype=F64)
    with torch.no_grad():
        with only(layer, []):
            y0 = layer(x)
        with only(layer, ["default"]):
            ya = layer(x)
        with only(layer, ["b"]):
            yb = layer(x)
        y1 = layer(x)
    assert not torch.allclose(ya, y0, atol=1e-4) and not torch.allclose(yb, y0, atol=1e-4)
    tol = tolerance(y1, case_)
    torch.testing.assert_close(y1, ya + yb - y0, **tol)  # PEFT itself adds them

    def f(ca, cb):
        return funcadapt.call(layer, funcadapt.transform(tree, {"default": ca, "b": cb}), x)

    pairs = [(2.0, -0.5), (-1.0, 0.0), (0.5, 3.0)]
    with torch.no_grad():
        for ca, cb in pairs:
            want = y0 + ca * (ya - y0) + cb * (yb - y0)
            torch.testing.assert_close(f(ca, cb), want, **tol)
            torch.testing.assert_close(f(torch.tensor(ca, dtype=F64), torch.tensor(cb, dtype=F64)), want, **tol)
        ca, cb = (torch.tensor(p, dtype=F64) for p in zip(*pairs, strict=True))
        got = funcadapt.vmap(f)(ca, cb)
        want = torch.stack([y0 + a * (ya - y0) + b * (yb - y0) for a, b in pairs])
    torch.testing.assert_close(got, want, **tol)


# ----------------------------------------------------------------------------
# shared tensors are never transformed; the forward-time scale is exactly c·ΔW


SHARED = {"vblora": "vblora_vector_bank", "unilora": "unilora_theta_d", "lily": "lily_"}


@pytest.mark.parametrize("case_id", ["vblora", "unilora", "lily"])
def test_shared_tensors_untouched(case_id):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    shared = [k for k in tree.params if SHARED[case_id] in k]
    # PEFT shares these tensors across layers; the tree holds each once, under the name
    # named_parameters() gives it, though several layers' specs refer to it
    names = {id(p): n for n, p in model.named_parameters()}
    assert shared and all(names[id(tree.params[k])] == k for k in shared)
    assert len({id(tree.params[k]) for k in shared}) == len(shared)
    assert any(sum(key in s.keys.values() for s in tree.layers) > 1 for key in shared)
    for op, kw in (("scale", {"coeff": -1.5}), ("scale", {"coeff": 0.5, "mode": "geometric"}), ("invert", {})):
        params = funcadapt.transform(tree, op=op, **kw)
        assert all(params[k] is v for k, v in tree.params.items()), "a parameter was transformed"
        assert any(e.ops for e in params.effects)


@pytest.mark.parametrize("case_id", ["vblora", "unilora"])
def test_forward_time_scale_is_c_times_delta_weight(case_id):
    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    layer = q_proj(model, 0)
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        for c in (-1.0, 0.5, torch.tensor(2.0, dtype=F64)):
            with AdapterModifier(model, "scale", c):
                got = layer.get_delta_weight("default")
            torch.testing.assert_close(got, c * delta, **TOL64)
            with AdapterModifier(model, "scale", 3.0), AdapterModifier(model, "scale", c):  # nested: 3·c
                torch.testing.assert_close(layer.get_delta_weight("default"), 3 * c * delta, **TOL64)
        with AdapterModifier(model, "invert"):
            torch.testing.assert_close(layer.get_delta_weight("default"), -delta, rtol=0, atol=0)
        torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=0, atol=0)
    assert len(tree.layers) == 4


def test_lily_shares_across_layers_and_refuses_per_row():
    model = build(case("lily"))
    first, second = q_proj(model, 0), q_proj(model, 1)
    assert first.lily_B["default"] is second.lily_B["default"]  # experts shared by all q_proj layers
    assert first.lily_A["default"] is second.lily_A["default"]  # stride_A=2: both layers share A
    assert first.lily_router["default"] is not second.lily_router["default"]
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match="averages its expert weights over all tokens"):
        funcadapt.transform(tree, funcadapt.per_row([1.0, -1.0]))  # refused before anything runs
    assert first.scaling["default"] == 2.0


def test_lily_output_scale_is_per_layer():
    """The scale patch changes only the layer's own float ``scaling`` while a call runs, and
    restores the float object itself."""
    model = build(case("lily"))
    layer = q_proj(model, 0)
    s = layer.scaling["default"]
    with AdapterModifier(model, "scale", -0.5):
        assert layer.scaling["default"] == -0.5 * s
        with AdapterModifier(model, "scale", torch.tensor(4.0)):
            assert float(layer.scaling["default"]) == -2.0 * s
        assert layer.scaling["default"] == -0.5 * s
    assert layer.scaling["default"] is s


# ----------------------------------------------------------------------------
# C3A


def test_peft_c3a_input_gradient_is_wrong():
    """PEFT BUG (0.21.2): ``BlockCircularConvolution.backward`` returns a wrong gradient for
    the input x (its kernel gradient is right). The correct input gradient is
    Re FFT(Σₘ IFFT(gₘ) ⊙ conj(FFT(wₘₙ))); PEFT uses Re FFT(Σₘ FFT(gₘ) ⊙ IFFT(wₘₙ)).
    funcadapt's plain-op convolution has the same values and passes gradcheck."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w_only = x.detach()
    assert torch.autograd.gradcheck(lambda w: BlockCircularConvolution.apply(w_only, w), (w,))
    assert not torch.autograd.gradcheck(lambda x: BlockCircularConvolution.apply(x, w), (x,), raise_exception=False)
    assert torch.autograd.gradcheck(circular_convolution, (x, w))
    assert torch.autograd.gradcheck(ExactBlockCircularConvolution.apply, (x, w))  # the tests' corrected reference
    x32, w32 = x.detach().float(), w.detach().float()
    assert torch.equal(circular_convolution(x32, w32), BlockCircularConvolution.apply(x32, w32))


@pytest.mark.parametrize("c", [-1.0, 2.0])
def test_c3a_param_grads_match_corrected_reference(c, monkeypatch):
    """Gradients reach every kernel as through y0 + c·(y1 − y0) with PEFT's forward, once its
    input gradient is corrected; PEFT's own backward gives different (wrong) ones."""
    model = build(case("c3a"), dtype=F64)
    tree = funcadapt.extract(model)
    batch, labels = inputs(batch=2, seq=6), torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    keys = list(tree.params)

    def grads(loss):
        return torch.autograd.grad(loss, [tree.params[k] for k in keys])

    got = grads(funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss)
    with reference_interpolation(model, c):
        peft_own = grads(model(**batch, labels=labels).loss)
    fix_c3a_backward(monkeypatch)
    with reference_interpolation(model, c):
        want = grads(model(**batch, labels=labels).loss)
    for k, a, b in zip(keys, got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance(b, case("c3a")), msg=lambda m, k=k: f"{k}: {m}")
    first = keys.index(next(k for k in keys if ".layers.0." in k))
    assert not torch.allclose(peft_own[first], want[first], rtol=1e-3, atol=1e-6), "PEFT's backward got fixed?"


def test_c3a_gradcheck_at_float32_precision():
    """d loss/dc passes gradcheck; PEFT computes the convolution in float32 even in a float64
    model, so the finite-difference step must be one float32 rounding cannot swamp (as for
    FourierFT in the generic test, which explains eps and atol)."""
    from test_vmap_grad import GRADCHECK_IDS, f64_lm_loss

    model = build(case("c3a"), dtype=F64)
    tree = funcadapt.extract(model)
    ids = GRADCHECK_IDS
    for mode in ("linear", "geometric"):

        def f(c, mode=mode):
            out = funcadapt.call(model, funcadapt.transform(tree, c, mode=mode), input_ids=ids)
            return f64_lm_loss(output(out), ids)

        c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (c,), eps=1e-3, atol=1e-4)


def _two_c3a(target: str) -> Any:
    torch.manual_seed(0)
    config = C3AConfig(block_size=8, target_modules=[target])
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("b", C3AConfig(block_size=8, target_modules=[target]))
    model.base_model.set_adapter(["default", "b"])
    randomize_adapters(model, seed=1)
    return float64(model).eval()


def test_peft_c3a_chains_several_adapters():
    """PEFT BEHAVIOUR (0.21.2): C3ALinear.forward feeds each adapter the previous adapter's
    output, so two adapters give W·x + Δ₁x + Δ₂Δ₁x rather than W·x + Δ₁x + Δ₂x; on a
    non-square layer the second adapter cannot even run."""
    layer = q_proj(_two_c3a("q_proj"))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        base = layer.base_layer(x)
        d1 = layer.get_delta_weight("default")
        d2 = layer.get_delta_weight("b")
        y = layer(x)
    want = base + x @ d1.T + (x @ d1.T) @ d2.T
    torch.testing.assert_close(y, want, **tolerance(want, case("c3a")))
    assert not torch.allclose(y, base + x @ d1.T + x @ d2.T, atol=1e-4)

    v_proj = _two_c3a("v_proj").base_model.model.model.layers[0].self_attn.v_proj  # 32 → 16
    with pytest.raises(RuntimeError):
        v_proj(x)


def test_c3a_several_adapters_interpolated_jointly_nested_and_not_inverted():
    model = _two_c3a("q_proj")
    layer = q_proj(model)
    tree = funcadapt.extract(layer)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        y1 = layer(x)
        y0 = layer.base_layer(x)
        tol = tolerance(y1 - y0, case("c3a"))  # the interpolation is y0 + c·(y1 − y0): y1 − y0 carries the error
        for c in (-1.0, 0.5, 2.0):
            got = funcadapt.call(layer, funcadapt.transform(tree, c), x)
            torch.testing.assert_close(got, y0 + c * (y1 - y0), **tol)
        cs = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
        got = funcadapt.vmap(lambda c: funcadapt.call(layer, funcadapt.transform(tree, c), x))(cs)
        torch.testing.assert_close(got, torch.stack([y0 + c * (y1 - y0) for c in cs]), **tol)
        # nested contexts multiply, also where the outer one interpolates the layer's output
        with AdapterModifier(layer, "scale", 2.0), AdapterModifier(layer, "scale", -0.5):
            nested = layer(x)
        torch.testing.assert_close(nested, y0 - (y1 - y0), **tol)
    with pytest.raises(ValueError, match="commute"):
        funcadapt.transform(tree, op="invert")
