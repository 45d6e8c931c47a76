"""Gradient checkpointing: the recompute runs during ``backward()``, after ``call`` or the
``AdapterModifier`` context has exited, and must see the same swapped tensors as the
forward did, and only those. Gradients are compared in float64, up to its rounding (cases.tolerance)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from cases import CASES, VOCAB, Case, assert_unchanged, build, case, inputs, snapshot, tolerance
from torch import nn
from torch.utils.checkpoint import CheckpointError

import funcadapt
from funcadapt import AdapterModifier, swap

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = inputs()
POS = torch.randint(0, VOCAB, BATCH["input_ids"].shape, generator=torch.Generator().manual_seed(11))
NEG = torch.randint(0, VOCAB, BATCH["input_ids"].shape, generator=torch.Generator().manual_seed(12))
F64 = torch.float64


def _enable_peft(model: nn.Module, reentrant: bool = False) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _enable_base(model: Any, reentrant: bool = False) -> None:
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _enable_activation(model: Any, reentrant: bool = False) -> None:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


def _enable_wrapper(model: Any, reentrant: bool = False) -> None:
    """torch's checkpoint_wrapper on each decoder layer: what apply_activation_checkpointing and
    accelerate's FSDP ``activation_checkpointing`` install (not transformers' own mechanism)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    model.get_base_model().config.use_cache = False  # as transformers' own checkpointing does: no cache to re-append
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
    )


ENABLERS: dict[str, Callable[..., None]] = {
    "peft-gradient": _enable_peft,
    "base-gradient": _enable_base,
    "activation": _enable_activation,
    "torch-checkpoint-wrapper": _enable_wrapper,
}


def checkpointed(case_id: str, enable: Callable[..., None] = _enable_peft, **kw: Any) -> nn.Module:
    model = build(case(case_id), dtype=F64)
    model.train()  # checkpointing only runs in training mode; all dropouts here are 0
    enable(model, **kw)
    layers = [m for m in model.modules() if swap.checkpoint_attr(m) is not None]
    assert len(layers) >= 2, "checkpointing was not enabled on the decoder layers"
    return model


@contextlib.contextmanager
def count_mlp_forwards(model: Any) -> Iterator[list[int]]:
    """How often layer 0's MLP runs: twice per forward+backward when it is checkpointed."""
    count = [0]
    mlp = model.get_base_model().model.layers[0].mlp
    handle = mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))  # the recompute stops early
    try:
        yield count
    finally:
        handle.remove()


def trainable(tree: funcadapt.AdapterTree) -> dict[str, torch.Tensor]:
    return {k: p for k, p in tree.params.items() if p.requires_grad}


def grads_of(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(params, gs, strict=True))


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], case_: Case | None = None) -> None:
    assert got.keys() == ref.keys()
    assert flat(ref).abs().max() > 0, "reference gradients are all zero: the test would mean nothing"
    for k in ref:
        tol = tolerance(ref[k], case_ or False)
        torch.testing.assert_close(got[k], ref[k], **tol, msg=lambda m, k=k: f"grad of {k}: {m}")


def rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return float((flat(got) - flat(ref)).norm() / flat(ref).norm())


def seeded() -> None:
    """Before every training-mode forward: adapters that sample in training (PVeRA) then draw
    the same noise in the reference and in the checked computation (the checkpoint recompute
    restores the RNG state itself)."""
    torch.manual_seed(1234)


def loss_call(model: nn.Module, tree: funcadapt.AdapterTree, c: Any, labels: torch.Tensor = POS) -> torch.Tensor:
    seeded()
    return funcadapt.call(model, funcadapt.transform(tree, c), **BATCH, labels=labels).loss


def loss_modifier(model: nn.Module, tree: funcadapt.AdapterTree, c: Any, labels: torch.Tensor = POS) -> torch.Tensor:
    seeded()
    with AdapterModifier(model, "scale", c):
        return model(**BATCH, labels=labels).loss


COEFFS = (-1.0, 0.5)


def test_plain_functional_call_is_wrong_under_checkpointing():
    """Why the frames exist: torch.func.functional_call restores the Parameters on return,
    so the checkpoint recompute during backward sees the untransformed adapter."""
    model = build(case("lora"), dtype=F64)
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)

    def plain(c: float) -> torch.Tensor:
        seeded()
        params = dict(funcadapt.transform(tree, c))  # the transformed tensors, as a plain dict
        return torch.func.functional_call(model, params, (), {**BATCH, "labels": POS}).loss

    ref = grads_of(plain(-1.0), params)
    assert_grads_close(grads_of(loss_call(model, tree, -1.0), params), ref)  # no checkpointing: both right

    _enable_peft(model)
    with count_mlp_forwards(model) as count:
        loss = plain(-1.0)
        wrong = grads_of(loss, params)
    assert count[0] == 2, "layer 0 was not recomputed: checkpointing is not active"
    assert rel_err(wrong, ref) > 0.1, "plain functional_call was expected to give wrong gradients here"

    with count_mlp_forwards(model) as count:
        right = grads_of(loss_call(model, tree, -1.0), params)
    assert count[0] == 2
    assert_grads_close(right, ref)


