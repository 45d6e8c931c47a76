"""Diffusion pipelines: every strength of an adapter in one pipeline call (funcadapt.per_image), strengths
per denoising step (funcadapt.per_step), slider training, coefficient fields by block, adapters loaded
the ways diffusers loads them.

References use nothing from funcadapt: separate pipeline calls at each strength under forward hooks
that interpolate every adapted layer with PEFT's disable switch (cases.reference_interpolation),
diffusers' own ``set_adapters(weights=...)`` for LoRA, per-row hooks in one call, and a hook that
counts the denoiser's calls for schedules. Everything in float64, where the claim is exactness (the
same function, computed in another order: rounding of a few 1e-16 relative to the latents).
"""

from __future__ import annotations

import pytest
import torch
from cases import ByOutput, assert_unchanged, randomize_adapters, reference_interpolation, snapshot
from diffusion_cases import FAMILIES, rows_reference, setup, stepped_reference, tiny_unet, tiny_unet2d
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

import funcadapt
from funcadapt import AdapterModifier

pytestmark = pytest.mark.filterwarnings("ignore")

STRENGTHS = [-1.5, 0.0, 0.5, 2.0]  # 2 prompts × 2 images
SEEDS = [11, 12, 13, 14]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float64: the same function computed in another order (batched or not, interpolated inside a layer or
    by a hook) differs by rounding, ~1e-16 of the largest entry per operation; 1e-10 of it is far below any
    real difference (a strength ignored or misplaced moves latents by O(1))."""
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def one_call(s, coeff, cfg=5.0, **extra):
    kw = s.call_kwargs(2)
    with AdapterModifier(s.denoiser, "scale", coeff):
        return s.run(kw, SEEDS, 2, cfg, **extra)


# ---- strengths per image, one pipeline call ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pipeline", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_one_call_equals_separate_calls(pipeline, family, cfg):
    """Image i of one call at per_image(strengths) equals a call for image i alone at its strength (same
    prompt, same seed), with and without classifier-free guidance, for every family on a UNet and a DiT."""
    s = setup(pipeline, family)
    kw = s.call_kwargs(2)
    before = snapshot(s.denoiser)
    got = one_call(s, funcadapt.per_image(STRENGTHS), cfg)
    assert_unchanged(s.denoiser, before)
    base = s.run(kw, SEEDS, 2, cfg)
    for i, strength in enumerate(STRENGTHS):
        alone = {k: v[i // 2 : i // 2 + 1] for k, v in kw.items()}
        with reference_interpolation(s.denoiser, strength):
            want = s.run(alone, [SEEDS[i]], 1, cfg)
        assert_close(got[i : i + 1], want)
    assert not torch.allclose(got[0], base[0])  # the strength acts


@pytest.mark.parametrize("pipeline", ["sd", "sdxl", "sd3"])
def test_lora_equals_diffusers_set_adapters(pipeline):
    """LoRA: each image equals diffusers' own ``set_adapters(weights=[s])`` run alone."""
    s = setup(pipeline, "lora")
    kw = s.call_kwargs(2)
    got = one_call(s, funcadapt.per_image(STRENGTHS))
    for i, strength in enumerate(STRENGTHS):
        s.denoiser.set_adapters(["default"], weights=[strength])
        try:
            want = s.run({k: v[i // 2 : i // 2 + 1] for k, v in kw.items()}, [SEEDS[i]], 1, 5.0)
        finally:
            s.denoiser.set_adapters(["default"], weights=[1.0])
        assert_close(got[i : i + 1], want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pipeline", ["sd", "sd3"])
def test_unconditional_half_at_its_own_coefficient(pipeline, family):
    """``uncond=0.0``: the CFG batch's unconditional rows at 0, the conditional rows at each image's
    strength (per-row hooks in one call); without CFG it is per_image(strengths) itself."""
    s = setup(pipeline, family)
    kw = s.call_kwargs(2)
    got = one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0))
    with reference_interpolation(s.denoiser, rows_reference(STRENGTHS, [0.0] * 4)):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)
    same = one_call(s, funcadapt.per_image(STRENGTHS))
    assert not torch.allclose(got, same)
    # without guidance there is no unconditional half: every row at its image's strength
    with reference_interpolation(s.denoiser, rows_reference(STRENGTHS)):
        want = s.run(kw, SEEDS, 2, 1.0)
    assert_close(one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0), 1.0), want)


