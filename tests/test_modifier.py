"""AdapterModifier: the context-manager form of extract → transform → call.

The promise under test: a plain training loop written with ``with AdapterModifier(...)``
gets exactly the gradients of the math it writes, even though ``backward()`` runs after
every context has exited; contexts nest and restore the model bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from cases import CASES, VOCAB, assert_unchanged, build, case, inputs, output, snapshot
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import funcadapt
from funcadapt import AdapterModifier, swap

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = inputs()
LR = 0.1


def _labels(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, BATCH["input_ids"].shape, generator=torch.Generator().manual_seed(seed))


POS, NEG = _labels(11), _labels(12)


def _force_unapply() -> None:
    for f in reversed(list(swap.active_frames())):
        f.unapply()


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads_of(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(params, gs, strict=True))


def dot_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], **tol: Any) -> None:
    assert got.keys() == ref.keys()
    assert flat(ref).abs().max() > 0, "reference gradients are all zero: the test would mean nothing"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m, k=k: f"gradient of {k}: {m}", **tol)


def reference(
    model: nn.Module, tree: funcadapt.AdapterTree, extra: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The math of the contrastive loop, written functionally (gradients of the tree's trainable
    tensors and of ``extra``)."""
    torch.manual_seed(100)
    lp = funcadapt.call(model, funcadapt.transform(tree, 1.0), **BATCH, labels=POS).loss
    torch.manual_seed(101)
    ln = funcadapt.call(model, funcadapt.transform(tree, -1.0), **BATCH, labels=NEG).loss
    return lp.detach(), ln.detach(), grads_of(lp + ln, {**trainable(tree), **(extra or {})})


def contrastive_step(model: nn.Module, optimizer: torch.optim.Optimizer, modifier: Callable[..., Any]) -> tuple:
    """The seed's training step, verbatim (backward after both contexts exited)."""
    optimizer.zero_grad()
    torch.manual_seed(100)  # adapters that sample in training mode (PVeRA) draw the reference's noise
    with modifier(model, "scale", 1.0):
        lp = model(**BATCH, labels=POS).loss
    torch.manual_seed(101)
    with modifier(model, "scale", -1.0):
        ln = model(**BATCH, labels=NEG).loss
    (lp + ln).backward()
    return lp.detach(), ln.detach()


@contextlib.contextmanager
def naive_modifier(model: nn.Module, op: str, c: float) -> Iterator[None]:
    """The seed's original approach: scale lora_B in place through ``.data``, restore on exit.
    Autograd never sees the scaling, and the tensors it saved are restored underneath it."""
    assert op == "scale"
    saved = []
    for name, p in model.named_parameters():
        if "lora_B" in name:
            saved.append((p, p.data.clone()))
            p.data.mul_(c)
    try:
        yield
    finally:
        for p, orig in saved:
            p.data.copy_(orig)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_contrastive_loop_exact_gradients(case):
    model = build(case)
    model.train()  # every dropout is 0; stochastic adapters are seeded identically in both computations
    tree = funcadapt.extract(model)
    params = trainable(tree)
    # trainable Parameters that no coefficient acts on are not in the tree (X-LoRA's gating
    # classifier, see the case's note "trainable_outside_tree"); they train through the model's own
    # Parameter objects, with the same gradients as in the functional reference
    in_tree = {id(p) for p in params.values()}
    outside = {k: p for k, p in model.named_parameters() if p.requires_grad and id(p) not in in_tree}
    assert bool(outside) == bool(case.notes.get("trainable_outside_tree")), sorted(outside)[:3]
    params = {**params, **outside}
    lp_ref, ln_ref, ref = reference(model, tree, extra=outside)

    optimizer = _optimizer(model)  # built before the loop, as in the seed
    before = snapshot(model)
    lp, ln = contrastive_step(model, optimizer, AdapterModifier)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ln, ln_ref)
    got = dot_grads(params)
    assert_grads_close(got, ref)

    optimizer.step()
    after = snapshot(model)
    # the optimizer stepped the model's own Parameter objects, nothing else changed
    for what in ("ids", "buffer_ids", "grad", "training", "dicts", "classes"):
        assert after[what] == before[what], what
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt_ids == {id(p) for p in params.values()}
    named = dict(model.named_parameters())
    # a parameter shared by several modules (TinyLoRA's v) has several state_dict names, one tree key
    trained_as = {id(p): k for k, p in params.items()}
    stateful = model.state_dict(keep_vars=True)
    for k, v in before["state"].items():
        if id(stateful[k]) in trained_as:
            key = trained_as[id(stateful[k])]
            torch.testing.assert_close(after["state"][k], v - LR * got[key], rtol=0, atol=1e-6)
            assert named[key] is params[key]
        else:
            assert torch.equal(after["state"][k], v), f"{k} changed but is not trained"
    # tensors whose step is above float resolution must have moved
    moved = [k for k in params if (LR * got[k]).abs().max() > 1e-5 * (1 + before["state"][k].abs().max())]
    assert moved and all(not torch.equal(after["state"][k], before["state"][k]) for k in moved)


