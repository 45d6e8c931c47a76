"""The architecture conformance matrix: one test per (architecture, adapter, path) cell.

The data (architectures, adapters, expected outcomes) and the independent references live in
tests/architectures.py, which also renders docs/architectures.md. Every cell asserts what the table
claims: *exact* (funcadapt equals the reference to architectures.RTOL/ATOL in float64), a declared
refusal (that error, with that message: an unexpected success fails), or a pending fix (a strict
xfail that accepts only the recorded failure); and the model is unchanged afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from architectures import (
    ADAPTERS,
    ARCHS,
    ATOL,
    BATCH,
    COEFFS,
    DOC,
    EXPLICIT_TARGETS,
    NOT_BUILDABLE,
    PENDING_FIX,
    RTOL,
    UNMATCHED_TARGETS,
    VMAP_COEFFS,
    Cell,
    Generated,
    Refusal,
    batch,
    batch_prompt,
    build_peft,
    built,
    cells,
    expected,
    greedy,
    labels,
    peft_scaled_logits,
    reference_generation,
    reference_logits,
    reference_loss_grads,
    reference_token_generation,
    reference_token_logits,
    render_doc,
    step_logits,
    targets,
    token_loss,
    token_values,
    trainable,
)
from cases import adapter_layers, assert_unchanged
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import funcadapt

pytestmark = pytest.mark.filterwarnings("ignore")


def assert_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """|got − want| ≤ ATOL + RTOL·|want| elementwise; a failure says whether it is at float32 precision
    (max |Δ| ≤ 1e-5·max |want|: a float32 detour) or beyond (a wrong result)."""

    def message(details: str) -> str:
        relative = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        level = "at float32 precision" if relative <= 1e-5 else "beyond float32 precision"
        return f"{what}: differs {level} (max |Δ| / max |want| = {relative:.1e}). {details}"

    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=message)


def assert_same_as_references(arch: str, adapter: str, c: float, got: torch.Tensor, what: str) -> None:
    """Logits at c equal the hook reference, and for LoRA PEFT's own scaling too."""
    assert_exact(got, reference_logits(arch, adapter, c), f"{what} vs y0 + c·(y1 − y0)")
    if adapter == "lora":
        assert_exact(got, peft_scaled_logits(arch, c), f"{what} vs PEFT's scaling × c")


# ----------------------------------------------------------------------------
# the paths


def check_call(arch: str, adapter: str) -> None:
    """funcadapt.call(model, transform(extract(model), c)) at every c, as a float and a 0-d tensor."""
    model = built(arch, adapter).model
    tree = funcadapt.extract(model)
    for c in COEFFS:
        for coeff in (c, torch.tensor(c)):
            with torch.no_grad():
                got = funcadapt.call(model, funcadapt.transform(tree, coeff), **batch(arch)).logits
            assert_same_as_references(arch, adapter, c, got, f"call at {coeff!r}")


def check_modifier(arch: str, adapter: str) -> None:
    """with AdapterModifier(model, "scale", c): model(**batch)."""
    model = built(arch, adapter).model
    for c in COEFFS:
        with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", c):
            got = model(**batch(arch)).logits
        assert_same_as_references(arch, adapter, c, got, f"AdapterModifier at {c}")


