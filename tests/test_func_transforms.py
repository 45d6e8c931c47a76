"""torch.func.grad / jacrev over the coefficient agree with plain autograd, for every rule (in float64, up to
its rounding: cases.tolerance)."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, assert_unchanged, build, inputs, output, snapshot, tolerance

import funcadapt

pytestmark = pytest.mark.filterwarnings("ignore")
F64 = torch.float64


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_func_grad_and_jacrev_over_coefficient(case):
    model = build(case, dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs(batch=1, seq=4)
    before = snapshot(model)

    def loss(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)).square().mean()

    c = torch.tensor(0.7, dtype=F64, requires_grad=True)
    value = loss(c)
    (want,) = torch.autograd.grad(value, c)
    # d loss/dc sums terms of the loss's size, which can cancel to a much smaller derivative: rounding
    # (float32's, where PEFT computes part of the case in it) is relative to the loss, not to d loss/dc
    tol = tolerance(value.detach(), case)
    got = torch.func.grad(loss)(torch.tensor(0.7, dtype=F64))
    torch.testing.assert_close(got, want, **tol)

    def two(cs):  # d(two losses)/d(two coefficients) = diag
        return torch.stack([loss(cs[0]), loss(cs[1])])

    jac = torch.func.jacrev(two)(torch.tensor([0.7, -1.0], dtype=F64))
    torch.testing.assert_close(jac[0, 0], want, **tol)
    assert jac[0, 1] == 0 and jac[1, 0] == 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["lora", "dora", "ia3", "oft", "road_1", "randlora"])
def test_pure_training_step_with_func_grad_over_params(case_id):
    """The functional-loop style: torch.func.grad over the adapter pytree (tree.with_params),
    equals autograd on the model's own Parameters."""
    from cases import case

    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs(batch=2, seq=6)
    trainable = {k: v for k, v in tree.params.items() if v.requires_grad}

    def loss(params, c):
        full = {**tree.params, **params}
        out = funcadapt.call(model, funcadapt.transform(tree.with_params(full), c), **batch)
        return output(out).square().mean()

    detached = {k: v.detach() for k, v in trainable.items()}
    got = torch.func.grad(loss)(detached, torch.tensor(-1.0, dtype=F64))
    want = torch.autograd.grad(loss(trainable, torch.tensor(-1.0, dtype=F64)), list(trainable.values()))
    for (k, g), w in zip(got.items(), want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(w, case(case_id)), msg=k)
