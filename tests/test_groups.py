"""Coefficient fields (funcadapt.groups): one coefficient per layer group.

Every layer in group g gets exactly what the scalar v[g] gives it: checked against the
independent per-layer reference y0 + c_layer·(y1 − y0) for every rule, bit for bit at the
all-ones and all-zeros vectors, under vmap (a population), jacrev (central differences in
float64), a contrastive two-pass loop, coefficient batches, several adapters, bitsandbytes and
gradient checkpointing; and funcadapt.attribute against direct evaluation. Bit-for-bit claims are
checked in the default float32, the others in float64 up to its rounding (cases.tolerance)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    CASE_ARCH,
    TOL64,
    VOCAB,
    build,
    case,
    float64,
    inputs,
    output,
    randomize_adapters,
    reference_interpolation,
    tiny_llama,
    tolerance,
)
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn

import funcadapt
from funcadapt import AdapterModifier

pytestmark = [
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor:UserWarning"),
    pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:.*performance drop because we have not yet implemented the batching:UserWarning"
    ),
    pytest.mark.filterwarnings("ignore:.*fan_in_fan_out:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning"),
]

CA_IDS = [f"{c.id}-{a}" for c, a in CASE_ARCH]
MIXED = (-1.5, 0.6, 2.0, -0.3, 1.0, 0.0, 0.8, -2.2)
"""Entries for per-group vectors: both signs, several magnitudes, and the two endpoints."""


F64 = torch.float64


def mixed(size: int, shift: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor([MIXED[(i + shift) % len(MIXED)] for i in range(size)], dtype=dtype)


def logits(model: nn.Module, params=None, arch: str = "llama", batch=None) -> torch.Tensor:
    batch = inputs(arch, dtype=next(model.parameters()).dtype) if batch is None else batch
    return output(model(**batch) if params is None else funcadapt.call(model, params, **batch))


def layer_coeffs(tree: funcadapt.AdapterTree, groups: dict, v) -> dict[str, float]:
    """Each grouped layer path's coefficient: the entry of its group."""
    return {path: float(v[g]) for g, members in enumerate(groups.values()) for path in members}


# ----------------------------------------------------------------------------
# layer_groups