@pytest.mark.parametrize("family", ["lora", "oft"])
@pytest.mark.parametrize("pipeline", ["sd", "sd3"])
def test_schedule_per_step(pipeline, family):
    """per_step: step k at values[k] for every image ([S]) or values[k, i] for image i ([S, N]), with the
    unconditional half the same or at its own coefficient; a hook counting the denoiser's calls is the
    reference."""
    s = setup(pipeline, family)
    kw = s.call_kwargs(2)
    ramp = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    got = one_call(s, funcadapt.per_step(ramp))
    with stepped_reference(s.denoiser, lambda k: float(ramp[k])):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)

    table = torch.tensor([[0.0, 0.0, 1.0, -1.0], [0.5, 1.0, 1.0, -1.0], [2.0, 1.5, 1.0, -1.0]], dtype=torch.float64)
    got = one_call(s, funcadapt.per_step(table, uncond=0.25))
    with stepped_reference(s.denoiser, lambda k: rows_reference(table[k].tolist(), [0.25] * 4)):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)
    # a constant schedule is per_image
    with reference_interpolation(s.denoiser, rows_reference(table[0].tolist())):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(one_call(s, funcadapt.per_step(table[[0, 0, 0]])), want)
    assert_close(one_call(s, funcadapt.per_image(table[0])), want)


def test_images_per_prompt_repeat():
    """per_image(one_per_prompt, repeat=k) gives each prompt's k images its strength (image p·k + j)."""
    s = setup("sd", "lora")
    kw = s.call_kwargs(2)
    with reference_interpolation(s.denoiser, rows_reference([-1.0, -1.0, 2.0, 2.0])):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(one_call(s, funcadapt.per_image([-1.0, 2.0], repeat=2)), want)
    table = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    with stepped_reference(s.denoiser, lambda k: rows_reference(table[k].repeat_interleave(2).tolist())):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(one_call(s, funcadapt.per_step(table, repeat=2)), want)


def test_flux_true_cfg_separate_calls():
    """Flux runs the unconditional prediction (true_cfg_scale) as a second denoiser call per step: 'same'
    steers both calls at each image's strength (separate calls are the reference); a number is refused,
    since the calls cannot be told apart, and the model is left as it was. Schedules count the two calls
    of a step as one step."""
    s = setup("flux", "lora")
    kw = s.call_kwargs(2)
    got = one_call(s, funcadapt.per_image(STRENGTHS))
    for i, strength in enumerate(STRENGTHS):
        with reference_interpolation(s.denoiser, strength):
            want = s.run({k: v[i // 2 : i // 2 + 1] for k, v in kw.items()}, [SEEDS[i]], 1, 5.0)
        assert_close(got[i : i + 1], want)
    before = snapshot(s.denoiser)
    with pytest.raises(ValueError, match=r"placed only on denoisers known to put it first"):
        one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0))  # Flux is not in UNCOND_FIRST
    name = f"{type(s.denoiser).__module__}.{type(s.denoiser).__qualname__}"
    with pytest.MonkeyPatch.context() as patched:  # were it known, the second call of a step is still refused
        patched.setitem(funcadapt.images.UNCOND_FIRST, name, "a test")
        with pytest.raises(ValueError, match=r"second time at the same timestep.*uncond='same'"):
            one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0))
    assert_unchanged(s.denoiser, before)
    ramp = [0.0, 1.0, -1.0]
    got = one_call(s, funcadapt.per_step(ramp))
    with stepped_reference(s.denoiser, lambda k: ramp[k], calls_per_step=2):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)


def test_strengths_are_differentiable():
    """The gradient of a function of the denoiser's prediction with respect to the per-image strengths (a
    CFG batch, the unconditional half at its own coefficient) equals central differences. (Pipelines run
    under torch.no_grad(); a differentiable strength is for losses on the denoiser, as in training.)"""
    s = setup("sd", "lora")
    plus, _, _, text = _noisy_pair(s)
    x, t = torch.cat([plus, plus]), torch.tensor(400)  # a guidance batch: the same latents, other conditioning
    values = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)

    def metric(v: torch.Tensor) -> torch.Tensor:
        with AdapterModifier(s.denoiser, "scale", funcadapt.per_image(v, uncond=0.5)):
            return s.denoiser(x, t, encoder_hidden_states=torch.cat([-text, text])).sample.pow(2).sum()

    (grad,) = torch.autograd.grad(metric(values), values)
    eps = 1e-5
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        with torch.no_grad():
            fd = (metric(values + e) - metric(values - e)) / (2 * eps)
        torch.testing.assert_close(grad[i], fd, rtol=1e-6, atol=1e-9)
    assert grad.abs().min() > 0


