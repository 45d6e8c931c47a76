"""LoRA on the layers PEFT handles specially: nn.MultiheadAttention (funcadapt.rules.lora_mha) and
bare parameters through ``target_parameters`` (PEFT's ParamWrapper, rule "lora-param").

The references here are independent of funcadapt and of PEFT's forward: the attention is
recomputed with ``F.multi_head_attention_forward`` on weights built from the LoRA factors, the
parameter adapter with ``torch.func.functional_call`` on W + s·BA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from cases import TOL64
from custom_models import CASES as CUSTOM
from custom_models import build as build_custom
from custom_models import inputs as custom_inputs
from peft import LoraConfig, get_peft_model
from torch import nn

import funcadapt
from funcadapt.rules.lora_mha import out_proj_multiplicity

pytestmark = pytest.mark.filterwarnings("ignore")

PEFT_OUT_PROJ_ADDS = 2
"""PEFT ≤ 0.21 adds out_proj's ΔW twice in lora.MultiheadAttention.merge (huggingface/peft PR #3774)."""

# ----------------------------------------------------------------------------
# nn.MultiheadAttention


def mha_model(case_id: str = "lora-mha-mha") -> tuple[nn.Module, torch.Tensor]:
    case = next(c for c in CUSTOM if c.id == case_id)
    return build_custom(case), custom_inputs(case)


def delta(part: nn.Module, adapter: str = "default", c: float | torch.Tensor = 1.0) -> torch.Tensor:
    return c * (part.lora_B[adapter].weight @ part.lora_A[adapter].weight) * part.scaling[adapter]


def reference(model: nn.Module, x: torch.Tensor, c_in=1.0, c_out=1.0, k: int = PEFT_OUT_PROJ_ADDS) -> torch.Tensor:
    """The Attention model's output with W_in + c_in·ΔW_in and W_out + k·c_out·ΔW_out."""
    layer = model.base_model.model.mha
    mha = layer.base_layer
    out = mha.out_proj
    w_in = mha._parameters["in_proj_weight"] + delta(layer, c=c_in)
    w_out = out.base_layer.weight + k * delta(out, c=c_out)
    h, _ = F.multi_head_attention_forward(
        x, x, x, mha.embed_dim, mha.num_heads, w_in, mha.in_proj_bias, None, None, False, 0.0,
        w_out, out.base_layer.bias, training=False, need_weights=True,
    )  # fmt: skip
    return model.base_model.model.lin0(h)


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads(loss: torch.Tensor, tree: funcadapt.AdapterTree) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(trainable(tree).values())))


def test_peft_mha_adds_out_proj_delta_twice():
    """Pins a PEFT bug: its forward runs W_out + 2·ΔW_out. funcadapt reads the multiplicity from
    PEFT's merge, so c = 1 stays PEFT's forward once the fix lands; then update PEFT_OUT_PROJ_ADDS."""
    model, x = mha_model()
    assert out_proj_multiplicity() == PEFT_OUT_PROJ_ADDS
    with torch.no_grad():
        y1 = model(x)
        torch.testing.assert_close(y1, reference(model, x), **TOL64)
        assert not torch.allclose(y1, reference(model, x, k=1), atol=1e-4)


@pytest.mark.parametrize("c", [-1.0, 0.5, 2.0])
def test_mha_linear_values_and_all_gradients(c):
    """mode='linear' is y0 + c·(y1 − y0) at the attention output; the gradients of both
    projections' factors are those of that function (PEFT's backward halves out_proj's)."""
    model, x = mha_model()
    tree = funcadapt.extract(model)
    assert {s.rule for s in tree.layers} == {"lora-mha"}  # the attention and its nested out_proj layer
    w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    got = funcadapt.call(model, funcadapt.transform(tree, c), x)
    with torch.no_grad():
        y0 = reference(model, x, 0.0, 0.0)
    want = y0 + c * (reference(model, x) - y0)
    torch.testing.assert_close(got, want, **TOL64)
    for g, r in zip(grads((got * w).sum(), tree), grads((want * w).sum(), tree), strict=True):
        torch.testing.assert_close(g, r, **TOL64)
        assert r.abs().max() > 0


@pytest.mark.parametrize("c", [-1.0, 0.5])
def test_mha_geometric_and_invert(c):
    """mode='geometric' scales ΔW in both projections (weight space); invert is ΔW ↦ −ΔW."""
    model, x = mha_model()
    tree = funcadapt.extract(model)
    with torch.no_grad():
        got = funcadapt.call(model, funcadapt.transform(tree, c, mode="geometric"), x)
        torch.testing.assert_close(got, reference(model, x, c, c), **TOL64)
        inverted = funcadapt.call(model, funcadapt.transform(tree, op="invert"), x)
        torch.testing.assert_close(inverted, reference(model, x, -1.0, -1.0), **TOL64)


