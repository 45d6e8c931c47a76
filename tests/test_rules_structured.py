"""The math behind the structured families' geometric paths and exact inverses (BOFT, PSOFT,
MiSS "bat", OSF), and their refusals (DeFT, non-orthogonal PSOFT, MiSS "bat" geometric).

References are plain tensor algebra on the original parameters or PEFT's own code (its
merge, its ``get_matrix``, its dropout), never funcadapt's helpers except where a helper is
the subject (the vmap-safe re-implementations must equal PEFT's code bit for bit). The layers are float64,
so every identity holds up to float64 rounding (cases.TOL64).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from cases import (
    ATTN,
    TOL64,
    Case,
    assert_unchanged,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    snapshot,
    tiny_llama,
    tolerance,
)
from peft import BOFTConfig, PsoftConfig, get_peft_model
from peft.tuners.boft.layer import MultiplicativeDropoutLayer
from torch import nn

import funcadapt
from funcadapt.rules import rule_named
from funcadapt.rules.boft import multiplicative_dropout
from funcadapt.rules.miss import bat_delta_weight
from funcadapt.rules.psoft import psoft_matrix

pytestmark = pytest.mark.filterwarnings("ignore")

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"
V_PROJ = "base_model.model.model.layers.1.self_attn.v_proj"
F64 = torch.float64


def layer_of(case_id: str, path: str = Q_PROJ, arch: str = "llama") -> nn.Module:
    model = build(case(case_id), arch, dtype=F64)
    return model.get_submodule(path)


def x_for(layer: nn.Module, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(seed), dtype=F64)


def call(layer: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return funcadapt.call(layer, params, x)


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The adapted weight, as PEFT's own merge writes it."""
    twin = copy.deepcopy(layer)
    twin.merge()
    return twin.get_base_layer().weight.detach().clone()