def lora_llama(targets: list[str], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapters(model, seed=seed + 1)
    return model.eval()


def test_layer_groups_partition_the_layers_in_model_order():
    model = lora_llama(["q_proj", "v_proj", "down_proj", "lm_head"])
    tree = funcadapt.extract(model)
    paths = list(dict.fromkeys(s.path for s in tree.layers))
    for by in ("block", "layer", "module"):
        groups = funcadapt.layer_groups(tree, by)
        flat = [p for members in groups.values() for p in members]
        assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat)), by
        for members in groups.values():
            assert list(members) == [p for p in paths if p in members], "paths in model order"
    blocks = funcadapt.layer_groups(tree, "block")
    assert list(blocks) == ["0", "1", "lm_head"]
    assert blocks["1"] == tuple(
        f"base_model.model.model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert blocks["lm_head"] == ("base_model.model.lm_head",)
    assert list(funcadapt.layer_groups(tree, "module")) == ["q_proj", "v_proj", "down_proj", "lm_head"]
    layers = funcadapt.layer_groups(tree, "layer")
    assert len(layers) == 7 and layers["model.layers.0.self_attn.q_proj"] == (
        "base_model.model.model.layers.0.self_attn.q_proj",
    )
    attn_only = funcadapt.layer_groups(tree, lambda p: "attn" if "self_attn" in p else None)
    assert list(attn_only) == ["attn"] and len(attn_only["attn"]) == 4


class TwoStacks(nn.Module):
    """Numbered blocks in two containers, as an encoder-decoder has them."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.decoder = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.encoder, *self.decoder]:
            x = layer(x)
        return x


def test_blocks_in_two_containers_are_named_with_their_container():
    model = get_peft_model(TwoStacks(), LoraConfig(r=2, target_modules=["0", "1"]))
    groups = funcadapt.layer_groups(funcadapt.extract(model), "block")
    assert list(groups) == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]


# ----------------------------------------------------------------------------
# what a vector means, for every rule


@pytest.mark.parametrize(("case_", "arch"), CASE_ARCH, ids=CA_IDS)
def test_vector_matches_per_layer_reference(case_, arch):
    """A per-block vector with mixed signs and magnitudes is the per-layer reference with each
    layer at its group's entry; a grouping that leaves layers out keeps them at c = 1; the
    all-ones vector is the trained adapter and all-zeros the base model, bit for bit."""
    model = build(case_, arch, dtype=F64)
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    size = len(groups)
    v = mixed(size, dtype=F64)
    with torch.no_grad():
        y1, got = logits(model, arch=arch), logits(model, funcadapt.transform(tree, v, groups=groups), arch)
        with model.disable_adapter():
            y0 = logits(model, arch=arch)
        ones, zeros = torch.ones(size, dtype=F64), torch.zeros(size, dtype=F64)
        assert torch.equal(logits(model, funcadapt.transform(tree, ones, groups="block"), arch), y1)
        assert torch.equal(logits(model, funcadapt.transform(tree, [1.0] * size, groups="block"), arch), y1)
        at_zero = logits(model, funcadapt.transform(tree, zeros, groups="block"), arch)
        if case_.rule == "hra":  # y0 through PEFT's HRA forward rounds to float32 (the case's float32_inside note)
            torch.testing.assert_close(at_zero, y0, **tolerance(y0, case_))
        else:
            assert torch.equal(at_zero, y0)

        per_layer = layer_coeffs(tree, groups, v)
        with reference_interpolation(model, per_layer.get):
            ref = logits(model, arch=arch)
        torch.testing.assert_close(got, ref, **tolerance(ref, case_))

        first, *rest = groups
        if rest:  # only the first group given: every other layer stays as trained
            part = {first: groups[first]}
            got = logits(model, funcadapt.transform(tree, torch.tensor([-1.0], dtype=F64), groups=part), arch)
            with reference_interpolation(model, {p: -1.0 for p in groups[first]}.get):
                ref = logits(model, arch=arch)
            torch.testing.assert_close(got, ref, **tolerance(ref, case_))
            assert not torch.allclose(got, y1, atol=1e-5) and not torch.allclose(got, y0, atol=1e-5)


@pytest.mark.parametrize(
    ("case_id", "mode"),
    [(c, "linear") for c in ("lora", "ia3", "oft", "road_1", "loha", "dora")]
    + [(c, "geometric") for c in ("lora", "ia3", "oft", "road_1", "loha")],
)
def test_each_group_gets_exactly_the_scalar_transform(case_id, mode):
    """A vector whose entries all equal c gives what the scalar tensor c gives, bit for bit; and
    layers of one group at c give what the scalar gives on a model where only they are adapted."""
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    size = len(funcadapt.layer_groups(tree, "block"))
    for c in (-1.0, 0.5, 2.0):
        with torch.no_grad():
            want = logits(model, funcadapt.transform(tree, torch.tensor(c), mode=mode))
            got = logits(model, funcadapt.transform(tree, torch.full((size,), c), mode=mode, groups="block"))
        assert torch.equal(got, want), (case_id, mode, c)


# ----------------------------------------------------------------------------
# torch.func: a population, jacobians


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "road_1"])
def test_vmap_over_a_population_equals_the_loop(case_id):
    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    size = len(funcadapt.layer_groups(tree, "block"))
    population = torch.stack([mixed(size, shift, F64) for shift in range(4)])  # [P, G]
    batch = inputs()  # drawn outside: random ops under funcadapt.vmap differ per member

    def at(v: torch.Tensor) -> torch.Tensor:
        return logits(model, funcadapt.transform(tree, v, groups="block"), batch=batch)

    with torch.no_grad():
        got = funcadapt.vmap(at)(population)
        want = torch.stack([at(v) for v in population])
    torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize(("case_id", "arch"), [("lora", "gpt2"), ("ia3", "gpt2"), ("oft", "bert"), ("frod", "gpt2")])
def test_jacrev_equals_central_differences_in_float64(case_id, arch):
    """GPT-2 and BERT in float64 (no float32 rotary cache): the jacobian of a summary of the
    outputs with respect to a per-layer vector, at a mixed point and at v = 1 (FRoD: the output
    interpolation, pinned exactly at its endpoints)."""
    model = build(case(case_id), arch, dtype=torch.float64).eval()
    tree = funcadapt.extract(model)
    batch = inputs(arch)
    weights = torch.randn(
        *output(model(**batch)).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )

    def f(v: torch.Tensor) -> torch.Tensor:
        return (logits(model, funcadapt.transform(tree, v, groups="layer"), batch=batch) * weights).sum()

    size = len(funcadapt.layer_groups(tree, "layer"))
    for point in (mixed(size).double(), torch.ones(size, dtype=torch.float64)):
        jac = torch.func.jacrev(f)(point)
        h = 1e-5
        with torch.no_grad():
            fd = torch.stack([(f(point + h * e) - f(point - h * e)) / (2 * h) for e in torch.eye(size).double()])
        assert float(fd.abs().max()) > 1e-3
        # a central difference with step h is off by its truncation, h²/6 times the third derivative
        # (~1e-10 here), plus rounding, eps64·|f|/h (~1e-11): 1e-6 relative (1e-8 absolute) leaves room
        # for the curvature of a deep network; a wrong entry (a wrong group, a lost term) is off by O(1)
        torch.testing.assert_close(jac, fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# training: the contrastive two-pass loop, checkpointing


POS = torch.randint(0, VOCAB, inputs()["input_ids"].shape, generator=torch.Generator().manual_seed(11))
NEG = torch.randint(0, VOCAB, inputs()["input_ids"].shape, generator=torch.Generator().manual_seed(12))


def contrastive_grads(model: nn.Module, v: torch.Tensor, how: str) -> dict[str, torch.Tensor]:
    """Gradients of loss(+v, positive) + loss(−v, negative) for the adapter parameters and v."""
    tree = funcadapt.extract(model)
    trained = {k: p for k, p in tree.params.items() if p.requires_grad}
    groups = funcadapt.layer_groups(tree, "block")
    v = v.clone().requires_grad_(True)
    batch = inputs()
    if how == "modifier":
        losses = []
        for sign, labels in ((1.0, POS), (-1.0, NEG)):
            with AdapterModifier(model, "scale", sign * v, groups="block"):
                losses.append(model(**batch, labels=labels).loss)
        loss = losses[0] + losses[1]
    elif how == "vmap":

        def at(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return funcadapt.call(model, funcadapt.transform(tree, c, groups="block"), **batch, labels=labels).loss

        loss = funcadapt.vmap(at)(torch.stack([v, -v]), torch.stack([POS, NEG])).sum()
    else:  # the independent reference: forward hooks, each layer at ±v[its block]
        loss = torch.zeros(())
        for sign, labels in ((1.0, POS), (-1.0, NEG)):
            coeff = {p: sign * v[g] for g, members in enumerate(groups.values()) for p in members}
            with reference_interpolation(model, coeff.get):
                loss = loss + model(**batch, labels=labels).loss
    grads = torch.autograd.grad(loss, [*trained.values(), v])
    return dict(zip([*trained, "v"], grads, strict=True))


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft"])
def test_contrastive_two_pass_with_a_per_block_vector(case_id):
    model = build(case(case_id), dtype=F64)
    v = torch.tensor([0.7, -1.3], dtype=F64)
    want = contrastive_grads(model, v, "reference")
    assert float(want["v"].abs().min()) > 0
    for how in ("modifier", "vmap"):
        got = contrastive_grads(model, v, how)
        for k in want:
            torch.testing.assert_close(got[k], want[k], **TOL64, msg=lambda m, k=k, h=how: f"{h} {k}: {m}")


def test_gradient_checkpointing_gives_the_same_vector_gradients():
    plain = build(case("lora"), dtype=F64).train()  # the cases have no dropout
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    v = torch.tensor([0.7, -1.3], dtype=F64)
    want = contrastive_grads(plain, v, "modifier")
    got = contrastive_grads(checkpointed, v, "modifier")
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL64)


# ----------------------------------------------------------------------------
# coefficient batches, the context manager, sweeps, several adapters


def test_per_row_vectors_equal_separate_runs():
    model = build(case("ia3"), dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs()
    vectors = torch.stack(
        [mixed(2, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 2.0], dtype=F64)]
    )
    rows = funcadapt.per_row(vectors, repeat=batch["input_ids"].shape[0], groups="block")
    with torch.no_grad():
        parts = funcadapt.untile(funcadapt.call(model, funcadapt.transform(tree, rows), **funcadapt.tile(batch, 3)), 3)
        for vector, part in zip(vectors, parts, strict=True):
            want = logits(model, funcadapt.transform(tree, vector, groups="block"))
            torch.testing.assert_close(output(part), want, **TOL64)


ROWS_LORA = "funcadapt's per-row LoRA scaling rounds the rank-r activations to float32 (rules/lora.py, _lora_rows)"
"""Why per-row coefficients on LoRA carry float32 rounding even in a float64 model (``h.float() * k``)."""


def test_modifier_and_sweep_take_groups():
    model = build(case("lora"), dtype=F64)
    tree = funcadapt.extract(model)
    v = mixed(2, dtype=F64)
    with torch.no_grad():
        want = logits(model, funcadapt.transform(tree, v, groups="block"))
        with AdapterModifier(model, "scale", v, groups="block") as modifier:
            got = logits(model)
    assert torch.equal(got, want)
    assert "groups=block" in repr(modifier)

    def metric(out) -> torch.Tensor:
        return out.logits[..., :4].mean()

    vectors = torch.stack([mixed(2, s, F64) for s in range(5)])
    loop = funcadapt.sweep(model, metric, vectors, inputs(), method="loop", groups="block")
    for method in ("vmap", "rows"):
        swept = funcadapt.sweep(model, metric, vectors, inputs(), method=method, groups="block")
        tol = tolerance(loop.values, ROWS_LORA) if method == "rows" else TOL64
        torch.testing.assert_close(swept.values, loop.values, **tol)
    assert [r["coeff"] for r in loop.records()] == vectors.tolist()
    for k, vector in enumerate(vectors):
        with torch.no_grad():
            direct = metric(funcadapt.call(model, funcadapt.transform(tree, vector, groups="block"), **inputs()))
        torch.testing.assert_close(loop.values[k], direct, **TOL64)


def test_several_adapters_take_a_dict_of_vectors():
    """Two LoRA adapters on the same layers, each with its own per-block vector, equal PEFT run
    with each layer's scaling of each adapter multiplied by that adapter's entry (no funcadapt)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["first", "second"])
    randomize_adapters(model, seed=1)
    model = float64(model).eval()
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    vectors = {"first": torch.tensor([-1.0, 2.0], dtype=F64), "second": torch.tensor([0.5, -0.25], dtype=F64)}
    with torch.no_grad():
        got = logits(model, funcadapt.transform(tree, vectors, groups="block"))
        only_first = logits(model, funcadapt.transform(tree, {"first": vectors["first"]}, groups="block"))
    reference = copy.deepcopy(model)
    for g, members in enumerate(groups.values()):
        for path in members:
            layer = reference.get_submodule(path)
            for adapter, v in vectors.items():
                layer.scaling[adapter] *= float(v[g])
    with torch.no_grad():
        want = logits(reference)
    torch.testing.assert_close(got, want, **TOL64)
    assert not torch.allclose(only_first, got, atol=1e-4), "the second adapter's vector must matter"


