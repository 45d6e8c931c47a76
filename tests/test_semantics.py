"""What a coefficient means, per rule: c=1 is PEFT, c=0 is the base model, linear mode is
the independent per-layer reference y0 + c·(y1 − y0), exact fast paths equal the fallback. Bit-for-bit
claims are checked in the default float32; the others in float64 up to its rounding (cases.tolerance), and
bf16 against the float64 evaluation of the same weights (cases.assert_bf16_as_accurate)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    CASE_ARCH,
    CASES,
    TOL64,
    assert_bf16_as_accurate,
    build,
    float64,
    inputs,
    output,
    reference_interpolation,
    tolerance,
)

import funcadapt
from funcadapt import LayerEffect, Transformed
from funcadapt.ops import Interpolate
from funcadapt.rules.base import RULES

pytestmark = pytest.mark.filterwarnings("ignore")

CA_IDS = [f"{c.id}-{a}" for c, a in CASE_ARCH]


def run(model, params, arch="llama"):
    return output(funcadapt.call(model, params, **inputs(arch, dtype=next(model.parameters()).dtype)))


def test_registry_coverage():
    """Every registered rule has at least one case, so no rule ships untested (rules that only
    refuse a layer type are checked by test_errors.test_refusing_rules instead)."""
    assert {r.name for r in RULES if not r.unsupported} <= {c.rule for c in CASES}


@pytest.mark.parametrize(("case", "arch"), CASE_ARCH, ids=CA_IDS)
def test_endpoints(case, arch):
    model = build(case, arch)
    tree = funcadapt.extract(model)
    assert case.rule in {s.rule for s in tree.layers}
    with torch.no_grad():
        y1 = output(model(**inputs(arch)))
        with model.disable_adapter():
            y0 = output(model(**inputs(arch)))
        assert not torch.allclose(y0, y1, atol=1e-4), "adapter must be non-trivial for this test to mean anything"
        # c = 1 as a number is the identity, bit for bit; as a tensor it goes through the transform,
        # which is exact at its endpoints (torch.lerp, re-encodings pinned), so bit for bit too
        assert torch.equal(run(model, funcadapt.transform(tree, 1.0), arch), y1)
        assert torch.equal(run(model, funcadapt.transform(tree, torch.tensor(1.0)), arch), y1)
        # c = 0 and op="disable" are exactly the base model
        assert torch.equal(run(model, funcadapt.transform(tree, None, "disable"), arch), y0)
        assert torch.equal(run(model, funcadapt.transform(tree, 0.0), arch), y0)
        assert torch.equal(run(model, funcadapt.transform(tree, torch.tensor(0.0)), arch), y0)


@pytest.mark.parametrize(("case", "arch"), CASE_ARCH, ids=CA_IDS)
@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_linear_matches_reference(case, arch, c):
    model = build(case, arch, dtype=torch.float64)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        with reference_interpolation(model, c):
            ref = output(model(**inputs(arch, dtype=torch.float64)))
        got = run(model, funcadapt.transform(tree, c), arch)
        got_t = run(model, funcadapt.transform(tree, torch.tensor(c, dtype=torch.float64)), arch)
    torch.testing.assert_close(got, ref, **tolerance(ref, case))
    torch.testing.assert_close(got_t, ref, **tolerance(ref, case))


def _fallback(tree, c):
    """The same coefficient through the generic output-interpolation fallback only."""
    return Transformed(tree, tuple(LayerEffect(spec, ops=(Interpolate(c),)) for spec in tree.layers))


@pytest.mark.parametrize("case", [c for c in CASES if c.rule not in ("dora", "lora-variant")], ids=lambda c: c.id)
@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_fast_path_equals_fallback(case, c):
    model = build(case, dtype=torch.float64)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        fast = run(model, funcadapt.transform(tree, c))
        slow = run(model, _fallback(tree, c))
    torch.testing.assert_close(fast, slow, **tolerance(slow, case))


def _bf16_param(case):
    """A case whose note ``peft_bf16_bug`` says why PEFT's own forward raises after ``model.to(bfloat16)``
    runs as a strict xfail: it must still raise (a test in the case's own test file pins the bug), and
    a PEFT fix turns it into a failure that asks for the note to go."""
    reason = case.notes.get("peft_bf16_bug")
    if not reason:
        return case
    return pytest.param(case, marks=pytest.mark.xfail(raises=RuntimeError, strict=True, reason=reason))


@pytest.mark.parametrize("case", [_bf16_param(c) for c in CASES if c.archs and "llama" in c.archs], ids=lambda c: c.id)
def test_bf16(case):
    model = build(case, dtype=torch.bfloat16)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        y1 = output(model(**inputs()))
        with model.disable_adapter():
            y0 = output(model(**inputs()))
        assert torch.equal(run(model, funcadapt.transform(tree, 1.0)), y1)
        assert torch.equal(run(model, funcadapt.transform(tree, None, "disable")), y0)
        with reference_interpolation(model, -1.0):
            ref = output(model(**inputs()))
        got = run(model, funcadapt.transform(tree, torch.tensor(-1.0)))
        exact = float64(copy.deepcopy(model))  # the same bf16 weights, evaluated in float64
        with reference_interpolation(exact, -1.0):
            want = output(exact(**inputs()))
    assert got.dtype == torch.bfloat16
    assert_bf16_as_accurate(got, ref, want, wrong=y1)


def test_bare_model_with_injected_adapters_and_single_layer():
    """extract works on a plain torch model with adapters injected (no PeftModel), and on one layer."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), net).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    tree = funcadapt.extract(net)
    assert len(tree.layers) == 2
    assert all(tree.params[k] is p for k, p in net.named_parameters() if k in tree.params)
    with torch.no_grad():
        y1 = net(x)
        with reference_interpolation(net, -1.0):
            ref = net(x)
        torch.testing.assert_close(funcadapt.call(net, funcadapt.transform(tree, -1.0), x), ref, **TOL64)
        assert torch.equal(funcadapt.call(net, funcadapt.transform(tree, 1.0), x), y1)
        layer = net[0]
        sub = funcadapt.extract(layer)
        assert set(sub.params) == {"lora_A.default.weight", "lora_B.default.weight"}
        h = torch.randn(3, 8, dtype=torch.float64)
        delta = layer(h) - layer.base_layer(h)
        torch.testing.assert_close(
            funcadapt.call(layer, funcadapt.transform(sub, 2.0), h), layer.base_layer(h) + 2 * delta, **TOL64
        )