def _checkpointable(case: Any) -> Any:
    """A case whose note ``peft_checkpointing_bug`` says why PEFT's own model cannot be trained with
    gradient checkpointing runs as a strict xfail: the recompute must still fail (a test in the
    case's own test file pins the bug on PEFT alone), and a PEFT fix turns it into a failure."""
    reason = case.notes.get("peft_checkpointing_bug")
    if not reason:
        return case
    mark = pytest.mark.xfail(raises=CheckpointError, strict=True, reason=reason)
    return pytest.param(case, marks=mark)


@pytest.mark.parametrize("path", [loss_call, loss_modifier], ids=["call", "modifier"])
@pytest.mark.parametrize("case", [_checkpointable(c) for c in CASES], ids=lambda c: c.id)
def test_checkpointed_gradients_exact(case, path):
    model = build(case, dtype=F64)
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)
    refs = {c: grads_of(loss_call(model, tree, c), params) for c in COEFFS}

    _enable_peft(model)
    before = snapshot(model)
    for c in COEFFS:
        with count_mlp_forwards(model) as count:
            got = grads_of(path(model, tree, c), params)  # backward after call / context returned
        assert count[0] == 2, "checkpointing is not active"
        assert_grads_close(got, refs[c], case)
    assert_unchanged(model, before)


@pytest.mark.parametrize("enabler", ENABLERS.values(), ids=ENABLERS.keys())
@pytest.mark.parametrize("case_id", ["lora", "dora"])
def test_enabling_api(case_id, enabler):
    """Whichever transformers/PEFT entry point turned checkpointing on, gradients are exact."""
    model = build(case(case_id), dtype=F64)
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref = grads_of(loss_call(model, tree, -1.0), params)
    enabler(model)
    tree = funcadapt.extract(model)  # checkpoint_wrapper inserts a module (and so renames the keys)
    params = trainable(tree)
    for path in (loss_call, loss_modifier):
        with count_mlp_forwards(model) as count:
            got = grads_of(path(model, tree, -1.0), params)
        assert count[0] == 2, "checkpointing is not active"
        assert_grads_close({k.replace("_checkpoint_wrapped_module.", ""): g for k, g in got.items()}, ref)


@pytest.mark.parametrize("case_id", ["lora", "dora"])
def test_reentrant_checkpointing_refused(case_id):
    model = checkpointed(case_id, reentrant=True)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="use_reentrant"):
        funcadapt.call(model, funcadapt.transform(tree, -1.0), **BATCH, labels=POS)
    assert not swap.active_frames()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="use_reentrant"), AdapterModifier(model, "scale", -1.0):
        model(**BATCH, labels=POS)
    assert not swap.active_frames()
    assert_unchanged(model, before)
    model(**BATCH, labels=POS).loss.backward()  # the model itself still trains normally


