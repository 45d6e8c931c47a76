"""SDPA under funcadapt.vmap: the vmapped coefficient axis is folded into the batch (funcadapt.attention).

Reference: each coefficient as its own call (float64), for models that dispatch attention through
transformers' AttentionInterface (Llama with grouped-query attention, GPT-2, BERT with a padding mask),
a module and Falcon calling torch's SDPA themselves, diffusers' UNet (attention processors) and SD3 (its
native attention backend); torch's SDPA itself on every mask layout against one call per member; a user's
own "sdpa" registration is kept (and folded beneath); another library's replacement of torch's function is
kept; with attention dropout in training the fold is skipped. torch's function is its own again after
every call, and models still see the name "sdpa" (some branch on it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import build, case, inputs, output
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import funcadapt
from funcadapt import attention

TOL64 = {"rtol": 1e-10, "atol": 1e-12}
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
COEFFS = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)


def _sdpa_model(arch: str):
    model = build(case("lora"), arch=arch, dtype=torch.float64)
    model.get_base_model().set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model


def _batch(arch: str) -> dict[str, torch.Tensor]:
    batch = inputs(arch, batch=2, seq=6)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :2] = 0  # left padding in row 0: the mask is a real tensor, not only is_causal
    return {**batch, "attention_mask": mask}


def _count_folds(monkeypatch) -> list[int]:
    folds: list[int] = []
    real = attention._fold

    def counted(t, level, size, batch, *dims):
        folds.append(size)
        return real(t, level, size, batch, *dims)

    monkeypatch.setattr(attention, "_fold", counted)
    return folds


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_vmapped_sdpa_folds_and_equals_separate_calls(arch, monkeypatch):
    model = _sdpa_model(arch)
    batch = _batch(arch)
    tree = funcadapt.extract(model)
    folds = _count_folds(monkeypatch)

    def loss(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)).square().mean()

    names: list[str] = []
    for m in model.modules():
        if type(m).__name__.endswith(("Attention", "SelfAttention")) and hasattr(m, "config"):
            m.register_forward_pre_hook(lambda m, args: names.append(m.config._attn_implementation))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "performance drop" warning is a UserWarning
        c = COEFFS.clone().requires_grad_()
        got = funcadapt.vmap(loss)(c)
        got.sum().backward()
    assert folds and set(folds) == {len(COEFFS)}, "SDPA ran on the folded batch"
    assert names and set(names) == {"sdpa"}, "the model sees its own implementation's name"
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward, "the registry is untouched"
    assert F.scaled_dot_product_attention is TORCH_SDPA, "torch's function is restored"
    for i, ci in enumerate(COEFFS):
        one = ci.clone().requires_grad_()
        want = loss(one)
        want.backward()
        torch.testing.assert_close(got[i], want, **TOL64)
        torch.testing.assert_close(c.grad[i], one.grad, **TOL64)


class _OwnSdpa(torch.nn.Module):
    """An attention that calls torch's SDPA itself (as Falcon did before transformers 5.25)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


def test_models_that_call_sdpa_themselves_fold_and_are_exact(monkeypatch):
    """A module calling torch's SDPA in its own code is folded too (it looks the function up when it runs),
    without torch's warning, and is exact; so is Falcon, whichever way this transformers release runs its
    attention, and it sees the name "sdpa" (Falcon branches on it)."""
    from architectures import build_peft
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    own = get_peft_model(_OwnSdpa().double(), LoraConfig(r=2, target_modules=["q"], init_lora_weights=False)).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    falcon = build_peft("falcon", "lora")  # float64, eval, adapter randomized
    falcon.get_base_model().config._attn_implementation = "sdpa"  # (older Falcon refuses set_attn_implementation)
    seen: list[str] = []
    attn = next(m for name, m in falcon.named_modules() if name.endswith("self_attention"))
    attn.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    ids = torch.randint(3, 32, (2, 5))
    for model, batch in ((own, {"x": x}), (falcon, {"input_ids": ids})):
        folds = _count_folds(monkeypatch)
        tree = funcadapt.extract(model)

        def run(c, model=model, tree=tree, batch=batch):
            return output(funcadapt.call(model, funcadapt.transform(tree, c), **batch))

        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            got = funcadapt.vmap(run)(COEFFS)
        assert folds and set(folds) == {len(COEFFS)}
        for i, ci in enumerate(COEFFS):
            torch.testing.assert_close(got[i], run(ci), **TOL64)
    assert seen and set(seen) == {"sdpa"}
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_attention_dropout_in_training_is_not_folded(monkeypatch):
    """With dropout the fold would draw one mask for the folded batch whatever vmap's ``randomness``;
    torch's loop is kept, so randomness='same' still shares one mask between coefficients."""
    model = _sdpa_model("llama")
    model.get_base_model().config.attention_dropout = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    model.train()
    folds = _count_folds(monkeypatch)
    tree = funcadapt.extract(model)
    ids = inputs("llama", batch=2, seq=6)["input_ids"]
    torch.manual_seed(0)
    got = funcadapt.vmap(
        lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids)), randomness="same"
    )(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert not folds
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)


