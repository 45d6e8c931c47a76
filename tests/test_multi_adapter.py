"""Several adapters on the same layers: per-adapter coefficients, selection, fallbacks, shift/replace.

References are built without funcadapt: a deepcopy of the model with its adapter tensors
set by hand, or forward hooks that switch PEFT's active adapters on a layer. The models are float64, so the
identities hold up to float64 rounding (cases.TOL64).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from cases import (
    TOL64,
    adapter_layers,
    assert_unchanged,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    snapshot,
    tiny_llama,
)
from peft import IA3Config, LoraConfig, OFTConfig, RoadConfig, get_peft_model
from torch import nn

import funcadapt

pytestmark = pytest.mark.filterwarnings("ignore")

TARGETS = ["q_proj", "v_proj"]


def multi(configs: Mapping[str, Any], active: list[str] | None = None, seed: int = 0) -> nn.Module:
    """tiny_llama with one adapter per entry of ``configs`` (same layers), all active, randomized."""
    torch.manual_seed(seed)
    (first, config), *rest = configs.items()
    model = get_peft_model(tiny_llama(), config, adapter_name=first)
    for name, cfg in rest:
        model.add_adapter(name, cfg)
    model.base_model.set_adapter(active or list(configs))
    randomize_adapters(model, seed=seed + 1)
    return float64(model).eval()


def lora(**kw: Any) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw})


def run(model: nn.Module, params: Mapping[str, Any] | None = None) -> torch.Tensor:
    with torch.no_grad():
        if params is None:
            return output(model(**inputs()))
        return output(funcadapt.call(model, params, **inputs()))


def edited(model: nn.Module, edit) -> nn.Module:
    """A deepcopy of ``model`` with ``edit(name, param)`` applied in place to every parameter."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            edit(name, p)
    return twin


def scale_lora_b(coeffs: Mapping[str, float]):
    def edit(name: str, p: torch.Tensor) -> None:
        for adapter, c in coeffs.items():
            if f".lora_B.{adapter}." in name:
                p.mul_(c)

    return edit


def test_two_lora_adapters_are_active():
    model = multi({"default": lora(), "other": lora(r=2)})
    tree = funcadapt.extract(model)
    assert tree.adapters == ("default", "other")
    assert len(tree.layers) == 2 * 2 * len(TARGETS)
    # both adapters matter for the output
    y = run(model)
    for a in ("default", "other"):
        assert not torch.allclose(run(edited(model, scale_lora_b({a: 0.0}))), y, atol=1e-4)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_two_lora_per_adapter_coefficients(as_tensor):
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    coeffs = {"default": -1.0, "other": 2.0}
    tree = funcadapt.extract(model)
    given = {a: torch.tensor(c, dtype=torch.float64) for a, c in coeffs.items()} if as_tensor else coeffs
    got = run(model, funcadapt.transform(tree, given))
    ref = run(edited(model, scale_lora_b(coeffs)))
    torch.testing.assert_close(got, ref, **TOL64)
    assert_unchanged(model, before)


def test_adapters_missing_from_dict_are_unchanged():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"default": -1.0})
    for spec in tree.layers:
        for key in spec.keys.values():
            if spec.adapter == "other":
                assert params[key] is tree.params[key]
    changed = {k for k in params if params[k] is not tree.params[k]}
    assert changed and all(".lora_B.default." in k for k in changed)
    torch.testing.assert_close(run(model, params), run(edited(model, scale_lora_b({"default": -1.0}))), **TOL64)
    assert_unchanged(model, before)


def test_extract_selected_adapter_only_touches_it():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model, adapter_names=["other"])
    assert tree.adapters == ("other",)
    assert {s.adapter for s in tree.layers} == {"other"}
    assert all(".other" in k and ".default" not in k for k in tree.params)
    params = funcadapt.transform(tree, -1.0)
    assert set(params) == set(tree.params)
    got = run(model, params)
    torch.testing.assert_close(got, run(edited(model, scale_lora_b({"other": -1.0}))), **TOL64)
    # the same through the context manager
    with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", -1.0, adapter_names="other"):
        torch.testing.assert_close(output(model(**inputs())), got, **TOL64)
    with pytest.raises(ValueError, match=r"adapter 'default', which is active, but left out of this tree"):
        funcadapt.transform(tree, {"default": 2.0})
    assert_unchanged(model, before)