def test_naive_inplace_modifier_gives_wrong_gradients():
    """Regression: the seed's in-place ``.data`` trick silently computes wrong gradients
    for the −1 loss; AdapterModifier on the same loop gives the reference ones."""
    model = build(case("lora"))
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)
    _, _, ref = reference(model, tree)
    optimizer = _optimizer(model)

    contrastive_step(model, optimizer, naive_modifier)
    naive = dot_grads(params)
    rel = (flat(naive) - flat(ref)).norm() / flat(ref).norm()
    assert rel > 0.3, f"naive in-place modifier unexpectedly close to the exact gradients (rel. error {rel:.3g})"

    contrastive_step(model, optimizer, AdapterModifier)
    assert_grads_close(dot_grads(params), ref)


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**BATCH))


def test_nested_scales_compose_lora():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with AdapterModifier(model, "scale", -1.0):
        with AdapterModifier(model, "scale", 2.0):
            nested = _run(model)
        outer = _run(model)  # leaving the inner context restores the outer one
    assert_unchanged(model, before)
    with AdapterModifier(model, "scale", -2.0):
        direct = _run(model)
    with torch.no_grad():
        ref = output(funcadapt.call(model, funcadapt.transform(tree, -2.0), **BATCH))
        ref_outer = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **BATCH))
    torch.testing.assert_close(nested, direct, rtol=0, atol=0)
    torch.testing.assert_close(nested, ref, rtol=0, atol=0)
    torch.testing.assert_close(outer, ref_outer, rtol=0, atol=0)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: c.id,
)
@pytest.mark.parametrize(("outer", "inner"), [(2.0, -0.5)])
def test_nested_scales_compose(case, outer, inner):
    """Linear mode: the inner context scales what the outer one shows, so nesting multiplies
    the coefficients, for exact rules and for the output-interpolation fallback alike."""
    model = build(case)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with AdapterModifier(model, "scale", outer), AdapterModifier(model, "scale", inner):
        nested = _run(model)
    assert_unchanged(model, before)
    with AdapterModifier(model, "scale", outer * inner):
        direct = _run(model)
    with torch.no_grad():
        inner_only = output(funcadapt.call(model, funcadapt.transform(tree, inner), **BATCH))
    assert not torch.allclose(direct, inner_only, atol=1e-4), "outer coefficient must matter for this test"
    torch.testing.assert_close(nested, direct, rtol=1e-4, atol=1e-5)
    assert_unchanged(model, before)


