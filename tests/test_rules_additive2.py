"""Focused checks for WaveFT, FRoD, TinyLoRA, PEANuT, Super-Tuning and AdaMSS that the generic
tests (which iterate tests/cases_additive2.py) cannot make: ΔW(c) = c·ΔW measured with PEFT's
own ``get_delta_weight``, geometric == linear and invert == scale(−1) for the additive rules,
the vmap-safe WaveFT delta equal to PEFT's, TinyLoRA's shared vector left untouched, FRoD's
refusals, the AdaMSS dtype bug in PEFT, and the ShadowPEFT refusal. Equalities are checked in float64 up to
its rounding (cases.TOL64); the bf16 tests bound bf16's."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    TOL64,
    assert_bf16_as_accurate,
    assert_unchanged,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    snapshot,
)
from cases import tiny_llama as tiny_llama_model
from peft import ShadowConfig, get_peft_model

import funcadapt
from funcadapt.call import frame
from funcadapt.ops import ScaleInside
from funcadapt.rules.waveft import delta_weight as waveft_delta_weight

pytestmark = pytest.mark.filterwarnings("ignore")

COEFFS = [-1.0, 0.5, 2.0]
PARAMETER_SPACE = ["waveft", "waveft-no-idwt", "waveft-db4", "peanut", "supertuning", "supertuning-supra", "adamss"]
ADDITIVE = [*PARAMETER_SPACE, "tinylora", "tinylora-tied", "tinylora-embedding"]


def _build(case_id: str, arch: str = "llama") -> torch.nn.Module:
    return build(case(case_id), arch, dtype=torch.float64)


def _delta(layer, adapter: str) -> torch.Tensor:
    """PEFT's own ΔW for the layer; AdaMSS also updates the bias, so its bias delta is appended."""
    d = layer.get_delta_weight(adapter)
    if hasattr(layer, "get_delta_bias") and layer.get_base_layer().bias is not None:
        d = torch.cat([d, layer.get_delta_bias(adapter)[:, None]], dim=1)
    return d


def _deltas_while_running(model, params, batch: dict) -> dict:
    """PEFT's own ΔW of every adapter layer, computed while ``funcadapt.call`` runs that layer:
    effects are applied when a layer runs, not before. A probe set as the layer's forward before
    the call is what funcadapt's just-in-time wrapper then wraps, so it runs inside it."""
    got: dict = {}
    layers = {(s.path, s.adapter): model.get_submodule(s.path) for s in params.tree.layers}
    for (path, adapter), layer in layers.items():

        def probe(*args, layer=layer, key=(path, adapter), forward=layer.forward, **kwargs):
            got.setdefault(key, _delta(layer, key[1]))
            return forward(*args, **kwargs)

        layer.forward = probe
    try:
        funcadapt.call(model, params, **batch)
    finally:
        for layer in layers.values():
            del layer.forward
    return got


def _assert_same_effect(a, b, tree) -> None:
    """The same tensors and the same forward-time ops, layer by layer."""
    for k in tree.params:
        assert _same(a[k], b[k]), k
    fa = {(e.spec.path, e.spec.adapter): e.ops for e in a.effects}
    fb = {(e.spec.path, e.spec.adapter): e.ops for e in b.effects}
    assert fa.keys() == fb.keys()
    for layer, ops in fa.items():
        assert [type(op) for op in ops] == [type(op) for op in fb[layer]], layer
        leaves, other = torch.utils._pytree.tree_leaves(ops), torch.utils._pytree.tree_leaves(fb[layer])
        assert len(leaves) == len(other) and all(_same(v, w) for v, w in zip(leaves, other, strict=True)), layer