def with_base_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.get_base_layer().weight.copy_(weight)
    return twin


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I − S)(I + S)⁻¹ in float64, batched."""
    eye = torch.eye(skew.shape[-1], dtype=torch.float64).expand_as(skew)
    return (eye - skew) @ torch.linalg.inv(eye + skew)


# ----------------------------------------------------------------------------------------
# BOFT


def boft_reference(layer: nn.Module, c: float, x: torch.Tensor) -> torch.Tensor:
    """y = s^c ⊙ (x·R(c)·Wᵀ) + b with R(c) = blockdiag(Cayley(c·½(B − Bᵀ))) (one butterfly
    factor, so PEFT's permutation is the identity)."""
    blocks = layer.boft_R["default"].detach().double()
    assert blocks.shape[0] == 1 and torch.equal(layer.boft_P[0], torch.eye(layer.in_features))
    skew = c * 0.5 * (blocks[0] - blocks[0].transpose(-1, -2))
    rot = torch.block_diag(*cayley(skew))
    s = layer.boft_s["default"].detach().double().flatten()
    base = layer.get_base_layer()
    y = (x.double() @ rot @ base.weight.detach().double().T) * s**c
    return y if base.bias is None else y + base.bias.detach().double()


@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_boft_geometric_is_cayley_of_scaled_blocks_and_power_of_scale(c):
    layer = layer_of("boft")
    before = snapshot(layer)
    tree = funcadapt.extract(layer)
    x = x_for(layer)
    got = call(layer, funcadapt.transform(tree, c, mode="geometric"), x)
    torch.testing.assert_close(got, boft_reference(layer, c, x), **TOL64)
    assert_unchanged(layer, before)


def test_boft_scale_follows_group_law_and_rotation_is_cayley_not_exp():
    """s^a·s^b = s^(a+b) exactly in the transformed parameters; the rotation path is Cayley's,
    which is not a one-parameter group (so geometric(a)∘geometric(b) ≠ geometric(a+b) there)."""
    layer = layer_of("boft")
    tree = funcadapt.extract(layer)
    (spec,) = tree.layers
    s = tree.params[spec.keys["boft_s"]].detach().double()
    for a, b in [(0.5, 0.25), (2.0, -1.0)]:
        pa = funcadapt.transform(tree, a, mode="geometric")[spec.keys["boft_s"]].double()
        pb = funcadapt.transform(tree, b, mode="geometric")[spec.keys["boft_s"]].double()
        torch.testing.assert_close(pa * pb, s ** (a + b), **TOL64)
    blocks = tree.params[spec.keys["boft_R"]].detach().double()[0]
    skew = 0.5 * (blocks - blocks.transpose(-1, -2))
    r = cayley(0.5 * skew) @ cayley(0.5 * skew)
    assert not torch.allclose(r, cayley(skew), atol=1e-4), "Cayley(Q/2)² = Cayley(Q) would make this a group"
    eye = torch.eye(skew.shape[-1], dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(cayley(-skew) @ cayley(skew), eye, **TOL64)


@pytest.mark.parametrize("arch", ["llama", "bert", "cnn"])
def test_boft_invert_undoes_the_adapter(arch):
    """The inverted adapter applied to the adapted weight (PEFT's merge) gives back the base
    layer: diag(1/s)·(diag(s)·W·Rᵀ)·R⁻ᵀ = W."""
    path = {"llama": Q_PROJ, "bert": "base_model.model.encoder.layer.0.attention.self.query"}.get(
        arch, "base_model.model.conv2"
    )
    layer = layer_of("boft", path, arch)
    twin = with_base_weight(layer, merged_weight(layer))
    tree = funcadapt.extract(twin)
    before = snapshot(twin)
    x = (
        torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
        if arch == "cnn"
        else x_for(layer)
    )
    got = call(twin, funcadapt.transform(tree, op="invert"), x)
    with torch.no_grad():
        want = layer.get_base_layer()(x)
    torch.testing.assert_close(got, want, **TOL64)
    geometric = call(twin, funcadapt.transform(tree, -1.0, mode="geometric"), x)
    torch.testing.assert_close(geometric, got, **TOL64)  # one factor: geometric(−1) is the inverse
    assert_unchanged(twin, before)


def test_boft_invert_refused_for_several_butterfly_factors():
    rule = rule_named("boft")
    spec = SimpleNamespace(path="l", adapter="a", static={"n_factors": 2})
    with pytest.raises(ValueError, match=r"reverse order.*mode='geometric'"):
        rule.invert(spec, {"boft_R": torch.zeros(2, 1, 2, 2), "boft_s": torch.ones(2, 1)})


def test_boft_geometric_needs_positive_scale():
    model = build(case("boft"))
    with torch.no_grad():
        model.get_submodule(Q_PROJ).boft_s["default"][0, 0] = -0.5
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match="non-positive"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    funcadapt.transform(tree, op="invert")  # 1/s only needs s ≠ 0


def test_boft_dropout_replacement_is_pefts_draw():
    """The vmap-safe multiplicative dropout draws what PEFT's does, from the same RNG state."""
    drop = MultiplicativeDropoutLayer(p=0.5).train()
    x = torch.randn(1, 6, 4, 4)
    for seed in range(5):
        torch.manual_seed(seed)
        want = drop(x)
        torch.manual_seed(seed)
        got = multiplicative_dropout(drop, x)
        assert torch.equal(got, want)
    assert torch.equal(multiplicative_dropout(drop.eval(), x), x)


def test_boft_dropout_under_vmap():
    """Train mode with boft_dropout: PEFT's draw calls .item(), which vmap refuses; under
    funcadapt.vmap the replacement runs and each coefficient draws its own mask."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), BOFTConfig(boft_block_size=8, boft_dropout=0.5, target_modules=ATTN["llama"]))
    randomize_adapters(model, seed=1)
    model.train()
    tree = funcadapt.extract(model)
    before = snapshot(model)
    coeffs = torch.tensor([0.5, 0.5, 0.5, 0.5])

    def f(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c, mode="geometric"), **inputs()))

    with torch.no_grad():
        ys = funcadapt.vmap(f)(coeffs)
    assert torch.isfinite(ys).all()
    assert any(not torch.allclose(ys[0], ys[i]) for i in range(1, 4)), "one mask per coefficient"
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# PSOFT


@pytest.mark.parametrize("case_id", ["psoft", "psoft-neumann-eps", "psoft-free"])
def test_psoft_matrix_is_pefts_bit_for_bit(case_id):
    layer = layer_of(case_id)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        rot = copy.deepcopy(layer.psoft_R["default"]).to(dtype)
        with torch.no_grad():
            assert torch.equal(psoft_matrix(rot), rot.get_matrix())


def psoft_delta(layer: nn.Module, r_prime: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Δy = s·B·(R' − I)·A·x in float64 from PEFT's cached A, B."""
    a, b = (t.double() for t in layer._get_psoft_ab_cache_buffers("default"))
    eye = torch.eye(r_prime.shape[0], dtype=torch.float64)
    return layer.scaling["default"] * (x.double() @ a.T @ (r_prime - eye).T @ b.T)


@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
@pytest.mark.parametrize("case_id", ["psoft", "psoft-neumann-eps"])
def test_psoft_geometric_scales_generator_and_magnitudes(case_id, c):
    """R'(c) = diag(v_b^c)·Cayley(c·Q)·diag(v_a^c), Q after PEFT's eps rescaling (c·P(Q)).
    The Cayley–Neumann variant is checked against PEFT's own series on c·P(Q)."""
    layer = layer_of(case_id)
    rot = layer.psoft_R["default"]
    x = x_for(layer)
    tree = funcadapt.extract(layer)
    got = call(layer, funcadapt.transform(tree, c, mode="geometric"), x)
    with torch.no_grad():
        q = torch.zeros(rot.size, rot.size, dtype=F64).index_put((rot.rows, rot.cols), rot.weight)
        q = q - q.T
        if rot.use_cayley_neumann:  # PEFT's series on the rescaled, then scaled generator
            norm = torch.linalg.norm(q)
            q = q * (rot.cayley_neumann_eps / (norm + 1e-12)) if norm > rot.cayley_neumann_eps else q
            assert norm > rot.cayley_neumann_eps, "the case must exercise PEFT's rescaling"
            q = c * q
            eye = torch.eye(rot.size, dtype=torch.float64)
            r = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q  # 5 terms
        else:
            r = torch.linalg.inv(cayley(c * q))  # PEFT: (I + Q)(I − Q)⁻¹ = Cayley(−Q) in our sign
        r_prime = (rot.vector_b.double() ** c)[:, None] * r * (rot.vector_a.double() ** c)[None, :]
        want = layer.get_base_layer()(x) + psoft_delta(layer, r_prime, x)
    torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("case_id", ["psoft", "psoft-neumann-eps", "psoft-free"])
def test_psoft_invert_is_inverse_map(case_id):
    """op='invert': Δy = s·B·(R'⁻¹ − I)·A·x with R' exactly the matrix PEFT uses."""
    layer = layer_of(case_id)
    x = x_for(layer)
    before = snapshot(layer)
    tree = funcadapt.extract(layer)
    got = call(layer, funcadapt.transform(tree, op="invert"), x)
    with torch.no_grad():
        r_inv = torch.linalg.inv(layer.psoft_R["default"].get_matrix().double())
        want = layer.get_base_layer()(x) + psoft_delta(layer, r_inv, x)
    torch.testing.assert_close(got, want, **TOL64)
    assert_unchanged(layer, before)


def test_psoft_invert_equals_geometric_minus_one_for_exact_cayley_without_magnitudes():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), PsoftConfig(r=4, target_modules=["q_proj"], psoft_mag_a=False, psoft_mag_b=False)
    )
    randomize_adapters(model)
    layer = float64(model).get_submodule(Q_PROJ)
    tree = funcadapt.extract(layer)
    x = x_for(layer)
    inv = call(layer, funcadapt.transform(tree, op="invert"), x)
    geo = call(layer, funcadapt.transform(tree, -1.0, mode="geometric"), x)
    torch.testing.assert_close(inv, geo, **TOL64)