# ----------------------------------------------------------------------------
# bitsandbytes


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("adapter", ["lora", "ia3"])
def test_quantized_vector_matches_per_layer_reference(llama_dir, quant, adapter):
    from test_quantized import build as build_quantized
    from test_quantized import logits as quantized_logits

    model = build_quantized(llama_dir, quant, adapter)
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    v = mixed(len(groups))
    with torch.no_grad():
        y1 = quantized_logits(model)
        with model.disable_adapter():
            y0 = quantized_logits(model)
        assert torch.equal(
            quantized_logits(model, funcadapt.transform(tree, torch.ones(len(groups)), groups=groups)), y1
        )
        assert torch.equal(
            quantized_logits(model, funcadapt.transform(tree, torch.zeros(len(groups)), groups=groups)), y0
        )
        got = quantized_logits(model, funcadapt.transform(tree, v, groups=groups))
        with reference_interpolation(model, layer_coeffs(tree, groups, v).get):
            want = quantized_logits(model)
    # float32 is the point here (bitsandbytes dequantizes to it): funcadapt and the reference round
    # differently at each adapted layer, cases.tolerance's float32 bound
    torch.testing.assert_close(got, want, **tolerance(want, "bitsandbytes layers compute in float32"))


# ----------------------------------------------------------------------------
# attribute