def _same(a: object, b: object) -> bool:
    """Equal tensors (bit for bit) or equal forward-time coefficients."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("case_id", ADDITIVE)
def test_geometric_equals_linear_and_invert_is_minus_one(case_id):
    model = _build(case_id)
    before = snapshot(model)
    tree = funcadapt.extract(model)
    for c in COEFFS:
        _assert_same_effect(funcadapt.transform(tree, c), funcadapt.transform(tree, c, mode="geometric"), tree)
    _assert_same_effect(funcadapt.transform(tree, op="invert"), funcadapt.transform(tree, -1.0), tree)
    assert_unchanged(model, before)


@pytest.mark.parametrize("c", [*COEFFS, 0.0])
@pytest.mark.parametrize("case_id", ADDITIVE)
def test_delta_weight_scales(case_id, c):
    """While a layer runs under the transformed parameters (and forward-time effects), PEFT's
    own get_delta_weight is c times the original one."""
    arch = "bert" if case_id == "adamss" else "llama"  # bert: AdaMSS's bias column too
    model = _build(case_id, arch)
    before = snapshot(model)
    tree = funcadapt.extract(model)
    for mode in ("linear", "geometric"):
        params = funcadapt.transform(tree, c, mode=mode)
        with torch.no_grad():
            want = {(s.path, s.adapter): _delta(model.get_submodule(s.path), s.adapter) for s in tree.layers}
            got = _deltas_while_running(model, params, inputs(arch))
        assert got.keys() == want.keys()
        for key, d0 in want.items():
            assert d0.abs().max() > 1e-4, key
            torch.testing.assert_close(got[key], c * d0, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["waveft", "waveft-no-idwt", "waveft-db4"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_waveft_out_of_place_delta_is_peft_delta(case_id, arch):
    """The delta swapped in under torch.func transforms is PEFT's, bit for bit."""
    model = _build(case_id, arch)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        for spec in tree.layers:
            layer = model.get_submodule(spec.path)
            assert torch.equal(waveft_delta_weight(layer, spec.adapter), layer.get_delta_weight(spec.adapter))


def test_waveft_batched_coefficients_in_delta():
    """vmap over c through the swapped delta equals the loop (PEFT's in-place scatter cannot be vmapped)."""
    model = _build("waveft")
    tree = funcadapt.extract(model)
    spec = tree.layers[0]
    layer = model.get_submodule(spec.path)
    key = spec.keys["waveft_spectrum"]

    batch = inputs()

    def delta(c):
        return _deltas_while_running(model, funcadapt.transform(tree, c), batch)[(spec.path, spec.adapter)]

    coeffs = torch.tensor(COEFFS, dtype=torch.float64)
    with torch.no_grad():
        got = torch.func.vmap(delta)(coeffs)
        d0 = layer.get_delta_weight(spec.adapter)
    assert tree.params[key].ndim == 1
    torch.testing.assert_close(got, coeffs[:, None, None] * d0, **TOL64)


# ----------------------------------------------------------------------------------------
# TinyLoRA: one v shared by a group of layers; the coefficient acts per layer on R


def test_tinylora_vector_is_shared_and_never_replaced():
    model = _build("tinylora-tied")
    before = snapshot(model)
    tree = funcadapt.extract(model)
    layers = [model.get_submodule(s.path) for s in tree.layers]
    vs = {id(layer.tinylora_v["default"]["0"]) for layer in layers}
    assert len(layers) == 4 and len(vs) == 1, "weight_tying=1.0: all layers share one v (the premise of the rule)"
    for c in COEFFS:
        params = funcadapt.transform(tree, c)
        for k, t in tree.params.items():
            assert params[k] is t, f"{k}: TinyLoRA's shared v must not be replaced"
        assert len(params.ops_of(ScaleInside)) == len(tree.layers)
    assert_unchanged(model, before)


def test_tinylora_one_layer_scaled_alone():
    """A coefficient on one layer's R leaves the other layers sharing v exactly as they are."""
    model = _build("tinylora-tied")
    tree = funcadapt.extract(model)
    full = funcadapt.transform(tree, -1.0)
    first = tree.layers[0]
    only_first = funcadapt.Transformed(tree, tuple(e for e in full.effects if e.spec.path == first.path))
    with torch.no_grad():
        want = {s.path: model.get_submodule(s.path).get_delta_weight(s.adapter) for s in tree.layers}
        with frame(model, only_first):
            got = {s.path: model.get_submodule(s.path).get_delta_weight(s.adapter) for s in tree.layers}
    assert torch.equal(got[first.path], -want[first.path])
    for s in tree.layers[1:]:
        assert torch.equal(got[s.path], want[s.path])


# ----------------------------------------------------------------------------------------
# FRoD: exact output interpolation, no geometric / invert


def test_frod_refuses_geometric_and_invert():
    model = _build("frod")
    before = snapshot(model)
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match="affine, not linear"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    with pytest.raises(ValueError, match="op='scale'"):
        funcadapt.transform(tree, op="invert")
    params = funcadapt.transform(tree, -1.0)
    assert all(params[k] is t for k, t in tree.params.items())  # fallback: no parameter is changed
    assert_unchanged(model, before)