def check_vmap(arch: str, adapter: str) -> None:
    """losses = vmap(c, labels ↦ loss(call(model, transform(tree, c))))(VMAP_COEFFS, labels), and
    ∂(Σ losses)/∂θ for every trainable adapter Parameter θ, equal the reference loop."""
    model = built(arch, adapter).model
    tree = funcadapt.extract(model)
    inputs = batch(arch)

    def loss(c: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_loss(funcadapt.call(model, funcadapt.transform(tree, c), **inputs).logits, target)

    coeffs = torch.tensor(VMAP_COEFFS, dtype=torch.float64)
    losses = funcadapt.vmap(loss)(coeffs, labels(arch, len(VMAP_COEFFS)))
    params = trainable(model)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    want_losses, want_grads = reference_loss_grads(arch, adapter)
    assert_exact(losses.detach(), want_losses, "vmapped losses")
    for name, g, w in zip(params, grads, want_grads, strict=True):
        assert_exact(g, w, f"gradient of {name}")
    assert any(w.abs().max() > 0 for w in want_grads), "no adapter Parameter has a non-zero gradient"


def check_per_row(arch: str, adapter: str) -> None:
    """Row group k of the tiled batch at per_row(COEFFS, repeat=BATCH) equals a separate run at COEFFS[k]."""
    model = built(arch, adapter).model
    coeffs = funcadapt.per_row(torch.tensor(COEFFS, dtype=torch.float64), repeat=BATCH)
    params = funcadapt.transform(funcadapt.extract(model), coeffs)
    with torch.no_grad():
        got = funcadapt.call(model, params, **funcadapt.tile(batch(arch), len(COEFFS))).logits
    for k, c in enumerate(COEFFS):
        assert_same_as_references(arch, adapter, c, got[k * BATCH : (k + 1) * BATCH], f"per_row group at {c}")


def check_generate(arch: str, adapter: str) -> None:
    """One greedy generate() (KV cache) on the tiled prompts with a coefficient per row: row group k has
    the tokens and the float64 step logits of a separate generate() at COEFFS[k] under the reference."""
    model = built(arch, adapter).model
    coeffs = funcadapt.per_row(torch.tensor(COEFFS, dtype=torch.float64), repeat=BATCH)
    prompts = funcadapt.tile(batch_prompt(arch), len(COEFFS))
    with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", coeffs), step_logits(model) as steps:
        got = Generated(model.generate(**prompts, generation_config=greedy()), torch.stack(steps, dim=1))
    for k, c in enumerate(COEFFS):
        rows = slice(k * BATCH, (k + 1) * BATCH)
        want = reference_generation(arch, adapter, c)
        assert torch.equal(got.sequences[rows], want.sequences), f"generated tokens at {c} differ"
        assert_exact(got.logits[rows], want.logits, f"generate() step logits at {c}")


def check_per_token(arch: str, adapter: str) -> None:
    """funcadapt.call at per_token(values) ([BATCH, SEQ + NEW_TOKENS]) equals the token-by-token hook reference."""
    model = built(arch, adapter).model
    params = funcadapt.transform(funcadapt.extract(model), funcadapt.per_token(token_values(arch)))
    with torch.no_grad():
        got = funcadapt.call(model, params, **batch(arch)).logits
    assert_exact(got, reference_token_logits(arch, adapter), "per_token logits vs y0 + c[b, t]·(y1 − y0)")


TOKEN_GENERATE_ATOL = 1e-8
"""Cached and uncached decoding differ by float rounding without funcadapt (~3e-10 where a model takes
attention scores in float32, GPT-J and CodeGen): the step logits of this path are compared to this."""


def check_per_token_generate(arch: str, adapter: str) -> None:
    """generate() with a KV cache under per_token(values): the tokens, and the float64 step logits to
    TOKEN_GENERATE_ATOL, of a greedy loop that re-runs the whole sequence without a cache under the
    per-token hook reference."""
    model = built(arch, adapter).model
    coeffs = funcadapt.per_token(token_values(arch))
    with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", coeffs), step_logits(model) as steps:
        sequences = model.generate(**batch_prompt(arch), generation_config=greedy())
    want = reference_token_generation(arch, adapter)
    assert torch.equal(sequences, want.sequences), "generated tokens differ"
    torch.testing.assert_close(torch.stack(steps, dim=1), want.logits, rtol=0, atol=TOKEN_GENERATE_ATOL)


CHECKS: dict[str, Callable[[str, str], None]] = {
    "call": check_call,
    "modifier": check_modifier,
    "vmap": check_vmap,
    "per_row": check_per_row,
    "generate": check_generate,
    "per_token": check_per_token,
    "per_token_generate": check_per_token_generate,
}


# ----------------------------------------------------------------------------
# the matrix


class PendingFailure(Exception):
    """A pending-fix cell failed the way PENDING_FIX records (anything else fails the test)."""


def run_pending(cell: Cell) -> None:
    what = PENDING_FIX[cell]
    try:
        CHECKS[cell[2]](*cell[:2])
    except Exception as error:
        if what in str(error):  # no chained traceback: pytest would format it for every xfail (~0.15 s each)
            raise PendingFailure(what) from None
        raise


def _param(cell: Cell) -> object:
    marks = []
    if cell in PENDING_FIX:
        marks.append(pytest.mark.xfail(strict=True, raises=PendingFailure, reason=PENDING_FIX[cell]))
    return pytest.param(cell, id="-".join(cell), marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in cells()])
def test_cell(cell: Cell) -> None:
    arch, adapter, path = cell
    outcome = expected(cell)
    try:
        if isinstance(outcome, Refusal):
            with pytest.raises(outcome.error, match=re.escape(outcome.match)):
                CHECKS[path](arch, adapter)
        elif outcome == "pending fix":
            run_pending(cell)
        else:
            CHECKS[path](arch, adapter)
    finally:  # after an error too: funcadapt restores the model on every exit
        assert_unchanged(built(arch, adapter).model, built(arch, adapter).pristine)


@pytest.mark.parametrize(("arch", "adapter"), list(NOT_BUILDABLE))
def test_peft_cannot_build(arch: str, adapter: str) -> None:
    """The pairs listed as unbuildable still are (else they belong in the matrix)."""
    with pytest.raises(Exception, match=re.escape(NOT_BUILDABLE[(arch, adapter)])):
        build_peft(arch, adapter)


@pytest.mark.parametrize(("arch", "adapter"), list(EXPLICIT_TARGETS))
def test_explicit_targets_are_needed(arch: str, adapter: str) -> None:
    """PEFT's default still fails where targets are named explicitly (else the default belongs in the matrix)."""
    default = ADAPTERS[adapter].config_class(**ADAPTERS[adapter].options)
    with pytest.raises(Exception, match=re.escape(EXPLICIT_TARGETS[(arch, adapter)].default_fails)):
        get_peft_model(ARCHS[arch].build(), default)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_targets_are_what_the_doc_says(adapter: str) -> None:
    """The adapted layers are exactly the documented targets (every target matches a module, except
    those declared unmatched), and every adapter changes the output."""
    for arch in ARCHS:
        if (arch, adapter) in NOT_BUILDABLE:
            continue
        model = built(arch, adapter).model
        leaves = {name.rsplit(".", 1)[-1] for name, layer in adapter_layers(model) if isinstance(layer, BaseTunerLayer)}
        unmatched = {UNMATCHED_TARGETS[(arch, adapter)][0]} if (arch, adapter) in UNMATCHED_TARGETS else set()
        documented = {t.rsplit(".", 1)[-1] for t in targets(arch, adapter)} - unmatched
        assert leaves == documented, f"{arch}-{adapter}: adapted {sorted(leaves)}, documented {sorted(documented)}"
        effect = (reference_logits(arch, adapter, -1.0) - reference_logits(arch, adapter, 0.0)).abs().max()
        assert effect > 1e-4, f"{arch}-{adapter}: the adapter barely changes the logits ({effect:.2g})"


def test_architectures_doc_is_current() -> None:
    assert DOC.read_text() == render_doc(), "docs/architectures.md is stale: run python tests/architectures.py --write"