@pytest.mark.parametrize("case_id", ["lora", "oft"])
def test_attribute_matches_direct_evaluation(case_id, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = build(case(case_id), dtype=F64).eval()
    tree = funcadapt.extract(model)
    batch = inputs()

    def metric(out) -> torch.Tensor:
        return out.logits[..., :8].mean()

    result = funcadapt.attribute(model, metric, batch, "layer")
    groups = funcadapt.layer_groups(tree, "layer")
    size = len(groups)
    assert result.groups == tuple(groups) and result.method == "vmap"
    assert all(p.grad is None for p in model.parameters()), "attribute must not touch .grad"

    def at(v: torch.Tensor) -> torch.Tensor:
        return metric(funcadapt.call(model, funcadapt.transform(tree, v, groups="layer"), **batch))

    ones, zeros, eye = torch.ones(size, dtype=F64), torch.zeros(size, dtype=F64), torch.eye(size, dtype=F64)
    with torch.no_grad():
        at_one, at_zero = at(ones), at(zeros)
        off = torch.stack([at(1 - e) - at_one for e in eye])
        on = torch.stack([at(e) - at_zero for e in eye])
    torch.testing.assert_close(result.off, off, **TOL64)
    torch.testing.assert_close(result.on, on, **TOL64)
    assert float(off.abs().min()) > 0
    torch.testing.assert_close(torch.tensor(result.at_one, dtype=F64), at_one, **TOL64)
    for point, got in ((ones, result.grad_at_one), (zeros, result.grad_at_zero)):
        # attribute differentiates with respect to a default-dtype (float32) vector, so its float64 gradient
        # is rounded to float32 once, which moves it by at most 2**-24 of itself: eps32 = 2**-23 relative
        assert got.dtype == torch.get_default_dtype()
        torch.testing.assert_close(got.double(), torch.func.grad(at)(point), rtol=torch.finfo().eps, atol=0)

    chunked = funcadapt.attribute(model, metric, batch, "layer", chunk_size=3, progress=False)
    torch.testing.assert_close(chunked.off, result.off, **TOL64)
    torch.testing.assert_close(chunked.on, result.on, **TOL64)

    rows = result.records()
    assert [r["group"] for r in rows] == list(groups)
    assert rows[0]["estimate_off"] == -rows[0]["grad_at_one"] and rows[0]["estimate_on"] == rows[0]["grad_at_zero"]
    fig = result.plot()  # like Sweep.plot(): the Figure
    axes = fig.axes
    assert len(axes) == 2 and len(axes[0].patches) == 2 * size
    fig.savefig(tmp_path / "attribution.png")


def test_attribute_falls_back_to_a_coefficient_batch_where_vmap_cannot_run():
    model = build(case("lora"), dtype=F64).eval()

    def metric(out) -> torch.Tensor:  # .item() cannot run under vmap
        return out.logits[..., :8].mean() + 0.0 * out.logits.sum().item()

    with pytest.warns(UserWarning, match="method='vmap' failed"):
        result = funcadapt.attribute(model, metric, inputs(), "block")
    assert result.method == "rows"
    direct = funcadapt.attribute(model, lambda out: out.logits[..., :8].mean(), inputs(), "block")
    torch.testing.assert_close(result.off, direct.off, **tolerance(direct.off, ROWS_LORA))


# ----------------------------------------------------------------------------
# refusals


def test_bad_groupings_and_vectors_are_refused_with_the_fix():
    model = lora_llama(["q_proj", "v_proj"])
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    path = groups["0"][0]
    cases = [
        (dict(coeff=torch.ones(3), groups="block"), ValueError, r"shape \[2\], got \(3,\).*2 groups \(0, 1\)"),
        (dict(coeff=torch.ones(2, 2), groups="block"), ValueError, r"1-d tensor with one entry per group"),
        (dict(coeff=1.0, groups="block"), TypeError, r"1-d tensor or a sequence of numbers"),
        (dict(coeff=[1.0, 2.0, 3.0], groups="block"), ValueError, r"has 3 entries; the grouping has 2 groups"),
        (dict(coeff=torch.tensor([1.0, float("nan")]), groups="block"), ValueError, r"not finite"),
        (dict(coeff=torch.ones(2), groups="blocks"), ValueError, r"unknown grouping by='blocks'"),
        (dict(coeff=torch.ones(2), groups={"a": (path,), "b": (path,)}), ValueError, r"is in two groups"),
        (dict(coeff=torch.ones(2), groups={"a": ("model.nope",), "b": (path,)}), ValueError, r"not an adapter layer"),
        (dict(coeff=torch.ones(2), groups={"a": (), "b": (path,)}), ValueError, r"has no adapter layer"),
        (dict(coeff=torch.ones(1), groups={"a": path}), TypeError, r"not one string"),
        (dict(coeff=torch.ones(2), groups=lambda p: 3), TypeError, r"return a str or None"),
        (dict(coeff=torch.ones(2), groups=lambda p: None), ValueError, r"none of the tree's 4 adapter layers"),
        (dict(coeff=None, op="invert", groups="block"), ValueError, r"groups= gives one coefficient per layer group"),
        (dict(coeff={"other": torch.ones(2)}, groups="block"), ValueError, r"unknown adapter"),
        (dict(coeff=torch.ones(2)), ValueError, r"pass groups="),
        (
            dict(coeff=funcadapt.per_row(torch.ones(3, 2), groups="block"), groups="layer"),
            ValueError,
            r"give the grouping once",
        ),
        (dict(coeff=funcadapt.PerRow(torch.ones(3, 2))), ValueError, r"needs groups="),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            funcadapt.transform(tree, **kwargs)
    with pytest.raises(ValueError, match=r"2-D \[N, groups\]"):
        funcadapt.per_row(torch.ones(3), groups="block")
    with pytest.raises(ValueError, match=r"shape \[N, groups\]"):
        funcadapt.sweep(model, lambda out: out.logits.mean(), torch.ones(3), inputs(), groups="block")
    with pytest.raises(ValueError, match="shape"), AdapterModifier(model, "scale", torch.ones(3), groups="block"):
        pass
    assert funcadapt.active_contexts(model) == []


def test_a_vector_for_ia3_feedforward_is_exact():
    """IA3 on a feed-forward layer scales its input: per block too (the rule's own transform)."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    randomize_adapters(model, seed=1)
    model = float64(model).eval()
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    v = torch.tensor([-0.5, 1.7], dtype=F64)
    with torch.no_grad():
        got = logits(model, funcadapt.transform(tree, v, groups=groups))
        with reference_interpolation(model, layer_coeffs(tree, groups, v).get):
            want = logits(model)
    torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "psoft", "road_1", "road_2", "frod", "boft"])
def test_all_ones_vector_has_the_trained_adapters_gradients(case_id):
    """At v = 1 the parameters' gradients are PEFT's own (the RoAd re-encoding pinned at c = 1
    must keep the round trip's derivative, not add the identity's to it)."""
    model = build(case(case_id), dtype=F64).eval()
    tree = funcadapt.extract(model)
    trained = {k: p for k, p in tree.params.items() if p.requires_grad}
    size = len(funcadapt.layer_groups(tree, "block"))
    batch = inputs()
    want = torch.autograd.grad(model(**batch, labels=POS).loss, list(trained.values()))
    params = funcadapt.transform(tree, torch.ones(size, dtype=F64, requires_grad=True), groups="block")
    got = torch.autograd.grad(funcadapt.call(model, params, **batch, labels=POS).loss, list(trained.values()))
    for key, g, w in zip(trained, got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL64, msg=lambda m, k=key: f"{k}: {m}")
