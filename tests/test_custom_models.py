"""PEFT's custom-model matrix (tests/custom_models.py): every (model, config) case is either
exact or refused, and which one is written down here.

Exact means: ``extract`` works; c = 1.0 (a float) is PEFT's forward bit for bit; c = 0 and
op="disable" are ``with model.disable_adapter()``; mode="linear" at c = −1 and 0.5 (number
and 0-d tensor) equals the independent per-layer reference y0 + c·(y1 − y0); vmap over c
equals a loop (values and parameter gradients); parameter gradients at c = −1 equal the
reference's; the model is unchanged afterwards. The models are float64 (custom_models.build), so
"equals" is up to float64 rounding (cases.TOL64), or float32 rounding for the families PEFT computes
partly in float32 (custom_models.FLOAT32_INSIDE).

Refused means: a ``ValueError`` that names the layer or adapter, gives the reason listed in
:data:`REFUSED` and says what to do, with the model unchanged afterwards.

An unexpected refusal fails, and so does an unexpected success: when a rule lands for a
family, delete its entry from :data:`NO_RULE_YET` (or :data:`REFUSED`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from cases import snapshot, tolerance
from custom_models import CASES, FLOAT32_INSIDE, CustomCase, build, family, inputs

import funcadapt
from funcadapt.rules.base import is_adapter_layer

pytestmark = pytest.mark.filterwarnings("ignore")

# ----------------------------------------------------------------------------
# Expectations. Keys are regular expressions searched in the case id
# ("<family>-<model>-<tag>"); at most one entry of REFUSED may match a case.

NO_RULE_YET: tuple[str, ...] = ()
"""Families funcadapt has no rule for: ``extract`` refuses them by layer class."""

REFUSED: dict[str, str] = {
    **{rf"^{family}-": "which funcadapt has no rule for yet" for family in NO_RULE_YET},
}
"""case-id pattern -> a substring of the expected refusal message."""

PEFT_BUGS: dict[str, tuple[str, str]] = {
    # HadaWeightCP.backward (LoHa with use_effective_conv2d on a k×k conv) builds the gradients of
    # hada_w1_a / hada_w2_a from the *other* factor's Tucker product (temp = t2·w2b for w1a), so
    # torch.autograd.gradcheck(make_weight_cp, ...) fails. funcadapt's vmap-safe plain-op forward
    # differentiates correctly, so vmap (correct) != loop (PEFT's wrong backward).
    r"^loha-conv.*-eff$": ("test_vmap_and_grads", "LoHa CP HadaWeightCP.backward gives wrong w1a/w2a grads"),
    # lora.MultiheadAttention.merge adds out_proj's ΔW twice (once itself, once via out_proj.merge;
    # huggingface/peft PR #3774), the second time through ``.data``, outside autograd. Its forward
    # (every call merges) therefore runs W_out + 2·ΔW_out while its backward sees one ΔW_out: the
    # out_proj factors' gradients are half those of the function PEFT computes. funcadapt runs the
    # same values and differentiates them exactly (vmap == loop still holds); pinned, with the
    # gradients checked against an independent reference, in test_lora_layers.py.
    r"^lora-mha-": ("test_vmap_and_grads", "LoRA MHA backward sees out_proj's ΔW once, its forward twice"),
}
"""case-id pattern -> (test name, why PEFT itself is wrong there): that test is xfail(strict=True)."""

PEFT_REREGISTERS = {"mha": ("mha.base_layer.in_proj_weight", "mha.base_layer.out_proj.base_layer.weight")}
"""model -> parameters PEFT itself replaces by new Parameter objects on every named_modules() /
state_dict() call (lora.MultiheadAttention._restore_weights) and on every forward of its own
(merge/unmerge; funcadapt's forward for that layer does neither): their values are still
compared, their object identity cannot be."""

ACTION = re.compile(
    r"\b(use|exclude|call|unmerge|activate|train|pass|set|open an issue|remove|give|drop|switch|convert)\b", re.I
)


def expected_refusal(case: CustomCase) -> str | None:
    hits = [reason for pattern, reason in REFUSED.items() if re.search(pattern, case.id)]
    assert len(hits) <= 1, f"{case.id}: several REFUSED entries match"
    return hits[0] if hits else None


def _params(cases: list[CustomCase], test: str) -> list[Any]:
    out = []
    for c in cases:
        bugs = [why for pattern, (t, why) in PEFT_BUGS.items() if t == test and re.search(pattern, c.id)]
        marks = [pytest.mark.xfail(strict=True, reason=f"PEFT bug: {bugs[0]}")] if bugs else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


EXACT = [c for c in CASES if expected_refusal(c) is None]

# ----------------------------------------------------------------------------
# Helpers


def snapshot_of(case: CustomCase, model: torch.nn.Module) -> dict[str, Any]:
    state = snapshot(model)
    for suffix in PEFT_REREGISTERS.get(case.model, ()):
        for key in [k for k in state["ids"] if k.endswith(suffix)]:
            del state["ids"][key]
    return state


def assert_same(case: CustomCase, model: torch.nn.Module, before: dict[str, Any]) -> None:
    """cases.assert_unchanged, less the object identities PEFT itself does not keep."""
    after = snapshot_of(case, model)
    assert after["ids"] == before["ids"], "Parameter objects were replaced"
    for key in ("buffer_ids", "grad", "training", "dicts", "classes"):
        assert after[key] == before[key], f"model changed: {key}"
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert v.dtype == after["state"][k].dtype and torch.equal(v, after["state"][k]), f"{k} changed"


def adapter_paths(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_adapter_layer(module)]


@contextmanager
def reference_interpolation(model: torch.nn.Module, coeff: float) -> Iterator[None]:
    """Independent reference for mode='linear': every adapter layer's output (any pytree of
    tensors: MultiheadAttention returns a tuple) becomes y0 + c·(y1 − y0), y0 computed by
    PEFT with that layer's adapters switched off. Forward hooks and PEFT's own
    ``_disable_adapters`` flag only, nothing from funcadapt."""

    def lerp(y0: Any, y1: Any) -> Any:
        if isinstance(y0, torch.Tensor) and y0.is_floating_point():
            return y0 + coeff * (y1 - y0)
        return y1

    def hook(module: Any, args: tuple, kwargs: dict, y1: Any) -> Any:
        module._disable_adapters = True
        try:
            y0 = module.forward(*args, **kwargs)
        finally:
            module._disable_adapters = False
        return pytree.tree_map(lerp, y0, y1)

    handles = [
        module.register_forward_hook(hook, with_kwargs=True)
        for _, module in model.named_modules()
        if is_adapter_layer(module)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def weights_like(y: torch.Tensor, n: int | None = None, seed: int = 7) -> torch.Tensor:
    """Fixed random loss weights: loss = Σ w·y (one set per coefficient when n is given)."""
    g = torch.Generator().manual_seed(seed)
    shape = y.shape if n is None else (n, *y.shape)
    return torch.randn(shape, generator=g).to(y.dtype)


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads(loss: torch.Tensor, tree: funcadapt.AdapterTree) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(trainable(tree).values()), allow_unused=True))


def tol(case: CustomCase, want: torch.Tensor) -> dict[str, float]:
    """float64's tolerance, or float32 rounding's where PEFT computes part of the case in float32."""
    return tolerance(want, FLOAT32_INSIDE.get(family(case), False))


def assert_grads_close(case: CustomCase, got: list, want: list, tree: funcadapt.AdapterTree) -> None:
    nonzero = 0
    for key, g, w in zip(trainable(tree), got, want, strict=True):
        assert (g is None) == (w is None), f"{key}: gradient is None on one side only"
        if g is None:
            continue
        torch.testing.assert_close(g, w, **tol(case, w), msg=lambda m, key=key: f"grad of {key}: {m}")
        nonzero += bool(w.abs().max() > 0)
    assert nonzero > 0, "no adapter parameter received a non-zero gradient"


# ----------------------------------------------------------------------------
# Tests


def test_expectation_table_is_live():
    """Every REFUSED / PEFT_BUGS pattern matches some case (stale entries are an error)."""
    assert not set(PEFT_REREGISTERS) - {c.model for c in CASES}
    for pattern in [*REFUSED, *PEFT_BUGS]:
        assert any(re.search(pattern, c.id) for c in CASES), f"pattern {pattern!r} matches no case"


@pytest.mark.parametrize("case", _params(CASES, "test_exact_or_refused"))
def test_exact_or_refused(case: CustomCase):
    model = build(case)
    x = inputs(case)
    with torch.no_grad():
        y1 = model(x)
        with model.disable_adapter():
            y0 = model(x)
    before = snapshot_of(case, model)

    reason = expected_refusal(case)
    refusal = None
    try:
        tree = funcadapt.extract(model)
        with torch.no_grad():
            funcadapt.call(model, funcadapt.transform(tree, -1.0), x)
    except ValueError as err:
        refusal = err
    assert_same(case, model, before)

    if reason is not None:
        assert refusal is not None, f"{case.id} is listed in REFUSED ({reason!r}) but now works: update the table"
        msg = str(refusal)
        assert reason in msg, f"{case.id}: refused for another reason than expected: {msg}"
        names = [f"'{p}'" for p in adapter_paths(model)] + ["'default'"]
        assert any(n in msg for n in names), f"refusal names no layer or adapter: {msg}"
        assert ACTION.search(msg), f"refusal does not say what to do: {msg}"
        return
    if refusal is not None:
        raise AssertionError(f"{case.id}: unexpected refusal (add it to REFUSED if intended): {refusal}") from refusal

    assert not torch.allclose(y0, y1, atol=1e-4), "adapter must be non-trivial for this test to mean anything"
    with torch.no_grad():
        # c = 1.0 as a number is the identity, bit for bit
        assert torch.equal(funcadapt.call(model, funcadapt.transform(tree, 1.0), x), y1)
        # c = 0 and op="disable" are the base model (bit for bit, except for HRA in float64: funcadapt's
        # base output there is PEFT's HRA forward with no active adapter, which rounds to float32)
        disabled = funcadapt.call(model, funcadapt.transform(tree, None, "disable"), x)
        if family(case) == "hra":
            torch.testing.assert_close(disabled, y0, **tol(case, y0))
        else:
            assert torch.equal(disabled, y0)
        y = funcadapt.call(model, funcadapt.transform(tree, 0.0), x)
        torch.testing.assert_close(y, y0, **tol(case, y0))
        # linear mode == the per-layer reference, for a number and a 0-d tensor
        for c in (-1.0, 0.5):
            with reference_interpolation(model, c):
                ref = model(x)
            for coeff in (c, torch.tensor(c)):
                got = funcadapt.call(model, funcadapt.transform(tree, coeff), x)
                torch.testing.assert_close(got, ref, **tol(case, ref), msg=lambda m, c=coeff: f"c={c!r}: {m}")
    assert_same(case, model, before)


@pytest.mark.parametrize("case", _params(EXACT, "test_vmap_and_grads"))
def test_vmap_and_grads(case: CustomCase):
    """vmap over c == a loop (values and gradients); gradients at c = −1 == the reference's."""
    model = build(case)
    x = inputs(case)
    tree = funcadapt.extract(model)
    coeffs = torch.tensor([1.0, -1.0, 0.5])
    with torch.no_grad():
        w = weights_like(model(x), n=len(coeffs))

    def loss_fn(c: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        return (funcadapt.call(model, funcadapt.transform(tree, c), x) * wc).sum()

    before = snapshot_of(case, model)
    losses = funcadapt.vmap(loss_fn)(coeffs, w)
    g_vmap = grads(losses.sum(), tree)
    loop = torch.stack([loss_fn(coeffs[i], w[i]) for i in range(len(coeffs))])
    g_loop = grads(loop.sum(), tree)
    assert_same(case, model, before)
    torch.testing.assert_close(losses, loop, **tol(case, loop))
    assert_grads_close(case, g_vmap, g_loop, tree)

    got = grads((funcadapt.call(model, funcadapt.transform(tree, -1.0), x) * w[1]).sum(), tree)
    with reference_interpolation(model, -1.0):
        want = grads((model(x) * w[1]).sum(), tree)
    assert_same(case, model, before)
    assert_grads_close(case, got, want, tree)