@pytest.mark.parametrize("mode", ["linear", "geometric"])
def test_mha_vmap_equals_loop_all_gradients(mode):
    model, x = mha_model()
    tree = funcadapt.extract(model)
    coeffs = torch.tensor([1.0, -1.0, 0.5])
    w = torch.randn(3, *model(x).shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)

    def loss(c, wc):
        return (funcadapt.call(model, funcadapt.transform(tree, c, mode=mode), x) * wc).sum()

    vmapped = funcadapt.vmap(loss)(coeffs, w)
    loop = torch.stack([loss(coeffs[i], w[i]) for i in range(3)])
    torch.testing.assert_close(vmapped, loop, **TOL64)
    for g, r in zip(grads(vmapped.sum(), tree), grads(loop.sum(), tree), strict=True):
        torch.testing.assert_close(g, r, **TOL64)


def _base_weights(model: nn.Module) -> list[nn.Parameter]:
    mha = model.base_model.model.mha.base_layer
    return [mha._parameters["in_proj_weight"], mha.out_proj.base_layer._parameters["weight"]]


def test_mha_calls_leave_the_weights_alone_unlike_peft():
    """PEFT's forward merges and unmerges, replacing the base Parameters with (W + ΔW) − ΔW: in
    bfloat16 that moves them. funcadapt's forward never touches them, at any coefficient."""
    model, x = mha_model()
    model = model.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    tree = funcadapt.extract(model)
    before = [(p, p.detach().clone()) for p in _base_weights(model)]
    for c in (1.0, 0.3, -1.0, torch.tensor(0.7, requires_grad=True)):
        funcadapt.call(model, funcadapt.transform(tree, c), x).float().sum().backward()
        funcadapt.call(model, funcadapt.transform(tree, c, mode="geometric"), x)
    for (p, v), now in zip(before, _base_weights(model), strict=True):
        assert now is p and torch.equal(now, v)
    with torch.no_grad():
        model(x)  # PEFT's own forward
    moved = [not torch.equal(now, v) for (_, v), now in zip(before, _base_weights(model), strict=True)]
    assert any(moved), "PEFT's bf16 merge/unmerge no longer moves the weights: drop this half of the test"