def _vmap_check(model: nn.Module, monkeypatch: pytest.MonkeyPatch, case_: Case | None = None) -> None:
    tree = funcadapt.extract(model)
    params = trainable(tree)
    cs = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)

    def f(c: torch.Tensor) -> torch.Tensor:
        return loss_call(model, tree, c)

    monkeypatch.setattr(swap, "_warned_functorch", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = funcadapt.vmap(f)(cs)
    assert any("checkpointing is skipped" in str(w.message) for w in caught), [str(w.message) for w in caught]
    got = grads_of(losses.sum(), params)

    with count_mlp_forwards(model) as count:
        loop = torch.stack([f(c) for c in cs])
        ref = grads_of(loop.sum(), params)
    assert count[0] == 2 * len(cs), "the loop was expected to run checkpointed"
    torch.testing.assert_close(losses, loop, **tolerance(loop, case_ or False))
    assert_grads_close(got, ref, case_)  # batched kernels reduce in another order: float64 rounding


def _samples_in_training(model: nn.Module) -> bool:
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(**BATCH).logits
        torch.manual_seed(2)
        b = model(**BATCH).logits
    return not torch.equal(a, b)


def test_vmap_with_checkpointing_enabled(monkeypatch):
    model = checkpointed("lora")
    _vmap_check(model, monkeypatch)


@pytest.mark.parametrize("case", [_checkpointable(c) for c in CASES], ids=lambda c: c.id)
def test_vmap_with_checkpointing_no_input_grad_hook(case, monkeypatch):
    """The same with the input-embedding hook removed (not needed for non-reentrant checkpointing):
    funcadapt runs the layers uncheckpointed under vmap, with a warning, and matches the loop."""
    model = checkpointed(case.id)
    if _samples_in_training(model):
        pytest.skip("the adapter samples noise in training mode; under vmap each coefficient draws its own")
    model.disable_input_require_grads()
    _vmap_check(model, monkeypatch, case)


@pytest.mark.parametrize(
    ("case_id", "c_pos"),
    [
        ("lora", 1.0),
        ("lora", torch.tensor(1.0)),
        ("lora", 0.5),
        ("dora", 1.0),
        ("dora", 0.5),
        ("oft", 0.5),
        ("randlora", 0.5),
        ("modules-to-save", 0.5),
        ("trainable-tokens", 0.5),
    ],
    ids=lambda v: str(v.item()) + "t" if isinstance(v, torch.Tensor) else str(v),
)
def test_backward_inside_other_context(case_id, c_pos):
    """The seed loop, with the +1 loss's backward run while an AdapterModifier(−1) is active:
    the recompute replays the +1 frame only, and the −1 context survives the backward."""
    model = build(case(case_id), dtype=F64)
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref_pos = grads_of(loss_call(model, tree, c_pos, POS), params)
    ref_neg = grads_of(loss_call(model, tree, -1.0, NEG), params)
    ref_out = loss_call(model, tree, -1.0, POS).detach()

    _enable_peft(model)
    before = snapshot(model)
    seeded()
    with AdapterModifier(model, "scale", c_pos):
        lp = model(**BATCH, labels=POS).loss
    seeded()
    with AdapterModifier(model, "scale", -1.0):
        ln = model(**BATCH, labels=NEG).loss
        with count_mlp_forwards(model) as count:
            lp.backward()
        assert count[0] == 1, "the +1 loss was not recomputed during its backward"
        got_pos = {k: p.grad.clone() for k, p in params.items()}
        assert len(swap.active_frames()) == 1
        with torch.no_grad():
            seeded()
            still = model(**BATCH, labels=POS).loss  # the −1 context is intact after the replay
    ln.backward()
    got_total = {k: p.grad.clone() for k, p in params.items()}

    assert_grads_close(got_pos, ref_pos)
    assert_grads_close(got_total, {k: ref_pos[k] + ref_neg[k] for k in params})
    torch.testing.assert_close(still, ref_out, **tolerance(ref_out))
    for p in params.values():
        p.grad = None
    assert_unchanged(model, before)


@pytest.mark.parametrize("case_id", ["lora", "dora", "adalora", "randlora", "modules-to-save"])
def test_nested_contexts_under_checkpointing(case_id):
    """The recompute replays both nested frames, in order: gradients equal the product coefficient."""
    model = build(case(case_id), dtype=F64)
    model.train()
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref = grads_of(loss_call(model, tree, -1.0), params)
    _enable_peft(model)
    before = snapshot(model)
    seeded()
    with AdapterModifier(model, "scale", 2.0), AdapterModifier(model, "scale", -0.5):
        loss = model(**BATCH, labels=POS).loss
    with count_mlp_forwards(model) as count:
        got = grads_of(loss, params)
    assert count[0] == 1, "the layers were not recomputed"
    assert_grads_close(got, ref)
    assert_unchanged(model, before)


def test_recompute_on_another_thread_replays_the_forward_threads_effects():
    """On CUDA the autograd engine recomputes checkpointed layers on its own worker thread; the
    replay then acts for the thread that ran the forward (its frames, its ownership). Simulated
    here by running backward() on a second thread, inside and after the context."""
    import threading

    model = checkpointed("lora")
    tree = funcadapt.extract(model)
    params = trainable(tree)
    ref = grads_of(loss_call(model, tree, -1.0), params)
    for inside in (False, True):
        got: dict[str, torch.Tensor] = {}
        errors: list[BaseException] = []

        def backward(loss: torch.Tensor, got=got, errors=errors) -> None:
            try:
                got.update(grads_of(loss, params))
            except BaseException as e:
                errors.append(e)

        with count_mlp_forwards(model) as count:
            with AdapterModifier(model, "scale", -1.0):
                loss = model(**BATCH, labels=POS).loss
                if inside:
                    t = threading.Thread(target=backward, args=(loss,))
                    t.start()
                    t.join()
            if not inside:
                t = threading.Thread(target=backward, args=(loss,))
                t.start()
                t.join()
        assert not errors, errors
        assert count[0] == 2, "checkpointing is not active"
        assert_grads_close(got, ref)
    assert not swap.active_frames()