# ---- refusals ---------------------------------------------------------------------------------------------


def test_refusals_name_the_problem_and_leave_the_model():
    s = setup("sd", "lora")
    before = snapshot(s.denoiser)
    with pytest.raises(ValueError, match=r"denoiser's input has 8 rows and 3 per-image strengths"):
        one_call(s, funcadapt.per_image([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"schedule gives 2 steps, and the denoiser is running step 3"):
        one_call(s, funcadapt.per_step([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"per_step with a number for uncond needs one value per step and image"):
        funcadapt.per_step([0.0, 1.0, 2.0], uncond=0.0)
    with pytest.raises(ValueError, match=r"per_image takes strengths of shape \[N\]"):
        funcadapt.per_image([[1.0]])
    with pytest.raises(ValueError, match="uncond must be 'same' or a number"):
        funcadapt.per_image([1.0], uncond="cond")  # type: ignore[arg-type]
    with (
        pytest.raises(ValueError, match=r"defined for mode='linear' only"),
        AdapterModifier(s.denoiser, "scale", funcadapt.per_image([1.0] * 4), mode="geometric"),
    ):
        pass
    with pytest.raises(ValueError, match=r"cannot export per-image coefficients"):
        funcadapt.export(
            get_peft_model(tiny_unet(), LoraConfig(target_modules=["to_q"])), funcadapt.per_image([1.0]), "/nonexistent"
        )
    # a submodule run alone has no pass to read its rows from
    with AdapterModifier(s.denoiser, "scale", funcadapt.per_image([1.0, 2.0])):
        block = s.denoiser.down_blocks[0].resnets[0]
        with pytest.raises(ValueError, match=r"call the denoiser .* itself, not one of its submodules"):
            block.conv1(torch.zeros(1, 16, 8, 8, dtype=torch.float64))
    assert_unchanged(s.denoiser, before)


def test_layer_that_folds_rows_is_refused():
    """A layer whose output does not keep the denoiser's rows (frames or patches folded into its batch)
    is refused by name, not given a coefficient by position."""

    class Folding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            folded = sample.reshape(-1, 4)  # [B·F, 4]
            return self.proj(folded).reshape(sample.shape)

    model = get_peft_model(Folding(), LoraConfig(target_modules=["proj"], init_lora_weights=False))
    refused = r"'base_model.model.proj': its output has 6 rows, but the denoiser's input has 2"
    with AdapterModifier(model, "scale", funcadapt.per_image([1.0, 2.0])), pytest.raises(ValueError, match=refused):
        model(torch.zeros(2, 3, 4), torch.tensor(10))


# ---- adapters as diffusers loads them ---------------------------------------------------------------------


def test_load_lora_weights_two_named_adapters(tmp_path):
    """Adapters loaded with diffusers' ``load_lora_weights`` from a file, two named ones, a dict of
    strengths: image i equals ``set_adapters([a, b], weights=[sa_i, sb_i])`` alone."""
    source = setup("sd", "lora")
    kw = source.call_kwargs(2)
    state = get_peft_model_state_dict(source.denoiser)
    type(source.pipe).save_lora_weights(tmp_path / "slider", unet_lora_layers=state)
    other = {k: v * -0.5 for k, v in state.items()}
    type(source.pipe).save_lora_weights(tmp_path / "other", unet_lora_layers=other)

    s = setup("sd", "lora")
    s.denoiser.delete_adapters(["default"])
    s.pipe.load_lora_weights(tmp_path / "slider", adapter_name="slider")
    s.pipe.load_lora_weights(tmp_path / "other", adapter_name="other")
    s.pipe.set_adapters(["slider", "other"])
    s.pipe.to(torch.float64)
    a, b = [-1.0, 0.0, 1.0, 2.0], [0.5, 1.0, -1.0, 0.0]
    with AdapterModifier(s.denoiser, "scale", {"slider": funcadapt.per_image(a), "other": funcadapt.per_image(b)}):
        got = s.run(kw, SEEDS, 2, 5.0)
    for i in range(4):
        s.denoiser.set_adapters(["slider", "other"], weights=[a[i], b[i]])
        try:
            want = s.run({k: v[i // 2 : i // 2 + 1] for k, v in kw.items()}, [SEEDS[i]], 1, 5.0)
        finally:
            s.denoiser.set_adapters(["slider", "other"], weights=[1.0, 1.0])
        assert_close(got[i : i + 1], want)


def test_get_peft_model_denoiser():
    """A denoiser wrapped by get_peft_model and put in the pipeline: the wrapper's forward(*args, **kwargs)
    is read through to the rows and timestep."""
    s = setup("sd", "lora")
    kw = s.call_kwargs(2)
    wrapped = get_peft_model(
        tiny_unet(), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "conv1"], init_lora_weights=False)
    )
    wrapped.to(torch.float64)
    s.pipe.unet = wrapped
    values = torch.tensor([[0.0, 1.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    with AdapterModifier(wrapped, "scale", funcadapt.per_step(values)):
        got = s.run(kw, SEEDS, 2, 5.0)
    with stepped_reference(wrapped, lambda k: rows_reference(values[k].tolist())):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)


def test_wrapper_called_with_keywords_in_any_order():
    """A PEFT wrapper's forward(*args, **kwargs) names no argument, so what it is called with is read where the
    denoiser's own forward starts: with the timestep given first as a keyword, four different images and two
    strengths are refused (not a guidance batch, although the timestep's halves are equal), and a guidance
    batch gets the unconditional strength on its first half."""
    wrapped = get_peft_model(
        tiny_unet(), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "conv1"], init_lora_weights=False)
    )
    wrapped.to(torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(4, 5, 32, generator=g, dtype=torch.float64)
    t = torch.full((4,), 500.0, dtype=torch.float64)
    strengths = funcadapt.per_image([1.0, -1.0], uncond=0.0)
    before = snapshot(wrapped)
    with (
        pytest.raises(ValueError, match="not a classifier-free-guidance batch"),
        AdapterModifier(wrapped, "scale", strengths),
    ):
        wrapped(timestep=t, sample=x, encoder_hidden_states=text)
    assert_unchanged(wrapped, before)
    guidance = torch.cat([x[:2], x[:2]])
    with torch.no_grad(), AdapterModifier(wrapped, "scale", strengths):
        got = wrapped(timestep=t, sample=guidance, encoder_hidden_states=text).sample
    with torch.no_grad(), reference_interpolation(wrapped, rows_reference([1.0, -1.0], [0.0, 0.0])):
        want = wrapped(timestep=t, sample=guidance, encoder_hidden_states=text).sample
    assert_close(got, want)


def test_denoiser_whose_own_forward_names_no_argument():
    """A denoiser whose own forward is (*args, **kwargs) (no wrapper around it): its latents are its first
    positional argument (exact against hooks), and called with keywords only it is refused, since the first
    keyword could be the timestep."""

    class ArgsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 8)

        def forward(self, *args, **kwargs):
            sample = args[0] if args else kwargs["sample"]
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            return self.proj(sample + t / 1000) + kwargs["encoder_hidden_states"]

    torch.manual_seed(0)
    model = ArgsOnly()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), model)
    model.to(torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    text = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(5.0, dtype=torch.float64)
    strengths = funcadapt.per_image([1.0, -1.0])
    with torch.no_grad(), AdapterModifier(model, "scale", strengths):
        got = model(torch.cat([x, x]), timestep=t, encoder_hidden_states=text)
    with torch.no_grad(), reference_interpolation(model, rows_reference([1.0, -1.0])):
        want = model(torch.cat([x, x]), timestep=t, encoder_hidden_states=text)
    assert_close(got, want)
    with pytest.raises(ValueError, match="names none"), AdapterModifier(model, "scale", strengths):
        model(timestep=t, sample=torch.cat([x, x]), encoder_hidden_states=text)


# ---- training and coefficient fields ----------------------------------------------------------------------


def _noisy_pair(s, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)  # noqa: E731
    return x(), x(), x(), torch.randn(2, 5, 32, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("how", ["vmap", "coefficient batch"])
def test_slider_step_gradients_equal_two_passes(how):
    """The slider objective, +1 on one set of inputs and −1 on the other, in one vmapped step or one
    coefficient batch: the adapter's gradients equal those of two AdapterModifier passes."""
    s = setup("sd", "lora")
    unet = s.denoiser
    plus, minus, noise, text = _noisy_pair(s)
    t = torch.tensor([500, 500])
    params = [p for p in unet.parameters() if p.requires_grad]

    def loss_at(c, x):
        with AdapterModifier(unet, "scale", c):
            return (unet(x, t, encoder_hidden_states=text).sample - noise).pow(2).mean()

    want = torch.autograd.grad(loss_at(1.0, plus) + loss_at(-1.0, minus), params)
    if how == "vmap":
        tree = funcadapt.extract(unet)

        def loss(c, x):
            out = funcadapt.call(unet, funcadapt.transform(tree, c), x, t, encoder_hidden_states=text).sample
            return (out - noise).pow(2).mean()

        total = funcadapt.vmap(loss)(torch.tensor([1.0, -1.0], dtype=torch.float64), torch.stack([plus, minus])).sum()
    else:
        with AdapterModifier(unet, "scale", funcadapt.per_image([1.0, 1.0, -1.0, -1.0])):
            out = unet(
                torch.cat([plus, minus]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, text])
            ).sample
        total = (out - torch.cat([noise, noise])).pow(2).mean(dim=(1, 2, 3)).view(2, 2).mean(dim=1).sum()
    got = torch.autograd.grad(total, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pipeline", ["sd", "sd3", "flux"])
def test_block_fields(pipeline):
    """layer_groups(by='block') on a UNet gives down_blocks.i, mid_block and up_blocks.i (the mid block one
    group), on SD3 its transformer blocks by index, on Flux transformer_blocks.i and single_transformer_blocks.i.
    A per-image vector of block strengths equals per-layer hooks, and so does a per-step one ([S, N, G], the
    reference switched by the denoiser's calls)."""
    s = setup(pipeline, "lora")
    tree = funcadapt.extract(s.denoiser)
    groups = funcadapt.layer_groups(tree, "block")
    if pipeline == "sd":
        blocks = [g for g in groups if "." not in g or g.split(".")[0] in ("down_blocks", "up_blocks")]
        assert blocks[:2] == ["down_blocks.0", "down_blocks.1"] and "mid_block" in groups
        assert {"up_blocks.0", "up_blocks.1"} <= set(groups)
        assert not any(g.startswith("mid_block.") for g in groups)
    elif pipeline == "sd3":
        assert {"0", "1"} <= set(groups)
    else:
        assert list(groups) == ["transformer_blocks.0", "single_transformer_blocks.0"]
    g = len(groups)
    group_of = {path: i for i, members in enumerate(groups.values()) for path in members}
    kw = s.call_kwargs(2)

    def by_layer(table):  # table [N, G]: image i's strength in group g
        return lambda path: rows_reference(table[:, group_of[path]].tolist())

    vectors = torch.linspace(-1.0, 2.0, 4 * g, dtype=torch.float64).reshape(4, g)
    got = one_call(s, funcadapt.per_image(vectors, groups=groups))
    with reference_interpolation(s.denoiser, by_layer(vectors)):
        want = s.run(kw, SEEDS, 2, 5.0)
    assert_close(got, want)
    if pipeline == "flux":
        return  # (two denoiser calls per step under true CFG: the schedule's reference counts one per step)
    schedule = torch.stack([vectors, -vectors, vectors.flip(0)])  # [S, N, G]
    got = one_call(s, funcadapt.per_step(schedule, groups=groups))
    layer_of_step = [by_layer(schedule[k]) for k in range(3)]
    step = [0]

    def per_layer(path):
        return ByOutput(lambda y: layer_of_step[step[0]](path).at(y))

    def count(module, args, kwargs):
        step[0] = count.calls
        count.calls += 1

    count.calls = 0
    handle = s.denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with reference_interpolation(s.denoiser, per_layer):
            want = s.run(kw, SEEDS, 2, 5.0)
    finally:
        handle.remove()
    assert_close(got, want)


def test_vmap_through_group_norm():
    """funcadapt.vmap over coefficients on a UNet2DModel, whose attention blocks hand GroupNorm an input
    torch's vmap cannot query ("NYI: querying is_contiguous"), equals one AdapterModifier pass each."""
    unet = tiny_unet2d()
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False), unet)
    randomize_adapters(unet, scale=0.1)
    unet.to(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 900])
    coeffs = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    tree = funcadapt.extract(unet)
    got = funcadapt.vmap(lambda c: funcadapt.call(unet, funcadapt.transform(tree, c), x, t).sample)(coeffs)
    for c, row in zip(coeffs.tolist(), got, strict=True):
        with reference_interpolation(unet, c):
            assert_close(row, unet(x, t).sample)


def test_gradient_checkpointing():
    """Checkpointed denoisers, two forwards at two steps of a schedule in one context, backward after it:
    diffusers' block checkpointing and a checkpoint around the whole denoiser (whose recompute enters the
    model again, at a timestep already seen) give the gradients of the uncheckpointed reference (hooks
    switched by a call counter)."""
    s = setup("sd", "lora")
    unet = s.denoiser
    plus, minus, noise, text = _noisy_pair(s)
    x, text2 = torch.cat([plus, minus]), torch.cat([text, text])
    steps = [torch.tensor(700), torch.tensor(300)]
    table = torch.tensor([[1.0, 1.0, -1.0, -1.0], [0.5, 2.0, -0.5, 0.0]], dtype=torch.float64)
    params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()

    def loss(run):
        return sum((run(x, t).sample - torch.cat([noise, noise])).pow(2).sum() for t in steps)

    with stepped_reference(unet, lambda k: rows_reference(table[k].tolist())):
        want = torch.autograd.grad(loss(lambda x, t: unet(x, t, encoder_hidden_states=text2)), params)

    def whole(x, t):
        return torch.utils.checkpoint.checkpoint(unet, x, t, encoder_hidden_states=text2, use_reentrant=False)

    with AdapterModifier(unet, "scale", funcadapt.per_step(table)):
        total = loss(whole)
        got_whole = torch.autograd.grad(total, params)  # the recompute runs inside the context
    unet.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    with AdapterModifier(unet, "scale", funcadapt.per_step(table)):
        total = loss(lambda x, t: unet(x, t, encoder_hidden_states=text2))
    got_blocks = torch.autograd.grad(total, params)  # after the context: funcadapt replays the passes
    for got in (got_whole, got_blocks):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- what a schedule's steps are ----------------------------------------------------------------------------


def _loop(unet, timesteps, latents, text, coeff):
    """A sampling loop of one's own: one denoiser call per entry of ``timesteps`` with the given latents."""
    with AdapterModifier(unet, "scale", coeff):
        return [
            unet(x, torch.tensor(t), encoder_hidden_states=text).sample
            for t, x in zip(timesteps, latents, strict=False)
        ]


def test_steps_are_distinct_timesteps():
    """Step k is the k-th distinct timestep: a Heun-type sampler's second evaluation at a timestep gets that
    timestep's value, a call at a timestep already seen (a second pipeline call) gets its step again; a
    schedule that does not meet the steps run raises when the context exits (timesteps that collapse to
    one number, as two steps rounded in bfloat16 can, leave one value unused), the model unchanged."""
    s = setup("sd", "lora")
    unet = s.denoiser
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(5)]
    text = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    values = [0.5, -1.0, 2.0]
    heun = [900, 500, 500, 100, 100]  # 3 distinct timesteps
    got = _loop(unet, heun, xs, text, funcadapt.per_step(values))
    for t, x, y in zip(heun, xs, got, strict=True):
        with reference_interpolation(unet, values[[900, 500, 100].index(t)]):
            assert_close(y, unet(x, torch.tensor(t), encoder_hidden_states=text).sample)
    before = snapshot(unet)
    with pytest.raises(ValueError, match=r"schedule gives 3 steps, but the denoiser ran at 2 distinct timesteps"):
        _loop(unet, [900, 900, 500], xs, text, funcadapt.per_step(values))  # two steps collapsed into one
    with pytest.raises(ValueError, match=r"schedule gives 3 steps, and the denoiser is running step 4"):
        _loop(unet, [900, 500, 100, 50], xs, text, funcadapt.per_step(values))
    assert_unchanged(unet, before)


def test_guidance_layout_is_checked():
    """2N rows are a guidance batch only when their halves are the same latents with different conditioning:
    N strengths for 2N images without guidance are refused (different seeds, and one seed for every image),
    not read as [unconditional; conditional]. uncond as a number is refused under perturbed-attention guidance
    and on denoisers not known to put the unconditional half first; 'same' needs no order."""
    s = setup("sd", "lora")
    before = snapshot(s.denoiser)
    kw = s.call_kwargs(2)
    one_prompt = s.call_kwargs(1)
    not_guidance = r"4 rows for 2 per-image strengths, but it is not a classifier-free-guidance batch"
    for prompts, seeds in ((kw, SEEDS), (one_prompt, [0, 0, 0, 0])):  # (repeat=2 forgotten)
        modifier = AdapterModifier(s.denoiser, "scale", funcadapt.per_image([-1.0, 2.0]))
        with pytest.raises(ValueError, match=not_guidance), modifier:
            s.run(prompts, seeds, len(seeds) // len(prompts["prompt_embeds"]), 1.0)
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    attention = s.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    original = attention.processor
    attention.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    try:
        with pytest.raises(ValueError, match=r"perturbed-attention guidance is on"):
            one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0))
    finally:
        attention.set_processor(original)
    name = f"{type(s.denoiser).__module__}.{type(s.denoiser).__qualname__}"
    with pytest.MonkeyPatch.context() as patched:
        patched.delitem(funcadapt.images.UNCOND_FIRST, name)
        with pytest.raises(ValueError, match=r"UNet2DConditionModel is not one"):
            one_call(s, funcadapt.per_image(STRENGTHS, uncond=0.0))
        one_call(s, funcadapt.per_image(STRENGTHS))
    assert_unchanged(s.denoiser, before)