def test_psoft_geometric_refused_for_free_matrix():
    tree = funcadapt.extract(build(case("psoft-free")))
    with pytest.raises(ValueError, match=r"psoft_orth=False.*Use mode='linear'"):
        funcadapt.transform(tree, 0.5, mode="geometric")


# ----------------------------------------------------------------------------------------
# MiSS


def test_miss_bat_delta_is_pefts_bit_for_bit():
    layer = layer_of("miss-bat")
    w = layer.get_base_layer().weight.detach()
    with torch.no_grad():
        for reverse in (False, True):
            assert torch.equal(
                bat_delta_weight(layer, "default", w.clone(), reverse), layer.get_delta_weight("default", w, reverse)
            )


@pytest.mark.parametrize("path", [Q_PROJ, V_PROJ])
def test_miss_bat_invert_undoes_the_adapter(path):
    """B ↦ (I + B)⁻¹ − I applied to the adapted weight (PEFT's merge) gives back W."""
    layer = layer_of("miss-bat", path)
    twin = with_base_weight(layer, merged_weight(layer))
    tree = funcadapt.extract(twin)
    x = x_for(layer)
    got = call(twin, funcadapt.transform(tree, op="invert"), x)
    with torch.no_grad():
        want = layer.get_base_layer()(x)
        # PEFT's own unmerge formula agrees: (W' − B)(I + B)⁻¹ per block
        w1 = twin.get_base_layer().weight
        restored = layer.get_delta_weight("default", w1.clone(), reverse=True)
    w0 = layer.get_base_layer().weight
    torch.testing.assert_close(restored, w0, **tolerance(w0, "PEFT's bat unmerge inverts I + B in float32"))
    torch.testing.assert_close(got, want, **TOL64)