@pytest.mark.parametrize("scale_outside", [True, False], ids=["scale-then-shift", "shift-then-scale"])
def test_nested_scale_and_shift_compose_on_lora(scale_outside):
    """LoRA's scale multiplies PEFT's ``scaling`` entry while a layer runs, a shift recomputes tensors; nested,
    the inner context still acts on what the outer one shows. Reference: the composed tensors written into
    a copy of the model (float64), run by plain PEFT."""
    import copy

    model = build(case("lora"), dtype=torch.float64)
    c, delta = -1.5, 0.125
    contexts = [AdapterModifier(model, "scale", c), AdapterModifier(model, "shift", delta)]
    if not scale_outside:
        contexts.reverse()
    before = snapshot(model)
    with contexts[0], contexts[1]:
        got = _run(model)
    assert_unchanged(model, before)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if ".lora_A." in name:
                p.add_(delta)
            elif ".lora_B." in name:
                p.copy_(c * p + delta if scale_outside else c * (p + delta))
    want = _run(ref_model)
    assert not torch.allclose(got, _run(model)), "the contexts must change the output"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_learned_coefficient_stepped_inside_a_context_is_read_at_every_forward():
    """LoRA's scale keeps c·s between forwards inside a context; an optimizer step on c (in place),
    a switch between no_grad and grad, and two backwards through one forward's graph must all see
    the current c. Reference: a copy of the model run by ``call`` with a fresh leaf at each value."""
    import copy

    model = build(case("lora"), dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    ref_tree = funcadapt.extract(ref_model)
    c = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([c], lr=5.0)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    with AdapterModifier(model, "scale", c):
        _run(model)  # under no_grad first: the kept product must not be reused with grad enabled
        for _ in range(3):
            optimizer.zero_grad()
            loss = loss_of(output(model(**BATCH)))
            loss.backward()
            again = loss_of(output(model(**BATCH)))  # the same c: the kept product, a second graph through it
            again.backward()
            leaf = c.detach().clone().requires_grad_()
            want = loss_of(output(funcadapt.call(ref_model, funcadapt.transform(ref_tree, leaf), **BATCH)))
            want.backward()
            torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(c.grad, 2 * leaf.grad, rtol=1e-10, atol=1e-12)
            before = c.detach().clone()
            optimizer.step()
            assert not torch.equal(c.detach(), before), "the step must move c for this test"
        for _ in range(2):  # under no_grad the product is kept between forwards, until c changes in place
            got = _run(model)
            with torch.no_grad():
                want = output(funcadapt.call(ref_model, funcadapt.transform(ref_tree, c.detach().clone()), **BATCH))
                c.mul_(0.5)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["data_mul", "data_assign", "inference_tensor"])
def test_a_coefficient_is_read_when_each_layer_runs(how):
    """Inside one context, a coefficient changed through ``.data`` (which bumps no version counter) is
    what the next forward uses, and a coefficient made under ``torch.inference_mode()`` works (it has no
    version counter at all). Reference: ``call`` on a copy of the model at each value."""
    import copy

    model = build(case("lora"), dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    ref_tree = funcadapt.extract(ref_model)
    if how == "inference_tensor":
        with torch.inference_mode():
            c = torch.tensor(0.5, dtype=torch.float64)
    else:
        c = torch.tensor(0.5, dtype=torch.float64)

    def want(value: float) -> torch.Tensor:
        with torch.no_grad():
            return output(funcadapt.call(ref_model, funcadapt.transform(ref_tree, value), **BATCH))

    with AdapterModifier(model, "scale", c):
        torch.testing.assert_close(_run(model), want(0.5), rtol=1e-10, atol=1e-12)
        if how == "data_mul":
            c.data.mul_(-4.0)
        elif how == "data_assign":
            c.data = torch.tensor(-2.0, dtype=torch.float64)
        else:
            return
        torch.testing.assert_close(_run(model), want(-2.0), rtol=1e-10, atol=1e-12)


def test_out_of_order_exit_raises_and_keeps_state():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    with torch.no_grad():  # (a call inside the contexts would compose with them, like a nested context)
        ref = output(funcadapt.call(model, funcadapt.transform(tree, -2.0), **BATCH))
    outer, inner = AdapterModifier(model, "scale", -1.0), AdapterModifier(model, "scale", 2.0)
    outer.__enter__()
    inner.__enter__()
    try:
        with pytest.raises(RuntimeError, match="reverse order"):
            outer.__exit__(None, None, None)
        # nothing was half-restored: the model still shows the nested (−2) state
        torch.testing.assert_close(_run(model), ref, rtol=0, atol=0)
    finally:
        _force_unapply()


def test_out_of_order_exit_then_cleanup_restores():
    model = build(case("lora"))
    before = snapshot(model)
    outer, inner = AdapterModifier(model, "scale", -1.0), AdapterModifier(model, "scale", 2.0)
    outer.__enter__()
    inner.__enter__()
    try:
        with pytest.raises(RuntimeError, match="reverse order"):
            outer.__exit__(None, None, None)
        inner.__exit__(None, None, None)  # cleanup in the right order
        outer.__exit__(None, None, None)
        assert not swap.active_frames(), "a frame is still applied after both contexts exited"
        assert_unchanged(model, before)
    finally:
        _force_unapply()


class _Boom(Exception):
    pass


@pytest.mark.parametrize("case_id", ["lora", "dora", "adalora", "oft", "randlora", "modules-to-save"])
def test_exception_restores_bit_for_bit(case_id):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with pytest.raises(_Boom), AdapterModifier(model, "scale", -1.0):
        output(model(**BATCH)).sum().backward()
        raise _Boom
    assert not swap.active_frames()
    for p in model.parameters():
        p.grad = None  # the backward above is the caller's business; snapshot() does not look at .grad
    assert_unchanged(model, before)
    with AdapterModifier(model, "scale", -1.0):
        got = _run(model)
    with torch.no_grad():
        ref = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **BATCH))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert_unchanged(model, before)