def test_misused_coefficients_are_refused():
    """per_step through funcadapt.call (one forward, no steps to count) and a per_image built without the
    grouping that transform is given (its last axis would be read as groups) are refused."""
    s = setup("sd", "lora")
    tree = funcadapt.extract(s.denoiser)
    x, t, text = (
        torch.zeros(2, 4, 8, 8, dtype=torch.float64),
        torch.tensor(10),
        torch.zeros(2, 5, 32, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"funcadapt.call runs one forward"):
        funcadapt.call(
            s.denoiser, funcadapt.transform(tree, funcadapt.per_step([0.0, 1.0])), x, t, encoder_hidden_states=text
        )
    groups = funcadapt.layer_groups(tree, "block")
    with pytest.raises(ValueError, match=r"was built without groups, and transform was given a grouping"):
        funcadapt.transform(tree, funcadapt.per_step(torch.zeros(3, len(groups))), groups=groups)
    with pytest.raises(ValueError, match=r"was built without groups, and transform was given a grouping"):
        funcadapt.transform(tree, funcadapt.per_token(torch.zeros(2, len(groups))), groups=groups)


class _LinearDenoiser(torch.nn.Module):
    """A denoiser of two linear layers, quick to compile (a UNet takes seconds per compile)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.out(torch.tanh(self.proj(sample) + encoder_hidden_states + timestep / 1000))


def _linear_denoiser() -> torch.nn.Module:
    """:class:`_LinearDenoiser` with a random LoRA on both layers, float64, wrapped by get_peft_model."""
    torch.manual_seed(0)
    model = get_peft_model(_LinearDenoiser(), LoraConfig(r=2, target_modules=["proj", "out"], init_lora_weights=False))
    return model.to(torch.float64)


def test_compiled_denoiser():
    """A compiled denoiser (Dynamo, its eager backend) under per-image and per-step strengths equals the hooks:
    the entry's bookkeeping (the timestep as a number, the guidance layout) runs outside the graph. A small
    denoiser of linear layers (compiling a UNet takes seconds per context: see docs/diffusion.md)."""

    model = _linear_denoiser()
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    batches = [torch.cat([x, x]) for x in latents]  # guidance batches: 2 images
    text = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    timesteps = [torch.tensor(900.0), torch.tensor(500.0), torch.tensor(100.0)]
    table = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.5]], dtype=torch.float64)
    want = []
    with stepped_reference(model, lambda k: rows_reference(table[k].tolist())):
        want = [model(x, t, text) for x, t in zip(batches, timesteps, strict=True)]
    compiled = torch.compile(model, backend="eager")
    with AdapterModifier(model, "scale", funcadapt.per_step(table)):
        got = [compiled(x, t, text) for x, t in zip(batches, timesteps, strict=True)]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    with reference_interpolation(model, rows_reference([-1.0, 2.0])):
        want_image = model(batches[0], timesteps[0], text)
    with AdapterModifier(model, "scale", funcadapt.per_image([-1.0, 2.0])):
        assert_close(compiled(batches[0], timesteps[0], text), want_image)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(batches[0], timesteps[0], text)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)  # the bookkeeping runs before the graph


def test_compiled_denoiser_compiles_once_for_every_step_and_context():
    """A compiled denoiser under per-step schedules: one graph for all the steps of a context and for later
    contexts with other schedules (the step reaches the layers as a tensor, not a number each step would
    specialise on), equal to the hooks. Before, each denoiser call compiled again until Dynamo's recompile
    limit, after which the denoiser ran uncompiled."""
    from torch._dynamo.utils import counters

    model = _linear_denoiser()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    text = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    steps = 10
    timesteps = [torch.tensor(1000.0 - 90 * k, dtype=torch.float64) for k in range(steps)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for context in range(3):
        table = torch.linspace(-1.0, 2.0, 2 * steps, dtype=torch.float64).reshape(steps, 2) + context
        with stepped_reference(model, lambda k, table=table: rows_reference(table[k].tolist())):
            want = [model(torch.cat([x, x]), t, text) for t in timesteps]
        with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_step(table)):
            got = [compiled(torch.cat([x, x]), t, text) for t in timesteps]
        for a, b in zip(got, want, strict=True):
            assert_close(a, b)
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph (two, were the entry's bookkeeping to split it), whatever the step and the context
    assert 1 <= graphs[0] <= 2 and graphs == [graphs[0]] * 3, graphs


def test_block_vector_gradient_on_a_dit():
    """A learned strength per transformer block of a DiT (SD3): the gradient of a loss on the prediction with
    respect to the block vector equals central differences."""
    s = setup("sd3", "lora")
    model = s.denoiser
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text, pooled = (
        torch.randn(2, 5, 32, generator=g, dtype=torch.float64),
        torch.randn(2, 16, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([300.0, 300.0], dtype=torch.float64)

    def loss(v: torch.Tensor) -> torch.Tensor:
        params = funcadapt.transform(tree, v, groups=groups)
        out = funcadapt.call(model, params, x, text, pooled, t).sample
        return out.pow(2).mean()

    v = torch.linspace(-0.5, 1.5, len(groups), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(v), v)
    # central differences in float64: truncation ~eps² and rounding ~1e-16·loss/eps, both ~1e-12 at eps = 1e-5
    eps = 1e-5
    for i in range(len(groups)):
        e = torch.zeros_like(v)
        e[i] = eps
        with torch.no_grad():
            fd = (loss(v.detach() + e) - loss(v.detach() - e)) / (2 * eps)
        torch.testing.assert_close(grad[i], fd, rtol=1e-6, atol=1e-9)
    assert grad.abs().max() > 0


def test_wrapped_and_list_latents():
    """A torch.compile wrapper given to AdapterModifier reads the step through the module it runs (its own
    forward is (*args, **kwargs)); a denoiser whose first argument is a list of one tensor per image (Z-Image)
    is read by that list, never by a later tensor such as the timestep."""

    class ListDenoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor]) -> torch.Tensor:
            return self.proj(torch.stack(x) + torch.stack(cap_feats)) * t

    torch.manual_seed(0)
    model = get_peft_model(ListDenoiser(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    model.to(torch.float64)
    g = torch.Generator().manual_seed(2)
    image = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    caps = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    t = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    # 4 images (different latents) and 2 strengths: not a guidance batch, refused (t's rows are equal)
    modifier = AdapterModifier(model, "scale", funcadapt.per_image([1.0, -1.0]))
    with pytest.raises(ValueError, match="not a classifier-free-guidance batch"), modifier:
        model([*image, image[1], image[0]], t, caps)
    with reference_interpolation(model, rows_reference([1.0, -1.0])):
        want = model([*image, *image], t, caps)
    with AdapterModifier(model, "scale", funcadapt.per_image([1.0, -1.0])):
        assert_close(model([*image, *image], t, caps), want)

    compiled = torch.compile(model, backend="eager")
    steps = torch.tensor([[2.0, 0.0, 1.0, -1.0], [1.0, 1.0, 0.5, 0.5]], dtype=torch.float64)
    with stepped_reference(model, lambda k: rows_reference(steps[k].tolist())):
        want = [model(caps, torch.full((4,), v, dtype=torch.float64), caps) for v in (0.9, 0.1)]
    with AdapterModifier(compiled, "scale", funcadapt.per_step(steps)):
        got = [compiled(caps, torch.full((4,), v, dtype=torch.float64), caps) for v in (0.9, 0.1)]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    # an adapter injected into the module itself (no PEFT wrapper), compiled: the wrapper runs _orig_mod
    plain = ListDenoiser()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), plain)
    plain.to(torch.float64)
    with stepped_reference(plain, lambda k: rows_reference(steps[k].tolist())):
        want = [plain(caps, torch.full((4,), v, dtype=torch.float64), caps) for v in (0.9, 0.1)]
    compiled = torch.compile(plain, backend="eager")
    with AdapterModifier(compiled, "scale", funcadapt.per_step(steps)):
        got = [compiled(caps, torch.full((4,), v, dtype=torch.float64), caps) for v in (0.9, 0.1)]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