def test_mha_batch_first_fast_path():
    """A batch-first attention in eval mode takes torch's fused fast path without grad; c = 1 is
    still PEFT bit for bit, and under torch.func transforms (which the fused kernel does not
    support) the composite path runs; the global fast-path switch is restored."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False)).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # float64: the fused kernel takes it too
    tree = funcadapt.extract(model)
    with torch.no_grad():
        y1 = model(x)
        assert torch.equal(funcadapt.call(model, funcadapt.transform(tree, 1.0), x), y1)
    c = torch.tensor(0.5, dtype=x.dtype)
    g = torch.func.grad(lambda c: funcadapt.call(model, funcadapt.transform(tree, c), x).sum())(c)
    with torch.no_grad():
        y0 = funcadapt.call(model, funcadapt.transform(tree, 0.0), x)
    torch.testing.assert_close(g, (y1 - y0).sum(), **TOL64)
    assert torch.backends.mha.get_fastpath_enabled()


def test_mha_two_adapters():
    """Two adapters on one attention: c = 1 is PEFT's forward; one coefficient interpolates the
    layer as a whole; different coefficients are refused (one output interpolation)."""
    model, x = mha_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    tree = funcadapt.extract(model)
    with torch.no_grad():
        model(x)  # PEFT's merge/unmerge rounds the base weights on its first call: y1 is its second
        y1 = model(x)
        with model.disable_adapter():
            y0 = model(x)
        assert torch.equal(funcadapt.call(model, funcadapt.transform(tree, 1.0), x), y1)
        got = funcadapt.call(model, funcadapt.transform(tree, 0.5), x)
        torch.testing.assert_close(got, y0 + 0.5 * (y1 - y0), **TOL64)
        with pytest.raises(ValueError, match="different coefficients"):
            funcadapt.call(model, funcadapt.transform(tree, {"default": 0.5, "other": 1.5}), x)


def test_mha_nested_contexts_compose():
    model, x = mha_model()
    with torch.no_grad():
        with funcadapt.AdapterModifier(model, "scale", 2.0), funcadapt.AdapterModifier(model, "scale", -0.25):
            nested = model(x)
        with funcadapt.AdapterModifier(model, "scale", -0.5):
            direct = model(x)
    torch.testing.assert_close(nested, direct, **TOL64)


# ----------------------------------------------------------------------------
# target_parameters (ParamWrapper)


class Experts(nn.Module):
    """A 3-d expert stack used non-linearly: Σ_e tanh(x·W_e) (the kind of module target_parameters is for)."""

    def __init__(self, n_experts: int = 3, n_in: int = 6, n_out: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, n_in, n_out) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("bi,eio->beo", x, self.weight)).sum(1)


class ExpertNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


def expert_model(adapters: int = 1) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=[], target_parameters=["experts.weight"], init_lora_weights=False)
    model = get_peft_model(ExpertNet(), config)
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", copy.deepcopy(config))
    if adapters > 1:
        model.base_model.set_adapter(["default", *[f"a{i}" for i in range(1, adapters)]])
    return model.double().eval()  # float64: every check here is an exactness claim (cases.TOL64)


def param_reference(model: nn.Module, x: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """The model with the expert stack replaced by W + c·Σ ΔW_a (ΔW from PEFT's get_delta_weight)."""
    layer = model.base_model.model.experts
    weight = layer.base_layer.weight + c * sum(layer.get_delta_weight(a) for a in layer.active_adapters)
    with model.disable_adapter():  # PEFT would add its ΔW on top of the weight shown
        return torch.func.functional_call(model, {"base_model.model.experts.base_layer.weight": weight}, (x,))


@pytest.mark.parametrize("adapters", [1, 2])  # one: PEFT's factored baddbmm; two: the summed delta
def test_param_wrapper_endpoints_and_linear_mode(adapters):
    model = expert_model(adapters)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tree = funcadapt.extract(model)
    assert {s.rule for s in tree.layers} == {"lora-param"}
    with torch.no_grad():
        y1 = model(x)
        with model.disable_adapter():
            y0 = model(x)
        assert torch.equal(funcadapt.call(model, funcadapt.transform(tree, 1.0), x), y1)
        torch.testing.assert_close(param_reference(model, x), y1, **TOL64)
        assert torch.equal(funcadapt.call(model, funcadapt.transform(tree, op="disable"), x), y0)
        for c in (-1.0, 0.5):
            # the module is non-linear in W: linear mode interpolates its output ...
            layer_y0 = model.base_model.model.experts.base_layer(x)
            with funcadapt.AdapterModifier(model, "scale", 1.0):
                layer_y1 = model.base_model.model.experts(x)
            want = model.base_model.model.head(layer_y0 + c * (layer_y1 - layer_y0))
            got = funcadapt.call(model, funcadapt.transform(tree, c), x)
            torch.testing.assert_close(got, want, **TOL64)
            # ... which is not what scaling ΔW gives; that is geometric mode
            geometric = funcadapt.call(model, funcadapt.transform(tree, c, mode="geometric"), x)
            torch.testing.assert_close(geometric, param_reference(model, x, c), **TOL64)
            assert not torch.allclose(geometric, got, atol=1e-4)


@pytest.mark.parametrize("mode", ["linear", "geometric"])
def test_param_wrapper_vmap_and_model_unchanged(mode):
    """vmap == loop (values and gradients), with no parametrization registered and the expert
    Parameter untouched: the same object, the same values, the same autograd version."""
    model = expert_model(2)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tree = funcadapt.extract(model)
    owner = model.base_model.model.experts.base_layer
    weight, version = owner.weight, owner.weight._version
    coeffs = torch.tensor([1.0, -1.0, 0.5])

    def loss(c):
        return funcadapt.call(model, funcadapt.transform(tree, c, mode=mode), x).square().sum()

    vmapped = funcadapt.vmap(loss)(coeffs)
    loop = torch.stack([loss(c) for c in coeffs])
    torch.testing.assert_close(vmapped, loop, **TOL64)
    for g, r in zip(grads(vmapped.sum(), tree), grads(loop.sum(), tree), strict=True):
        torch.testing.assert_close(g, r, **TOL64)
    assert not nn.utils.parametrize.is_parametrized(owner)
    assert owner.weight is weight and owner.weight._version == version


class _Block(nn.Module):
    """A bare Parameter (for ``target_parameters``) beside a Linear (for ``target_modules``): PEFT then
    nests the Linear's LoRA layer inside the ParamWrapper, both holding adapter "default"."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w) + self.lin(x)


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = _Block()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blk(x))


@pytest.mark.parametrize("c", [0.5, -1.0])
def test_lora_nested_in_a_param_wrapper_scales_its_own_b(c):
    """The nested Linear's scale acts on its own B, not on the enclosing ParamWrapper's ``scaling``
    entry of the same adapter name (both are applied at the host layer). Reference, written into a
    copy: the nested B times c, and the ParamWrapper's output interpolation y0 + c·(y1 − y0) through the
    affine head, y0 with only the ParamWrapper's adapter switched off (PEFT's active-adapter list)."""
    from peft.tuners.lora.layer import ParamWrapper

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], target_parameters=["blk.w"], init_lora_weights=False)
    model = get_peft_model(_Nested(), config).double().eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    ref = copy.deepcopy(model)
    wrapper = next(m for m in ref.modules() if isinstance(m, ParamWrapper))
    lin = next(m for name, m in ref.named_modules() if name.endswith(".lin"))
    with torch.no_grad():
        lin.lora_B["default"].weight.mul_(c)
        h1 = ref(x)
        saved, wrapper._active_adapter = wrapper._active_adapter, []
        h0 = ref(x)
        wrapper._active_adapter = saved
    want = h0 + c * (h1 - h0)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        with funcadapt.AdapterModifier(model, "scale", c):
            got = model(x)
        got_call = funcadapt.call(model, funcadapt.transform(tree, torch.tensor(c, dtype=torch.float64)), x)
    torch.testing.assert_close(got, want, **TOL64)
    torch.testing.assert_close(got_call, want, **TOL64)
