"""The geometry behind mode="geometric" and op="invert", checked against PEFT's own code.

Every reference here is built from PEFT (its rotation module, its RoAd helpers, its
``get_delta_weight``) or from plain tensor algebra on the original parameters, never
from funcadapt's own helpers (except where a funcadapt helper is itself the subject). Every claim here is an
identity, so it is checked in float64, up to its rounding (cases.TOL64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import TOL64, assert_unchanged, build, case, float64, randomize_adapters, snapshot, tiny_llama, tolerance
from peft import OFTConfig, get_peft_model
from peft.tuners.road.layer import _apply_road, _prepare_cols
from torch import nn

import funcadapt
from funcadapt.ops import Rotate
from funcadapt.rules.oft import rotate

pytestmark = pytest.mark.filterwarnings("ignore")

COEFFS = [-1.0, 0.5, 2.0]
F64 = torch.float64
OFT_INVERSE = "funcadapt inverts R in float32 whatever its dtype (rules/oft.py: torch.linalg.inv(r.float()))"
"""Why op='invert' under Cayley–Neumann, which inverts R numerically, carries float32 rounding in float64."""


def loaded_copy(model: nn.Module, params: dict) -> nn.Module:
    """A deepcopy of ``model`` whose parameters are set to ``params`` (tensor entries only)."""
    twin = copy.deepcopy(model)
    named = dict(twin.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in params.items():
            if not key.startswith("@"):
                named[key].copy_(value)
    return twin


# ----------------------------------------------------------------------------------------
# (IA)³: λ ↦ λ^c


@pytest.mark.parametrize("c", COEFFS)
def test_ia3_geometric_is_power(c):
    model = build(case("ia3"), dtype=F64)
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, c, mode="geometric")
    assert tree.layers
    for spec in tree.layers:
        lam = tree.params[spec.keys["ia3_l"]].detach()
        assert bool((lam > 0).all())
        got = params[spec.keys["ia3_l"]]
        assert got.dtype == lam.dtype and got.shape == lam.shape
        torch.testing.assert_close(got, lam**c, **TOL64)
    assert_unchanged(model, before)


def test_ia3_invert_is_reciprocal():
    model = build(case("ia3"), dtype=F64)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, op="invert")
    for spec in tree.layers:
        lam = tree.params[spec.keys["ia3_l"]].detach()
        torch.testing.assert_close(params[spec.keys["ia3_l"]], 1.0 / lam, **TOL64)


@pytest.mark.parametrize("c", COEFFS)
@pytest.mark.parametrize("which", ["q_proj", "down_proj"])
def test_ia3_geometric_layer_output(which, c):
    """Output-scaling IA3 (q_proj): y = base(x)·λ^c; feed-forward IA3 (down_proj): y = base(x·λ^c)."""
    model = build(case("ia3"), dtype=F64)
    block = {"q_proj": "self_attn", "down_proj": "mlp"}[which]
    layer = model.get_submodule(f"base_model.model.model.layers.0.{block}.{which}")
    before = snapshot(model)
    tree = funcadapt.extract(layer)
    (spec,) = tree.layers
    assert spec.static["is_feedforward"] == (which == "down_proj")
    base = layer.get_base_layer()
    x = torch.randn(2, 3, base.in_features, generator=torch.Generator().manual_seed(3), dtype=F64)
    lam_c = (layer.ia3_l["default"].detach() ** c).flatten()
    with torch.no_grad():
        got = funcadapt.call(layer, funcadapt.transform(tree, c, mode="geometric"), x)
        ref = base(x * lam_c) if which == "down_proj" else base(x) * lam_c
        y1 = layer(x)
    assert not torch.allclose(got, y1, atol=1e-4)
    torch.testing.assert_close(got, ref, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [-0.3, 0.0])
def test_ia3_geometric_non_positive_raises(bad):
    model = build(case("ia3"))
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        layer.ia3_l["default"].view(-1)[5] = bad
    before = snapshot(model)
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match="non-positive"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    with pytest.raises(ValueError, match="non-positive"):
        funcadapt.transform(tree, op="invert")
    funcadapt.transform(tree, 0.5)  # linear mode stays defined
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# OFT: R(c) = Cayley(c·Q)


class _ConvLin(nn.Module):
    def __init__(self, identity: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16 if identity else 12, bias=not identity)
        self.conv = nn.Conv2d(2, 3, 2)
        if identity:
            with torch.no_grad():
                self.lin.weight.copy_(torch.eye(16))

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.conv(img)


def _oft_net(neumann: bool, block_share: bool = False, identity: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = OFTConfig(
        r=0,
        oft_block_size=4,
        target_modules=["lin", "conv"],
        use_cayley_neumann=neumann,
        block_share=block_share,
    )
    model = get_peft_model(_ConvLin(identity), config)
    randomize_adapters(model, seed=4, scale=0.3)
    return model.double().eval()


def _oft_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 5, 16, generator=g, dtype=F64), torch.randn(2, 2, 5, 6, generator=g, dtype=F64)


@pytest.mark.parametrize("block_share", [False, True], ids=["blocks", "shared"])
@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "cayley"])
def test_oft_rotate_matches_peft_forward(neumann, block_share):
    """funcadapt's out-of-place ``rotate`` is PEFT's OFTRotationModule.forward, for Linear and Conv2d inputs."""
    model = _oft_net(neumann, block_share)
    x, img = _oft_inputs()
    with torch.no_grad():
        for name, inp in (("lin", x), ("conv", img)):
            rot = model.base_model.model.get_submodule(name).oft_R["default"]
            torch.testing.assert_close(rotate(rot, inp), rot(inp), **TOL64)


@pytest.mark.parametrize("c", COEFFS)
@pytest.mark.parametrize("block_share", [False, True], ids=["blocks", "shared"])
@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "cayley"])
def test_oft_geometric_is_peft_rotation_of_scaled_generator(neumann, block_share, c):
    model = _oft_net(neumann, block_share)
    before = snapshot(model)
    lin = model.base_model.model.lin
    tree = funcadapt.extract(lin)
    (spec,) = tree.layers
    params = funcadapt.transform(tree, c, mode="geometric")
    weight = lin.oft_R["default"].weight.detach()
    torch.testing.assert_close(params[spec.keys["oft_R.weight"]], c * weight, rtol=0, atol=0)

    # R(c) from PEFT's own get_weight() on a copy of the rotation module with weight c·Q
    rot_c = copy.deepcopy(lin.oft_R["default"])
    with torch.no_grad():
        rot_c.weight.mul_(c)
        r_c = rot_c.get_weight()
        x, _ = _oft_inputs()
        got = funcadapt.call(lin, params, x)
        ref = lin.get_base_layer()(x @ r_c)
        y1 = lin(x)
    assert r_c.shape == (16, 16)
    assert not torch.allclose(got, y1, atol=1e-4)
    torch.testing.assert_close(got, ref, **TOL64)

    # model level: the Conv2d OFT layer has no geometric path (PEFT's conv OFT is not the
    # identity at Q = 0, see test_peft_oft_conv_is_not_identity_at_zero), so it is refused
    tree_m = funcadapt.extract(model)
    assert len(tree_m.layers) == 2
    with pytest.raises(ValueError, match="Conv2d"):
        funcadapt.transform(tree_m, c, mode="geometric")
    assert_unchanged(model, before)


def test_peft_oft_conv_is_not_identity_at_zero():
    """Why OFT on Conv2d uses output interpolation in linear mode and refuses geometric/invert:
    PEFT folds rotated, unfolded patches back by summing overlaps, so Q = 0 is not the base
    layer. If PEFT changes this, this test fails and the Conv2d special case can go."""
    model = _oft_net(True, False)
    conv = model.base_model.model.conv
    with torch.no_grad():
        conv.oft_R["default"].weight.zero_()
        _, img = _oft_inputs()
        assert not torch.allclose(conv(img), conv.get_base_layer()(img), atol=1e-3)
        tree = funcadapt.extract(conv)
        assert torch.equal(funcadapt.call(conv, funcadapt.transform(tree, 0.0), img), conv.get_base_layer()(img))


def params_of(params: dict, spec) -> torch.Tensor:
    return params[spec.keys["oft_R.weight"]]


@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "cayley"])
def test_oft_invert_is_exact_inverse(neumann):
    """With an identity base layer the OFT layer is x ↦ x·R; the inverted layer undoes it exactly."""
    model = _oft_net(neumann, identity=True)
    before = snapshot(model)
    lin = model.base_model.model.lin
    x, _ = _oft_inputs()
    tree = funcadapt.extract(lin)
    (spec,) = tree.layers
    inv = funcadapt.transform(tree, op="invert")
    with torch.no_grad():
        rotated = lin(x)  # PEFT: x·R
        assert (rotated - x).abs().max() > 1e-2
        back = funcadapt.call(lin, inv, rotated)
        # and the other way round: R⁻¹ then R
        forth = lin(funcadapt.call(lin, inv, x))
    tol = tolerance(x, OFT_INVERSE) if neumann else TOL64  # exact Cayley inverts by Q ↦ −Q
    torch.testing.assert_close(back, x, **tol)
    torch.testing.assert_close(forth, x, **tol)
    if not neumann:  # exact Cayley: the inverse is the parameter transform Q ↦ −Q
        torch.testing.assert_close(params_of(inv, spec), -lin.oft_R["default"].weight.detach(), rtol=0, atol=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "cayley"])
def test_oft_negated_generator_is_inverse_only_without_neumann(neumann):
    """Documents why funcadapt inverts R numerically under Cayley–Neumann: PEFT's truncated series
    is not orthogonal, so Cayley_N(−Q) is not R⁻¹ for a realistic Q (while exact Cayley's is)."""
    model = _oft_net(neumann)
    rot = model.base_model.model.lin.oft_R["default"]
    neg = copy.deepcopy(rot)
    x, _ = _oft_inputs()
    with torch.no_grad():
        neg.weight.neg_()
        r = rot.get_weight()
        err = (neg(rot(x)) - x).norm() / x.norm()
        orth = (r @ r.T - torch.eye(r.shape[0], dtype=F64)).abs().max()
        exact = rotate(rot, rot(x), (Rotate("inverse"),))
    torch.testing.assert_close(exact, x, **tolerance(x, OFT_INVERSE))
    if neumann:  # the truncated series is off by O(|Q|^5) ~ 1e-3 here, far above any rounding
        assert orth > 1e-3, "Cayley–Neumann R should not be orthogonal for this Q"
        assert err > 1e-6, f"−Q should not invert a Cayley–Neumann rotation (rel. error {err:.2e})"
    else:  # exact Cayley: orthogonal and inverted by −Q up to float64 rounding (~1e-15)
        assert orth < TOL64["rtol"]
        assert err < TOL64["rtol"]


# ----------------------------------------------------------------------------------------
# RoAd


def _road(variant: str):
    model = build(case(variant), dtype=F64)
    tree = funcadapt.extract(model)
    assert tree.layers
    return model, tree


def _cols(spec, params):
    v, g = spec.static["variant"], spec.static["group_size"]
    return _prepare_cols(v, g, params[spec.keys["road_theta"]], params[spec.keys["road_alpha"]])


def _apply(spec, params, x):
    v, g = spec.static["variant"], spec.static["group_size"]
    return _apply_road(v, g, params[spec.keys["road_theta"]], params[spec.keys["road_alpha"]], x)


def _x(spec, params, seed=0):
    n = params[spec.keys["road_alpha"]].shape[0]
    n = n * 2 if spec.static["variant"] == "road_1" else n // 2 if spec.static["variant"] == "road_4" else n
    return torch.randn(5, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


VARIANTS = ["road_1", "road_2", "road_4"]


@pytest.mark.parametrize("c", COEFFS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_road_linear_cols(variant, c):
    model, tree = _road(variant)
    before = snapshot(model)
    params = funcadapt.transform(tree, c)
    with torch.no_grad():
        for spec in tree.layers:
            f0, s0 = _cols(spec, tree.params)
            f1, s1 = _cols(spec, params)
            assert spec.static["variant"] == variant
            assert (s0.abs() > 1e-3).any() and ((f0 - 1).abs() > 1e-3).any()
            torch.testing.assert_close(f1, 1 + c * (f0 - 1), **TOL64)
            torch.testing.assert_close(s1, c * s0, **TOL64)
            # and the map it applies is the interpolated one
            x = _x(spec, params)
            assert x.shape[-1] == f0.shape[0]
            torch.testing.assert_close(_apply(spec, params, x), x + c * (_apply(spec, tree.params, x) - x), **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_road_invert_is_exact_inverse(variant):
    model, tree = _road(variant)
    before = snapshot(model)
    inv = funcadapt.transform(tree, op="invert")
    with torch.no_grad():
        for spec in tree.layers:
            x = _x(spec, inv, seed=1)
            y = _apply(spec, tree.params, x)
            assert (y - x).abs().max() > 1e-2
            torch.testing.assert_close(_apply(spec, inv, y), x, **TOL64)
            torch.testing.assert_close(_apply(spec, tree.params, _apply(spec, inv, x)), x, **TOL64)
    assert_unchanged(model, before)


def _negate_some_alphas(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "road_alpha" in name:
                p[::3].neg_()


@pytest.mark.parametrize("negative", [False, True], ids=["positive-alpha", "negative-alpha"])
def test_road_1_geometric_group_property(negative):
    model, tree = _road("road_1")
    if negative:
        _negate_some_alphas(model)
        assert any(bool((tree.params[s.keys["road_alpha"]] < 0).any()) for s in tree.layers)
    before = snapshot(model)
    half = funcadapt.transform(tree, 0.5, mode="geometric")
    minus = funcadapt.transform(tree, -1.0, mode="geometric")
    two = funcadapt.transform(tree, 2.0, mode="geometric")
    inv = funcadapt.transform(tree, op="invert")
    with torch.no_grad():
        for spec in tree.layers:
            x = _x(spec, tree.params, seed=2)
            once = _apply(spec, tree.params, x)
            torch.testing.assert_close(_apply(spec, half, _apply(spec, half, x)), once, **TOL64)
            torch.testing.assert_close(_apply(spec, two, x), _apply(spec, tree.params, once), **TOL64)
            torch.testing.assert_close(_apply(spec, minus, x), _apply(spec, inv, x), **TOL64)
            torch.testing.assert_close(_apply(spec, minus, once), x, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_road_geometric_refused(variant):
    model, tree = _road(variant)
    before = snapshot(model)
    with pytest.raises(ValueError, match="geometric"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# Additive families: ΔW(c) = c·ΔW, geometric = linear, invert = scale(−1)

ADDITIVE = ["lora", "lora-embedding", "adalora", "vera", "randlora"]


@pytest.mark.parametrize("case_id", ADDITIVE)
def test_additive_geometric_equals_linear_and_invert_is_minus_one(case_id):
    model = build(case(case_id))
    before = snapshot(model)
    tree = funcadapt.extract(model)
    for c in COEFFS:
        lin = funcadapt.transform(tree, c)
        geo = funcadapt.transform(tree, c, mode="geometric")
        assert lin.keys() == geo.keys()
        assert not any(k.startswith("@") for k in lin)
        for k in lin:
            assert torch.equal(lin[k], geo[k]), k
    inv = funcadapt.transform(tree, op="invert")
    neg = funcadapt.transform(tree, -1.0)
    assert inv.keys() == neg.keys()
    for k in inv:
        assert torch.equal(inv[k], neg[k]), k
    assert_unchanged(model, before)


@pytest.mark.parametrize("c", COEFFS)
@pytest.mark.parametrize("case_id", ADDITIVE)
def test_additive_delta_weight_scales(case_id, c):
    model = build(case(case_id), dtype=F64)
    before = snapshot(model)
    tree = funcadapt.extract(model)
    for mode in ("linear", "geometric"):
        twin = loaded_copy(model, funcadapt.transform(tree, c, mode=mode))
        with torch.no_grad():
            for spec in tree.layers:
                layer = model.get_submodule(spec.path)
                assert hasattr(layer, "get_delta_weight")
                d0 = layer.get_delta_weight(spec.adapter)
                d1 = twin.get_submodule(spec.path).get_delta_weight(spec.adapter)
                assert d0.abs().max() > 1e-4
                torch.testing.assert_close(d1, c * d0, **TOL64)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# DoRA and other LoRA variants: no group structure


@pytest.mark.parametrize("case_id", ["dora", "lora-variant-mica"])
def test_variants_refuse_geometric_and_invert(case_id):
    model = build(case(case_id))
    before = snapshot(model)
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match="op='scale'"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    with pytest.raises(ValueError, match="op='scale'"):
        funcadapt.transform(tree, op="invert")
    funcadapt.transform(tree, -1.0)  # the suggested alternative works
    assert_unchanged(model, before)


@pytest.mark.parametrize("gs", [False, True], ids=["chain", "gram-schmidt"])
def test_hra_invert_is_the_inverse_rotation(gs):
    """HRA's layer is x ↦ x·(W·R)ᵀ; the inverted layer must be x ↦ x·(W·R⁻¹)ᵀ exactly."""
    from peft import HRAConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), HRAConfig(r=4, target_modules=["q_proj"], apply_GS=gs))
    randomize_adapters(model)
    model = float64(model).eval()
    before = snapshot(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    tree = funcadapt.extract(layer)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        r = layer.get_delta_weight("default")
        w = layer.get_base_layer().weight
        want = torch.nn.functional.linear(x, w @ torch.linalg.inv(r))
        got = funcadapt.call(layer, funcadapt.transform(tree, op="invert"), x)
        assert not torch.allclose(r, torch.eye(32, dtype=F64), atol=1e-3)
    torch.testing.assert_close(got, want, **TOL64)
    with pytest.raises(ValueError, match="reflection"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    assert_unchanged(model, before)