def test_two_ia3_adapters_per_adapter_linear():
    config = IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    model = multi({"default": config, "other": IA3Config(target_modules=["q_proj"], feedforward_modules=[])})
    before = snapshot(model)
    coeffs = {"default": 0.5, "other": -2.0}
    tree = funcadapt.extract(model)
    assert len(tree.layers) == 2 * 2  # 2 decoder layers × 2 adapters
    params = funcadapt.transform(tree, coeffs)
    for spec in tree.layers:
        key = spec.keys["ia3_l"]
        lam = tree.params[key].detach()
        torch.testing.assert_close(params[key], 1 + coeffs[spec.adapter] * (lam - 1), **TOL64)

    def edit(name: str, p: torch.Tensor) -> None:
        for adapter, c in coeffs.items():
            if name.endswith(f".ia3_l.{adapter}"):
                p.copy_(1 + c * (p - 1))

    ref_model = edited(model, edit)
    torch.testing.assert_close(run(model, params), run(ref_model), **TOL64)
    # layer level: the product of the two independently interpolated vectors multiplies the output
    path = tree.layers[0].path
    layer = model.get_submodule(path)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam_d, lam_o = layer.ia3_l["default"].detach().flatten(), layer.ia3_l["other"].detach().flatten()
    expected = layer.get_base_layer()(x) * (1 + 0.5 * (lam_d - 1)) * (1 - 2.0 * (lam_o - 1))
    with torch.no_grad():
        got = funcadapt.call(layer, funcadapt.transform(funcadapt.extract(layer), coeffs), x)
    torch.testing.assert_close(got, expected, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_two_ia3_adapters_shared_coefficient_is_layer_linear(c):
    """One coefficient for two stacked IA3 adapters: per-adapter transforms would make the layer
    quadratic in c; funcadapt keeps the documented layer-level meaning y0 + c·(y1 − y0)."""
    model = multi(
        {
            "default": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
            "other": IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        }
    )
    before = snapshot(model)
    tree = funcadapt.extract(model)
    with torch.no_grad(), reference_interpolation(model, c):
        ref = output(model(**inputs()))
    torch.testing.assert_close(run(model, funcadapt.transform(tree, c)), ref, **TOL64)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# LoRA + DoRA on one layer: exact transform for LoRA, output interpolation for DoRA


@contextlib.contextmanager
def reference_per_adapter(model: nn.Module, coeffs: Mapping[str, float]) -> Iterator[None]:
    """At every adapter layer: y0 + Σ_a c_a·(y_a − y0), y_a = PEFT with only adapter a active.
    Valid when the adapters' effects on the layer are additive."""
    handles = []

    def only(module: Any, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        saved = module._active_adapter
        module._active_adapter = names
        try:
            return module.forward(*args, **kwargs)
        finally:
            module._active_adapter = saved

    for _, layer in adapter_layers(model):

        def hook(module: Any, args: tuple, kwargs: dict, y1: torch.Tensor) -> torch.Tensor:
            y0 = only(module, [], args, kwargs)
            out = y0
            for a, c in coeffs.items():
                out = out + c * (only(module, [a], args, kwargs) - y0)
            return out

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lora_dora(order: list[str]) -> nn.Module:
    return multi({"lora": lora(), "dora": lora(r=2, use_dora=True)}, active=order)


@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_lora_plus_dora_shared_coefficient(c):
    """One coefficient for a layer's adapters: the layer output is exactly y0 + c·(y1 − y0)."""
    model = lora_dora(["dora", "lora"])
    before = snapshot(model)
    tree = funcadapt.extract(model)
    assert {(s.adapter, s.rule) for s in tree.layers} == {("lora", "lora"), ("dora", "dora")}
    params = funcadapt.transform(tree, c)
    with torch.no_grad(), reference_interpolation(model, c):
        ref = output(model(**inputs()))
    torch.testing.assert_close(run(model, params), ref, **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize("c", [-1.0, 0.5])
def test_lora_then_dora_shared_coefficient(c):
    """LoRA before DoRA: PEFT's DoRA term renormalises the running result (base + LoRA delta), so the
    layer is not linear in c under per-adapter transforms; funcadapt interpolates the layer jointly."""
    model = lora_dora(["lora", "dora"])
    tree = funcadapt.extract(model)
    with torch.no_grad(), reference_interpolation(model, c):
        ref = output(model(**inputs()))
    torch.testing.assert_close(run(model, funcadapt.transform(tree, c)), ref, **TOL64)


def test_lora_plus_dora_different_coefficients():
    """One fallback adapter per layer may have its own coefficient."""
    model = lora_dora(["dora", "lora"])
    before = snapshot(model)
    coeffs = {"lora": -1.0, "dora": 2.0}
    tree = funcadapt.extract(model)
    got = run(model, funcadapt.transform(tree, coeffs))
    with torch.no_grad(), reference_per_adapter(model, coeffs):
        ref = output(model(**inputs()))
    torch.testing.assert_close(got, ref, **TOL64)
    # sanity of the reference itself: at c = 1 for both it is PEFT's own output
    with torch.no_grad(), reference_per_adapter(model, {"lora": 1.0, "dora": 1.0}):
        torch.testing.assert_close(output(model(**inputs())), run(model), **TOL64)
    assert_unchanged(model, before)


def test_two_dora_adapters_shared_coefficient():
    model = multi({"a": lora(use_dora=True), "b": lora(r=2, use_dora=True)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"a": 0.5, "b": 0.5})
    with torch.no_grad(), reference_interpolation(model, 0.5):
        ref = output(model(**inputs()))
    torch.testing.assert_close(run(model, params), ref, **TOL64)
    assert_unchanged(model, before)


def test_two_fallback_adapters_different_coefficients_raise():
    model = multi({"a": lora(use_dora=True), "b": lora(r=2, use_dora=True)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"a": 0.5, "b": 2.0})
    with pytest.raises(ValueError, match="different coefficients"):
        run(model, params)
    assert_unchanged(model, before)
    with (
        pytest.raises(ValueError, match="different coefficients"),
        funcadapt.AdapterModifier(model, "scale", {"a": 0.5, "b": 2.0}),
    ):
        pass
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# shift and replace


def test_shift_by_number():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, 0.05, op="shift")
    assert set(params) == set(tree.params)
    for key, value in tree.params.items():
        torch.testing.assert_close(params[key], value.detach() + 0.05, rtol=0, atol=0)
    ref = edited(model, lambda name, p: p.add_(0.05) if name in tree.params else None)
    torch.testing.assert_close(run(model, params), run(ref), **TOL64)
    assert_unchanged(model, before)


def test_shift_per_adapter():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, {"other": -0.1}, op="shift")
    for key, value in tree.params.items():
        if ".other." in key:
            torch.testing.assert_close(params[key], value.detach() - 0.1, rtol=0, atol=0)
        else:
            assert params[key] is value
    ref = edited(model, lambda name, p: p.sub_(0.1) if name in tree.params and ".other." in name else None)
    torch.testing.assert_close(run(model, params), run(ref), **TOL64)
    assert_unchanged(model, before)


def test_shift_by_key_tensor():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    key = next(k for k in tree.params if ".lora_A.other." in k)
    delta = torch.randn(tree.params[key].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = funcadapt.transform(tree, {key: delta}, op="shift")
    torch.testing.assert_close(params[key], tree.params[key].detach() + delta, rtol=0, atol=0)
    assert all(params[k] is v for k, v in tree.params.items() if k != key)
    ref = edited(model, lambda name, p: p.add_(delta) if name == key else None)
    torch.testing.assert_close(run(model, params), run(ref), **TOL64)
    assert_unchanged(model, before)


def test_replace_one_tensor():
    model = multi({"default": lora(), "other": lora(r=2)})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    key = next(k for k in tree.params if ".lora_B.default." in k)
    new = torch.randn(tree.params[key].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    params = funcadapt.transform(tree, {key: new}, op="replace")
    assert set(params) == set(tree.params)
    assert torch.equal(params[key], new)
    assert all(params[k] is v for k, v in tree.params.items() if k != key)
    ref = edited(model, lambda name, p: p.copy_(new) if name == key else None)
    y = run(model, params)
    assert not torch.allclose(y, run(model), atol=1e-4)
    torch.testing.assert_close(y, run(ref), **TOL64)
    with pytest.raises(ValueError, match="shape"):
        funcadapt.transform(tree, {key: new[:1]}, op="replace")
    with pytest.raises(ValueError, match="unknown parameter key"):
        funcadapt.transform(tree, {"not.a.key": new}, op="replace")
    assert_unchanged(model, before)


def test_replace_in_ia3_layer_matches_copy():
    """replace on a multiplicative adapter: the model behaves exactly like one with that vector."""
    model = multi({"default": IA3Config(target_modules=["v_proj"], feedforward_modules=[])})
    before = snapshot(model)
    tree = funcadapt.extract(model)
    key = next(iter(tree.params))
    new = torch.full_like(tree.params[key], 3.0)
    params = funcadapt.transform(tree, {key: new}, op="replace")
    ref = edited(model, lambda name, p: p.fill_(3.0) if name == key else None)
    torch.testing.assert_close(run(model, params), run(ref), **TOL64)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("case_id", "second"),
    [
        ("oft", lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
        ("road_1", lambda: RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj"])),
    ],
    ids=["oft", "road"],
)
def test_non_commuting_stacks_interpolate_jointly_and_refuse_invert(case_id, second):
    """Two rotation-type adapters on one layer (OFT∘OFT, RoAd∘RoAd): one coefficient for both is
    the layer's y0 + c·(y1 − y0); invert would need the inverses in reverse order and is refused."""
    model = build(case(case_id), dtype=torch.float64)
    model.add_adapter("other", second())  # created in float64 (PEFT follows the base layer's dtype)
    randomize_adapters(model, seed=7)
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    assert {s.adapter for s in tree.layers} == {"default", "other"}
    before = snapshot(model)
    with pytest.raises(ValueError, match="commute"):
        funcadapt.transform(tree, op="invert")
    with torch.no_grad():
        got = output(funcadapt.call(model, funcadapt.transform(tree, 0.5), **inputs()))
        with reference_interpolation(model, 0.5):
            want = output(model(**inputs()))
    torch.testing.assert_close(got, want, **TOL64)
    assert_unchanged(model, before)