def test_frod_reconstruction_is_not_the_base_weight():
    """Why FRoD has no parameter-space transform: with its trained tensors reset to their
    initial values, PEFT's reconstruction U·diag(λ₀)·Vᵀ still differs from W₀ (a float64 solve
    rounded to float32), so 'c = 0' could not be the base model bit for bit."""
    from peft import FrodConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama_model(), FrodConfig(target_modules=["q_proj"], progressbar=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        delta = layer.get_delta_weight("default")  # the untrained adapter: ΔW should be 0
    assert not torch.equal(delta, torch.zeros_like(delta))
    # ... and is only rounding: each entry of U·diag(λ)·Vᵀ is a float32 sum of n = 32 terms, off by at most
    # n·u32·Σ|u||λ||v| <= n·u32·‖W‖₂ (u and v are unit vectors' entries), so n·eps32·‖W‖₂ bounds it twice over
    w = layer.get_base_layer().weight.detach()
    assert delta.abs().max() <= w.shape[1] * torch.finfo(w.dtype).eps * torch.linalg.matrix_norm(w, ord=2)


# ----------------------------------------------------------------------------------------
# AdaMSS (needs scikit-learn)


def test_adamss_peft_forward_fails_after_cast_funcadapt_does_not():
    """PEFT bug (0.21): AdaMSS's Linear caches the base weight dtype at creation and casts the
    input to it, so after ``model.to(bfloat16)`` PEFT's own forward raises. funcadapt shows the
    layer its current dtype while a call runs; the result equals PEFT's with its cache fixed by
    hand."""
    pytest.importorskip("sklearn", reason="AdaMSS needs scikit-learn (pip install scikit-learn)")
    model = build(case("adamss"), dtype=torch.bfloat16)
    tree = funcadapt.extract(model)
    batch = inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        model(**batch)
    with torch.no_grad():
        got1 = output(funcadapt.call(model, funcadapt.transform(tree, 1.0), **batch))
        got0 = output(funcadapt.call(model, funcadapt.transform(tree, 0.0), **batch))
        layers = [model.get_submodule(s.path) for s in tree.layers]
        stale = [layer.dtype for layer in layers]
        for layer in layers:
            layer.dtype = torch.bfloat16
        try:
            y1 = output(model(**batch))
            with model.disable_adapter():
                y0 = output(model(**batch))
        finally:
            for layer, dtype in zip(layers, stale, strict=True):
                layer.dtype = dtype
    assert got1.dtype == torch.bfloat16
    assert torch.equal(got1, y1)
    assert torch.equal(got0, y0)
    assert not torch.equal(y0, y1)


def test_adamss_bf16_built_in_bf16():
    """bf16 the way PEFT supports it: the base model is bf16 before the adapter is created."""
    pytest.importorskip("sklearn", reason="AdaMSS needs scikit-learn (pip install scikit-learn)")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama_model().to(torch.bfloat16), case("adamss").config("llama"))
    randomize_adapters(model)
    model.eval()
    tree = funcadapt.extract(model)
    batch = inputs()
    with torch.no_grad():
        y1 = output(model(**batch))
        with model.disable_adapter():
            y0 = output(model(**batch))
        assert not torch.equal(y0, y1)
        assert torch.equal(output(funcadapt.call(model, funcadapt.transform(tree, 1.0), **batch)), y1)
        assert torch.equal(output(funcadapt.call(model, funcadapt.transform(tree, None, "disable"), **batch)), y0)
        with reference_interpolation(model, -1.0):
            ref = output(model(**batch))
        got = output(funcadapt.call(model, funcadapt.transform(tree, torch.tensor(-1.0)), **batch))
        exact = float64(copy.deepcopy(model))  # the same bf16 weights, evaluated in float64 ...
        for s in tree.layers:  # ... with PEFT's stale dtype cache (see the test above) set to it
            exact.get_submodule(s.path).dtype = torch.float64
        with reference_interpolation(exact, -1.0):
            want = output(exact(**batch))
    assert got.dtype == torch.bfloat16
    assert_bf16_as_accurate(got, ref, want, wrong=y1)


# ----------------------------------------------------------------------------------------
# ShadowPEFT: not a layer adapter


def test_shadow_is_refused():
    """ShadowPEFT wraps whole decoder blocks and threads a shadow state (from a model-level shadow
    network) through them; a block's output is not the base block's plus a per-layer effect, and
    with its adapter switched off the block cannot run on the shadow carrier. funcadapt refuses it."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama_model(), ShadowConfig(r=4, shadow_dropout=0.0))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ShadowPEFT.*no per-layer coefficient.*disable_adapter"):
        funcadapt.extract(model)
    with pytest.raises(ValueError, match="ShadowPEFT"), funcadapt.AdapterModifier(model, "scale", -1.0):
        pass
    assert_unchanged(model, before)