def test_a_users_own_sdpa_registration_is_kept(monkeypatch):
    """A function the user registered as "sdpa" runs under vmap as it is (nothing replaced), and torch's
    SDPA it calls is folded."""
    calls: list[int] = []

    def mine(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", mine)
    model = _sdpa_model("llama")
    batch = _batch("llama")
    tree = funcadapt.extract(model)
    folds = _count_folds(monkeypatch)
    got = funcadapt.vmap(lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)))(COEFFS)
    assert calls and folds
    assert AttentionInterface._global_mapping["sdpa"] is mine
    for i, ci in enumerate(COEFFS):
        want = output(funcadapt.call(model, funcadapt.transform(tree, ci), **batch))
        torch.testing.assert_close(got[i], want, **TOL64)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_another_librarys_replacement_of_torchs_sdpa_is_kept(monkeypatch):
    """Where something replaced torch.nn.functional.scaled_dot_product_attention, funcadapt leaves it in place
    under vmap (its replacement runs through torch's loop) and the result is still exact."""
    calls: list[int] = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", theirs)
    model = _sdpa_model("llama")
    batch = _batch("llama")
    tree = funcadapt.extract(model)
    folds = _count_folds(monkeypatch)
    got = funcadapt.vmap(lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)))(COEFFS)
    assert calls and not folds
    assert F.scaled_dot_product_attention is theirs
    for i, ci in enumerate(COEFFS):
        want = output(funcadapt.call(model, funcadapt.transform(tree, ci), **batch))
        torch.testing.assert_close(got[i], want, **TOL64)


def _member_calls(q, k, v, mask, mask_dim, **options):
    """torch's SDPA once per member of the vmapped axis 0 (the reference)."""
    outs = []
    for i in range(q.shape[0]):
        m = None if mask is None else (mask[i] if mask_dim == 0 else mask)
        outs.append(TORCH_SDPA(q[i], k[i], v[i], m, **options))
    return torch.stack(outs)


MASKS = {
    "none": (None, None),
    "batched [V, B, H, L, S]": ((3, 2, 2, 5, 5), 0),
    "shared [B, 1, L, S]": ((2, 1, 5, 5), None),
    "shared, broadcast batch [1, 1, L, S]": ((1, 1, 5, 5), None),
    "shared [L, S]": ((5, 5), None),
    "batched [V, L, S]": ((3, 5, 5), 0),
}


OPTIONS = [{}, {"scale": 0.3}, {"enable_gqa": True}]
SDPA_CASES = [(mask, options) for mask in MASKS for options in OPTIONS] + [("none", {"is_causal": True})]
"""(mask layout, options): is_causal only without a mask (torch refuses both at once)."""


@pytest.mark.parametrize(("mask_kind", "options"), SDPA_CASES, ids=str)
def test_folded_sdpa_equals_one_call_per_member(mask_kind, options):
    """funcadapt.attention.folded_sdpa under torch.func.vmap, against torch's SDPA once per member, for every
    mask layout (batched or shared, broadcast over the batch, fewer axes), causal, scaled and grouped-query
    attention; with gradients."""
    g = torch.Generator().manual_seed(0)
    heads_kv = 1 if options.get("enable_gqa") else 2
    q = torch.randn(3, 2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, heads_kv, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, heads_kv, 5, 4, generator=g, dtype=torch.float64)
    shape, mask_dim = MASKS[mask_kind]
    mask = None if shape is None else torch.randn(*shape, generator=g, dtype=torch.float64)
    got = torch.func.vmap(
        lambda q, k, v, m: attention.folded_sdpa(q, k, v, m, **options), in_dims=(0, 0, 0, mask_dim)
    )(q, k, v, mask)
    want = _member_calls(q, k, v, mask, mask_dim, **options)
    torch.testing.assert_close(got, want, **TOL64)
    grads = torch.autograd.grad(got.square().sum(), (q, k))
    torch.testing.assert_close(grads, torch.autograd.grad(want.square().sum(), (q, k)), **TOL64)


