"""Forward-time ops (funcadapt.ops) are a closed set of typed values, pytrees of their coefficients.

Every rule, in every mode and op it supports, returns ops of that set only; each op flattens to its
coefficients and back; a rule's ``patches`` receives only the rule's own ops (the output
interpolations are funcadapt.interpret's). What the ops *do* is checked against independent
references everywhere else in the suite.
"""

from __future__ import annotations

import contextlib
import typing

import pytest
import torch
import torch.utils._pytree as pytree
from cases import CASES, build, inputs

import funcadapt
from funcadapt import ops
from funcadapt.rules.base import rule_named

OP_TYPES = typing.get_args(ops.ForwardOp)
RULE_OP_TYPES = typing.get_args(ops.RuleOp)


def _transforms(tree: funcadapt.AdapterTree) -> list[funcadapt.Transformed]:
    """The tree transformed every way its family allows (refusals are tested in test_errors and per rule)."""
    out = [funcadapt.transform(tree, torch.tensor(-1.0))]
    for kwargs in (
        {"coeff": funcadapt.per_row([0.5, 2.0])},
        {"coeff": 0.5, "mode": "geometric"},
        {"op": "invert"},
    ):
        with contextlib.suppress(ValueError):
            out.append(funcadapt.transform(tree, **kwargs))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_rule_returns_ops_of_the_closed_set(case):
    model = build(case)
    tree = funcadapt.extract(model)
    for params in _transforms(tree):
        for e in params.effects:
            assert isinstance(e.ops, tuple)
            for op in e.ops:
                assert isinstance(op, OP_TYPES), f"{e.spec.path}: {op!r} is not a funcadapt.ops op"
                leaves, spec = pytree.tree_flatten(op)
                assert all(isinstance(leaf, float | int | torch.Tensor) for leaf in leaves), op
                assert pytree.tree_unflatten(leaves, spec) == op


def test_ops_flatten_to_their_coefficients():
    c = torch.tensor(-1.0)
    rows = torch.tensor([1.0, 2.0])
    cases = [
        (ops.Interpolate(c), [c]),
        (ops.InterpolateRows(rows), [rows]),
        (ops.ScaleInside(0.5), [0.5]),
        (ops.Rotate("generator", c), [c]),
        (ops.Rotate("inverse"), [1.0]),
        (ops.ReverseChain(), []),
    ]
    for op, want in cases:
        leaves, spec = pytree.tree_flatten(op)
        same = [a is b or (not isinstance(a, torch.Tensor) and a == b) for a, b in zip(leaves, want, strict=True)]
        assert len(leaves) == len(want) and all(same), op
        rebuilt = pytree.tree_unflatten([3 * leaf for leaf in leaves], spec)
        assert type(rebuilt) is type(op) and vars(rebuilt).keys() == vars(op).keys()
        for name, value in vars(op).items():
            got = getattr(rebuilt, name)
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got, 3 * value, rtol=0, atol=0)
            elif name in ("coeff", "coeffs"):
                assert got == 3 * value
            else:
                assert got == value  # static fields (Rotate.how) travel in the spec


def test_a_rule_receives_only_its_own_ops():
    """OFT on Conv2d in linear mode asks for the output interpolation (funcadapt.interpret's), so OFT's
    own patches get no op there; on Linear they get its Rotate."""
    case = next(c for c in CASES if c.rule == "oft" and "cnn" in (c.archs or ()))
    rule = rule_named("oft")
    real = rule.patches
    assert real is not None
    for arch, want in (("cnn", ()), ("llama", (ops.Rotate,))):
        model = build(case, arch=arch)
        params = funcadapt.transform(funcadapt.extract(model), -1.0)
        assert bool(params.ops_of(ops.Interpolate)) == (arch == "cnn")
        seen: list[tuple] = []

        def spy(layer, adapter, given, seen=seen):
            seen.append(given)
            return real(layer, adapter, given)

        object.__setattr__(rule, "patches", spy)  # Rule is frozen
        try:
            with torch.no_grad():
                funcadapt.call(model, params, **inputs(arch))
        finally:
            object.__setattr__(rule, "patches", real)
        assert seen and all(tuple(type(op) for op in given) == want for given in seen), (arch, seen)