def _key_tensors(tree: funcadapt.AdapterTree, n: int = 2, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    keys = sorted(tree.params)[:n]
    return {k: scale * torch.randn(tree.params[k].shape, generator=g) for k in keys}


def _replacement(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: tree.params[k].detach() + d for k, d in _key_tensors(tree, 3, 0.3).items()}


OP_CASES = [
    ("lora", "invert", lambda t: None),
    ("ia3", "invert", lambda t: None),
    ("oft", "invert", lambda t: None),
    ("oft-exact-cayley", "invert", lambda t: None),
    ("road_2", "invert", lambda t: None),
    ("lora", "disable", lambda t: None),
    ("dora", "disable", lambda t: None),
    ("oft", "disable", lambda t: None),
    ("lora", "shift", lambda t: 0.05),
    ("ia3", "shift", lambda t: 0.05),
    ("lora", "shift", _key_tensors),
    ("vera", "shift", _key_tensors),
    ("lora", "replace", _replacement),
    ("road_1", "replace", _replacement),
]


@pytest.mark.parametrize(
    ("case_id", "op", "value"),
    OP_CASES,
    ids=[f"{c}-{op}-{i}" for i, (c, op, _) in enumerate(OP_CASES)],
)
def test_ops_equal_functional(case_id, op, value):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    params = trainable(tree)
    v = value(tree)
    before = snapshot(model)
    with AdapterModifier(model, op, v):
        y = output(model(**BATCH))
    assert_unchanged(model, before)

    transformed = funcadapt.transform(tree, v, op)
    y_ref = output(funcadapt.call(model, transformed, **BATCH))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert y.requires_grad == y_ref.requires_grad
    if y_ref.requires_grad:  # "disable" on an interpolated adapter does not depend on its parameters
        got, ref = grads_of(y.square().mean(), params), grads_of(y_ref.square().mean(), params)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        y1 = _run(model)
    assert not torch.allclose(y, y1, atol=1e-5), f"op {op!r} had no effect: the test would mean nothing"
    assert_unchanged(model, before)


@pytest.mark.parametrize(("op", "value"), [("scale", -1.0), ("shift", 0.25)])
def test_named_parameters_inside_and_after(op, value):
    """Coefficients apply when each layer runs: between forwards (inside the context too) the model
    shows its own Parameters, so an optimizer or state_dict built there sees them. While an adapted
    layer runs, a shift computes with the transformed tensors, connected to those Parameters; LoRA's
    scale multiplies PEFT's per-adapter ``scaling`` entry instead (the same map: B(A·x)·(c·s) = (c·B)(A·x)·s)
    and leaves the tensors alone."""
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    originals = dict(model.named_parameters())
    expected = funcadapt.transform(tree, value, op=op)
    scaled = {k for k in tree.params if ".lora_B." in k}
    assert scaled
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    multipliers: dict[str, object] = {}
    layers = {k.split(".lora_B.")[0] for k in scaled}
    hooks = [
        modules[k.rpartition(".")[0]].register_forward_pre_hook(
            lambda m, args, k=k: seen.__setitem__(k, m._parameters[k.rpartition(".")[2]])
        )
        for k in scaled
    ] + [
        modules[path].lora_B["default"].register_forward_pre_hook(
            lambda m, args, path=path: multipliers.__setitem__(path, modules[path].scaling["default"])
        )
        for path in layers
    ]
    s = {path: modules[path].scaling["default"] for path in layers}
    try:
        with AdapterModifier(model, op, value):
            inside = dict(model.named_parameters())
            assert inside.keys() == originals.keys()
            assert all(t is originals[k] for k, t in inside.items())
            model(**BATCH)
    finally:
        for h in hooks:
            h.remove()
    assert seen.keys() == scaled and multipliers.keys() == layers
    for k, t in seen.items():
        if op == "scale":
            assert t is originals[k], "LoRA's scale leaves its tensors alone"
            continue
        assert not isinstance(t, nn.Parameter)
        assert torch.equal(t, expected[k])
        assert t.requires_grad and t.grad_fn is not None, "must stay connected to the original Parameter"
    for path, m in multipliers.items():
        assert m == (value * s[path] if op == "scale" else s[path])
        assert modules[path].scaling["default"] == s[path], "restored after the layer ran"
    after = dict(model.named_parameters())
    assert after.keys() == originals.keys()
    for k, t in after.items():
        assert t is originals[k], k
        assert isinstance(t, nn.Parameter)


def test_generate_under_a_context_sees_the_models_forward_signature():
    """transformers' generate() reads the forward's signature to build the attention mask from the padding
    and to ask for the last logits only; the patches a context puts where the model's forward starts keep
    that signature, so generate() with left padding and no mask at c = 1 is PEFT's own, bit for bit."""
    import inspect

    model = build(case("lora"))
    model.generation_config.pad_token_id = 0
    ids = inputs()["input_ids"].clamp(min=1)
    ids[0, :3] = 0  # left padding, no attention_mask given

    def generate() -> torch.Tensor:
        out = model.generate(
            input_ids=ids, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        return torch.stack(out.scores)

    with torch.no_grad():
        plain = generate()
        signature = inspect.signature(model.get_base_model().forward)
        with AdapterModifier(model, "scale", 1.0):
            assert inspect.signature(model.get_base_model().forward) == signature
            assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
            under = generate()
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


@pytest.mark.parametrize("case_id", ["lora", "dora", "oft"])
def test_deepcopy_while_a_context_is_applied_is_refused(case_id):
    """A copy taken inside a context would keep the context's patches, bound to the original modules, and
    compute with the original's tensors for good (found in review: training such a copy changed nothing it
    computed). copy.deepcopy of the model, or of a patched module, raises there; after exit the copy is a
    plain one, whose own tensors count."""
    import copy

    model = build(case(case_id))
    batch = inputs(batch=2)
    layer = next(m for _, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    with AdapterModifier(model, "scale", -1.0):
        for target in (model, layer):
            with pytest.raises(RuntimeError, match=r"copy\.deepcopy of a model while AdapterModifier"):
                copy.deepcopy(target)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            if p.requires_grad:
                p.mul_(-2.0)
        changed = output(clone(**batch))
        original = output(model(**batch))
    assert not torch.allclose(changed, original), "the copy computes with its own tensors"