def test_miss_bat_bf16_leaves_model_untouched():
    """PEFT's bat delta writes miss_block.data on CPU half precision; funcadapt's call must not."""
    model = build(case("miss-bat"), dtype=torch.bfloat16)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with torch.no_grad():
        funcadapt.call(model, funcadapt.transform(tree, torch.tensor(-0.5)), **inputs())
    assert_unchanged(model, before)


def test_miss_bat_geometric_refused():
    tree = funcadapt.extract(build(case("miss-bat")))
    with pytest.raises(ValueError, match=r"matrix logarithm.*Use mode='linear'"):
        funcadapt.transform(tree, 0.5, mode="geometric")


# ----------------------------------------------------------------------------------------
# OSF, DeFT


def test_osf_invert_subtracts_delta():
    layer = layer_of("osf")
    tree = funcadapt.extract(layer)
    x = x_for(layer)
    with torch.no_grad():
        y0, y1 = layer.get_base_layer()(x), layer(x)
        delta = x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(y1 - y0, delta, **TOL64)  # ΔW = U·S·V − U₀·S₀·V₀
    got = call(layer, funcadapt.transform(tree, op="invert"), x)
    torch.testing.assert_close(got, y0 - delta, **TOL64)
    geo = call(layer, funcadapt.transform(tree, 0.5, mode="geometric"), x)
    torch.testing.assert_close(geo, y0 + 0.5 * delta, **TOL64)


@pytest.mark.parametrize("case_id", ["deft", "deft-para-relu"])
def test_deft_refuses_geometric_and_invert(case_id):
    tree = funcadapt.extract(build(case(case_id)))
    with pytest.raises(ValueError, match=r"rank-deficient.*Use mode='linear'"):
        funcadapt.transform(tree, 0.5, mode="geometric")
    with pytest.raises(ValueError, match=r"rank-deficient.*coeff=-1\.0"):
        funcadapt.transform(tree, op="invert")


def test_structured_cases_cover_each_rule():
    """Guard against a variant silently matching another rule (MiSS 'bat' vs plain MiSS)."""
    import cases_structured

    for c in cases_structured.CASES:
        tree = funcadapt.extract(build(Case(c.id, c.rule, c.config)))
        assert {s.rule for s in tree.layers} == {c.rule}, c.id