LAYOUTS = {
    # name: (query shape, key/value shape, query's in_dim); members V = 3, batch B = 2, heads 2, L = 3, S = 5
    "key/value [B, H, S, E]": ((3, 2, 2, 3, 4), (3, 2, 2, 5, 4), 0),
    "key/value [S, E] shared by rows and heads, S == B": ((3, 2, 2, 3, 4), (3, 2, 4), 0),
    "key/value [S, E], S != B": ((3, 2, 2, 3, 4), (3, 5, 4), 0),
    "key/value [H, S, E]": ((3, 2, 2, 3, 4), (3, 2, 5, 4), 0),
    "key/value [1, S, E], query [1, H, L, E]": ((3, 1, 2, 3, 4), (3, 1, 5, 4), 0),
    "query [1, H, L, E] shared by members, key/value [B, H, S, E]": ((1, 2, 3, 4), (3, 2, 2, 5, 4), None),
    "query [B, L, E] (3-D)": ((3, 2, 3, 4), (3, 2, 5, 4), 0),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folded_sdpa_broadcast_layouts_equal_one_call_per_member(layout):
    """Key and value broadcast against the query (fewer axes, a batch of 1, a query shared by the members)
    as torch's SDPA allows: folded where the inputs line up on one batch, torch's loop elsewhere, equal to one
    call per member either way."""
    q_shape, kv_shape, q_dim = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*q_shape, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*kv_shape, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(*kv_shape, generator=g, dtype=torch.float64)
    got = torch.func.vmap(attention.folded_sdpa, in_dims=(q_dim, 0, 0))(q, k, v)
    want = torch.stack([TORCH_SDPA(q if q_dim is None else q[i], k[i], v[i]) for i in range(k.shape[0])])
    torch.testing.assert_close(got, want, **TOL64)
    grads = torch.autograd.grad(got.square().sum(), (q, k))
    torch.testing.assert_close(grads, torch.autograd.grad(want.square().sum(), (q, k)), **TOL64)


@pytest.mark.filterwarnings("ignore:.*clip_sample.*")
@pytest.mark.parametrize("name", ["unet", "sd3"])
def test_diffusers_attention_folds_and_equals_separate_calls(name, monkeypatch):
    """diffusers' UNet (its attention processors call torch's SDPA) and SD3 (diffusers' native attention
    backend) under funcadapt.vmap over the coefficient: folded, without torch's warning, equal to one call
    per coefficient, gradients too."""
    from cases import randomize_adapters
    from diffusion_cases import HIDDEN, TOKENS, UNET_CONV, UNET_LINEAR, configs, tiny_sd3, tiny_unet

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0])
    if name == "unet":
        denoiser, config = tiny_unet(), configs(UNET_LINEAR, UNET_CONV)["lora"]()
        batch = {"sample": latents, "timestep": t, "encoder_hidden_states": text}
    else:
        denoiser, config = tiny_sd3(), configs(["to_q", "to_v", "add_k_proj"], [])["lora"]()
        pooled = torch.randn(2, 16, generator=g, dtype=torch.float64)
        batch = {"hidden_states": latents, "timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled}
    denoiser.add_adapter(config)
    randomize_adapters(denoiser, scale=0.1)
    denoiser.double()
    tree = funcadapt.extract(denoiser)

    def loss(c):
        return funcadapt.call(denoiser, funcadapt.transform(tree, c), **batch).sample.square().mean()

    folds = _count_folds(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        c = COEFFS.clone().requires_grad_()
        got = funcadapt.vmap(loss)(c)
        got.sum().backward()
    assert folds and set(folds) == {len(COEFFS)}
    assert F.scaled_dot_product_attention is TORCH_SDPA
    for i, ci in enumerate(COEFFS):
        one = ci.clone().requires_grad_()
        want = loss(one)
        want.backward()
        torch.testing.assert_close(got[i], want, **TOL64)
        torch.testing.assert_close(c.grad[i], one.grad, **TOL64)
