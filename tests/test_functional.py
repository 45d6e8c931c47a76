"""Functional training (docs/functional.md): the pure loop of examples/functional_training.py trains
the same adapter as the AdapterModifier + torch.optim.AdamW loop, step for step (LoRA, IA3, OFT,
RoAd, LoRA on a bitsandbytes 4-bit base); an ensemble trained in one vmapped loop equals its
members' separate runs, and a member written into the model is the adapter the stacked evaluation
ran; train-mode dropout draws per member; what cannot be stacked is refused by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from cases import CASES, TOL64, VOCAB, build, case, float64, inputs, output, randomize_adapters, tiny_llama, tolerance
from peft import LoraConfig, PeftModel, get_peft_model
from scripts import load_script
from torch import Tensor, nn
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import funcadapt
from funcadapt.functional import UNBATCHABLE

pytestmark = [
    # torch.func.vmap runs ops without a batching rule (SDPA on CPU, FRoD's sparse tensor) one slice at a time
    pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented:UserWarning"),
    # PEFT's notices while building the one-case-per-rule models (BOFT without CUDA, LN tuning, BEFT, FRoD)
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1:UserWarning"),
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),
    pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias term:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled:UserWarning"),
]

COEFFS = torch.tensor([1.0, -1.0])
LR, WEIGHT_DECAY = 1e-2, 0.1
F64 = torch.float64


def load_example() -> Any:
    return load_script("examples/functional_training.py", "functional_training")


example = load_example()


def contrastive_batches(steps: int, seed: int = 0, batch: int = 2, seq: int = 6) -> list[tuple[Tensor, Tensor]]:
    """Per step (ids, labels), each (2, batch, seq): index 0 for the +1 pass, 1 for the −1 pass."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (2, batch, seq), generator=g), torch.randint(0, VOCAB, (2, batch, seq), generator=g))
        for _ in range(steps)
    ]


def functional_train_step(
    model: nn.Module, tree: funcadapt.AdapterTree, make: Callable[..., Any] | None = None
) -> Callable[..., tuple[Any, ...]]:
    """The example's step (the loop docs/functional.md shows; ``make``: its ``make_train_step`` by
    default), with this test's AdamW weight decay."""
    return (make or example.make_train_step)(example.contrastive_loss(model, tree), weight_decay=WEIGHT_DECAY)


def modifier_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor, labels: Tensor):
    """The stateful loop: two AdapterModifier passes, one backward after both exits, optimizer.step().
    Returns the two losses and d(sum of losses)/d(the two coefficients)."""
    coeffs = COEFFS.clone().requires_grad_()
    losses = []
    for i in range(2):
        with funcadapt.AdapterModifier(model, "scale", coeffs[i]):
            losses.append(model(input_ids=ids[i], labels=labels[i]).loss)
    total = losses[0] + losses[1]
    optimizer.zero_grad()
    (grad_coeffs,) = torch.autograd.grad(total, coeffs, retain_graph=True)
    total.backward()
    optimizer.step()
    return torch.stack(losses).detach(), grad_coeffs


def assert_params_close(got: dict[str, Tensor], want: dict[str, Tensor], **tol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key].detach(), msg=key, **tol)


# How far funcadapt.adamw_update may drift from torch.optim.AdamW. (1) funcadapt computes the bias
# corrections 1 − βᵗ in float32 from a float32 step (funcadapt/functional.py; torch.optim: float64 from
# Python numbers): β rounded to float32 is off by δ, so βᵗ by t·δ·βᵗ⁻¹, a relative error of 1 − βᵗ that
# cancellation makes large, t·δ·βᵗ⁻¹/(1 − βᵗ) (1.3e-5 for β₂ = 0.999 at t = 1). The step lr·m̂/(√v̂ + ε)
# divides by 1 − β₁ᵗ and √(1 − β₂ᵗ), and |m̂/√v̂| stays near 1 in Adam's first steps, so each step moves
# a parameter by up to lr times that relative error. (2) The two loops' gradients differ by rounding, at
# most n·u ≈ 64·u of the tensor's largest gradient G; Adam divides each entry by its own √v̂, so an entry
# whose gradients were small moves by lr·64·u·G/(√v̂ + ε), unbounded in relative terms. Both add up over
# the steps, and a parameter that drifted changes the next gradients: allow 10 × the sum (measured: up to
# 3 ×; a learning rate off by 1% exceeds it 150-fold).
def bias_correction_drift(lr: float, betas: tuple[float, float], t: int) -> float:
    (b1, b2), f32 = betas, torch.float32
    d1, d2 = (abs(float(torch.tensor(b, dtype=f32)) - b) for b in (b1, b2))
    return lr * (t * d1 * b1 ** (t - 1) / (1 - b1**t) + t * d2 * b2 ** (t - 1) / (1 - b2**t) / 2)


def adam_drift(optimizer: torch.optim.Optimizer, lr: float, t: int) -> dict[int, Tensor]:
    """Per parameter (by id), the bound above for torch.optim's step t just taken: (1) + (2)."""
    (group,) = optimizer.param_groups
    drift = {}
    for p in group["params"]:
        g = p.grad.detach()
        u = torch.finfo(g.dtype).eps / 2
        v_hat = optimizer.state[p]["exp_avg_sq"] / (1 - group["betas"][1] ** t)
        noise = lr * 64 * u * float(g.abs().max()) / (v_hat.sqrt() + group["eps"])
        drift[id(p)] = bias_correction_drift(lr, group["betas"], t) + noise
    return drift


def check_loop_equals_modifier_loop(model: nn.Module, make: Callable[..., Any] | None = None, steps: int = 3) -> None:
    tree = funcadapt.extract(model)
    own = {k: v for k, v in tree.params.items() if v.requires_grad}
    params = initial = funcadapt.trainable(tree)
    before = {k: v.detach().clone() for k, v in own.items()}
    opt_state = funcadapt.adamw_init(params)
    step = functional_train_step(model, tree, make)
    optimizer = torch.optim.AdamW(list(own.values()), lr=LR, weight_decay=WEIGHT_DECAY)
    bound = {k: torch.zeros_like(v) for k, v in own.items()}
    for t, (ids, labels) in enumerate(contrastive_batches(steps), start=1):
        params, opt_state, losses, grad_coeffs = step(params, opt_state, torch.tensor(LR), ids, labels)
        assert_params_close(own, before, rtol=0, atol=0)  # the functional step never touches the model
        want_losses, want_grad_coeffs = modifier_step(model, optimizer, ids, labels)
        drift = adam_drift(optimizer, LR, t)
        # losses and d/dc: the previous steps' drift (above) and float32 rounding (bitsandbytes; the float32
        # coefficients) move them by ~1e-7 of the losses: cases.tolerance's float32 bound, 1e-5 of the losses
        # (d/dc sums terms of the losses' size, so their rounding is relative to the losses, not to d/dc)
        tol = tolerance(want_losses, "AdamW drift and float32 rounding")
        torch.testing.assert_close(losses, want_losses, **tol)
        torch.testing.assert_close(grad_coeffs, want_grad_coeffs, **tol)
        for key, p in own.items():  # step for step, within the drift bound accumulated so far
            bound[key] = bound[key] + drift[id(p)]
            excess = (params[key] - p.detach()).abs() - 10 * bound[key] - TOL64["atol"]
            assert float(excess.max()) <= 0, f"{key}: {float(excess.max()):.3g} beyond AdamW's drift bound at step {t}"
        before = {k: v.detach().clone() for k, v in own.items()}
    assert all(not torch.equal(params[k], initial[k]) for k in initial), "every tensor trained"


# ---------------------------------------------------------------------------------------------
# the pure update and the loop


def test_adamw_update_is_torch_optim_adamw_and_pure():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(5, generator=g, dtype=F64)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()} for _ in range(5)]
    reference = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    optimizer = torch.optim.AdamW(reference.values(), lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    state = funcadapt.adamw_init(params)
    for step_grads in grads:
        given = {k: v.clone() for k, v in params.items()}
        params, new_state = funcadapt.adamw_update(
            params, step_grads, state, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
        )
        assert all(torch.equal(given[k], v) for k, v in given.items())  # inputs are not modified
        assert new_state is not state and not torch.equal(new_state.step, state.step)
        state = new_state
        for k, p in reference.items():
            p.grad = step_grads[k].clone()
        optimizer.step()
        # the bias corrections' float32 drift (bias_correction_drift; the gradients are the same tensors)
        drift = sum(bias_correction_drift(3e-2, (0.8, 0.99), t) for t in range(1, int(state.step) + 1))
        assert_params_close(params, reference, rtol=TOL64["rtol"], atol=10 * drift)
    assert float(state.step) == 5


@pytest.mark.parametrize("case_id", ["lora", "ia3", "oft", "road_1"])
def test_functional_loop_equals_modifier_and_torch_optim_loop(case_id):
    """docs/functional.md: grad_and_value over (params, coefficients) with funcadapt.vmap over ±1
    inside and adamw_update gives, step for step, the losses, the coefficient gradients and the
    parameters of two AdapterModifier passes + backward + torch.optim.AdamW."""
    model = build(case(case_id), dtype=F64)
    model.train()
    check_loop_equals_modifier_loop(model)


QUANT = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


def lora_on_bnb(path: Path, quant: str = "nf4") -> nn.Module:
    base = LlamaForCausalLM.from_pretrained(path, quantization_config=QUANT[quant](), device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=1)
    assert any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    return model.train()  # 4-bit layers in eval mode may run a kernel with no input gradient (AVX512-BF16 CPUs)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_torch_func_loop_equals_modifier_loop_on_a_bitsandbytes_base(llama_dir, quant):
    """The torch.func loop itself (grad of the vmapped ±1 loss) on a 4-bit and an 8-bit base."""
    check_loop_equals_modifier_loop(lora_on_bnb(llama_dir, quant))  # float32: bitsandbytes computes in it


def test_vmap_over_grad_through_bitsandbytes_is_refused_clearly(llama_dir):
    """vmap of torch.func.grad (an ensemble on a bitsandbytes base) cannot run through the folded
    bitsandbytes layers: a clear error, not a wrong gradient."""
    model = lora_on_bnb(llama_dir)
    tree = funcadapt.extract(model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss(c: Tensor) -> Tensor:
        return funcadapt.call(model, funcadapt.transform(tree, c), input_ids=ids).logits.square().mean()

    with pytest.raises(RuntimeError, match=r"vmap over torch\.func\.grad cannot run through bitsandbytes"):
        funcadapt.vmap(torch.func.grad(loss))(COEFFS)


# ---------------------------------------------------------------------------------------------
# ensembles


def lora_model(seed: int = 0, **config: Any) -> nn.Module:
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    model = get_peft_model(tiny_llama(), LoraConfig(**options))
    randomize_adapters(model, seed=seed + 1)
    return float64(model).train()


def members_of(tree: funcadapt.AdapterTree, k: int) -> list[dict[str, Tensor]]:
    """k different initialisations: the tree's trainable tensors, each perturbed with its own seed."""
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(100 + i)
        out.append(
            {
                key: t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype)
                for key, t in funcadapt.trainable(tree).items()
            }
        )
    return out


def test_ensemble_in_one_vmapped_loop_equals_separate_runs():
    """K members with their own initialisations, learning rates and contrastive datasets, trained by
    funcadapt.vmap(train_step), equal K runs of the same step one after another."""
    model = lora_model()
    tree = funcadapt.extract(model)
    members = members_of(tree, 3)
    lrs = torch.tensor([1e-2, 3e-2, 5e-3], dtype=F64)
    data = [contrastive_batches(3, seed=s) for s in range(3)]  # member k's dataset
    step = functional_train_step(model, tree)

    stacked = funcadapt.stack(tree, members)
    state = funcadapt.vmap(funcadapt.adamw_init)(stacked)
    for t in range(3):
        ids = torch.stack([data[k][t][0] for k in range(3)])
        labels = torch.stack([data[k][t][1] for k in range(3)])
        stacked, state, losses, grad_coeffs = funcadapt.vmap(step)(stacked, state, lrs, ids, labels)

    for k in range(3):
        params, opt_state = members[k], funcadapt.adamw_init(members[k])
        for ids, labels in data[k]:
            params, opt_state, alone_losses, alone_grad_coeffs = step(params, opt_state, lrs[k], ids, labels)
        # the same step on both sides (float64 model, the same float32 bias corrections): float64 rounding,
        # except d/dc, which the float32 coefficients round to float32 once (within eps32 of each other)
        assert_params_close(funcadapt.unstack(stacked)[k], params, **TOL64)
        torch.testing.assert_close(losses[k], alone_losses, **TOL64)
        torch.testing.assert_close(grad_coeffs[k], alone_grad_coeffs, rtol=torch.finfo().eps, atol=0)
        key = next(iter(params))
        torch.testing.assert_close(state.exp_avg_sq[key][k], opt_state.exp_avg_sq[key], **TOL64)


def test_member_written_into_the_model_and_saved_equals_the_stacked_evaluation(tmp_path):
    model = lora_model().eval()
    tree = funcadapt.extract(model)
    stacked = funcadapt.stack(tree, members_of(tree, 3))
    ids = inputs(batch=2, seq=6)["input_ids"]
    coeffs = [-1.0, 0.5, 1.0]

    def logits(params: dict[str, Tensor], c: float) -> Tensor:
        return funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, params), c), input_ids=ids).logits

    with torch.no_grad():
        evaluated = {c: funcadapt.vmap(lambda p, c=c: logits(p, c))(stacked) for c in coeffs}
        funcadapt.load_params(tree, funcadapt.unstack(stacked)[2])
        for c in coeffs:
            with funcadapt.AdapterModifier(model, "scale", c):
                torch.testing.assert_close(model(input_ids=ids).logits, evaluated[c][2], **TOL64)
        model.save_pretrained(tmp_path)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(float64(tiny_llama()), tmp_path).eval()  # the same random base (seed 0)
        torch.testing.assert_close(loaded(input_ids=ids).logits, evaluated[1.0][2], **TOL64)
        with funcadapt.AdapterModifier(loaded, "scale", -1.0):
            torch.testing.assert_close(loaded(input_ids=ids).logits, evaluated[-1.0][2], **TOL64)


def test_dropout_in_an_ensemble_draws_per_member():
    """docs/functional.md: under funcadapt.vmap each member draws its own dropout masks; a member run
    alone, even from the same seed, draws other masks; randomness="same" gives every member the mask a
    run alone draws; in eval mode a member reproduces exactly."""
    model = lora_model(lora_dropout=0.5)
    tree = funcadapt.extract(model)
    same_member = funcadapt.trainable(tree)
    stacked = funcadapt.stack(tree, [same_member] * 3)  # three identical members
    ids = inputs(batch=2, seq=6)["input_ids"]

    def logits(params: dict[str, Tensor]) -> Tensor:
        return funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, params), 1.0), input_ids=ids).logits

    with torch.no_grad():
        torch.manual_seed(7)
        together = funcadapt.vmap(logits)(stacked)
        assert not torch.allclose(together[0], together[1]) and not torch.allclose(together[1], together[2])
        for k in range(3):
            torch.manual_seed(7)
            assert not torch.allclose(logits(same_member), together[k])
        torch.manual_seed(7)
        shared = funcadapt.vmap(logits, randomness="same")(stacked)
        assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
        torch.manual_seed(7)
        torch.testing.assert_close(logits(same_member), shared[0], **TOL64)  # the one mask a run alone draws
        model.eval()
        together = funcadapt.vmap(logits)(stacked)
        for k in range(3):
            torch.testing.assert_close(logits(same_member), together[k], **TOL64)


def test_stack_refuses_other_shapes_and_other_static_structure():
    tree = funcadapt.extract(lora_model(r=4))
    rank8 = funcadapt.extract(lora_model(r=8, lora_alpha=16))  # same α/r, other shapes
    with pytest.raises(ValueError, match=r"member 1's .*lora_A.* has shape \(8, 32\), the tree's has \(4, 32\).*rank"):
        funcadapt.stack(tree, [funcadapt.trainable(tree), funcadapt.trainable(rank8)])
    other_alpha = funcadapt.extract(lora_model(r=4, lora_alpha=16))  # same shapes, other scaling α/r
    with pytest.raises(ValueError, match=r"member 1 differs from the tree at layer .*q_proj.* in \['static'\]"):
        funcadapt.stack(tree, [tree, other_alpha])
    assert funcadapt.stack(tree, [tree, funcadapt.extract(lora_model(seed=3))])[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    ].shape == (2, 4, 32)
    with pytest.raises(ValueError, match="other keys than member 0"):
        members = members_of(tree, 2)
        members[1].pop(next(iter(members[1])))
        funcadapt.stack(tree, members)
    with pytest.raises(ValueError, match="bfloat16"):
        funcadapt.stack(tree, [{k: v.bfloat16() for k, v in funcadapt.trainable(tree).items()}])


def test_stack_refuses_rules_vmap_cannot_batch_by_name_and_one_member_still_trains():
    model = build(case("frod"), dtype=F64)
    tree = funcadapt.extract(model)
    params = funcadapt.trainable(tree)
    with pytest.raises(ValueError, match=r"uses the 'frod' rule, whose parameters cannot be stacked.*sparse"):
        funcadapt.stack(tree, [params] * 2)

    def loss(p: dict[str, Tensor]) -> Tensor:  # one member: torch.func.grad works, as autograd does
        return (
            output(funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, p), -0.7), **inputs()))
            .square()
            .mean()
        )

    got = torch.func.grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    want = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for (key, g), w in zip(got.items(), want, strict=True):
        torch.testing.assert_close(g, w, **TOL64, msg=key)


def test_the_refused_rules_really_fail_under_vmap_over_parameters():
    """The refusal is needed: batching FRoD's parameters fails inside PEFT's forward. When a torch or
    PEFT release makes this pass, drop the rule from funcadapt.functional.UNBATCHABLE."""
    assert set(UNBATCHABLE) == {"frod"}
    model = build(case("frod"))
    tree = funcadapt.extract(model)
    params = funcadapt.trainable(tree)
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}

    def out(p: dict[str, Tensor]) -> Tensor:
        return output(funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, p), -1.0), **inputs()))

    with pytest.raises(NotImplementedError, match="Sparse"):
        funcadapt.vmap(out)(stacked)


ONE_CASE_PER_RULE = list({c.rule: c for c in reversed(CASES) if c.rule not in UNBATCHABLE}.values())


@pytest.mark.parametrize("case_", ONE_CASE_PER_RULE, ids=lambda c: c.id)
def test_every_other_rule_stacks_and_vmaps_over_members(case_):
    """Values and gradients of a vmapped pair of members equal each member's own, for every rule not
    refused (one case per rule; the coefficient is a non-trivial -0.7)."""
    arch = case_.archs[0]
    model = build(case_, arch, dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs(arch, batch=2, seq=5, dtype=F64)
    params = funcadapt.trainable(tree)
    members = [params, {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}]

    def loss(p: dict[str, Tensor]) -> Tensor:
        return (
            output(funcadapt.call(model, funcadapt.transform(funcadapt.combine(tree, p), -0.7), **batch))
            .square()
            .mean()
        )

    grads, values = funcadapt.vmap(torch.func.grad_and_value(loss))(funcadapt.stack(tree, members))
    for k, member in enumerate(members):
        want_grads, want_value = torch.func.grad_and_value(loss)(member)
        torch.testing.assert_close(values[k], want_value, **tolerance(want_value, case_))
        for key, g in want_grads.items():
            torch.testing.assert_close(grads[key][k], g, **tolerance(g, case_), msg=key)


def test_lora_mha_probe_runs_at_import_and_keeps_the_rng():
    """LoRA on nn.MultiheadAttention reads PEFT's merge from a probe with random init: computed when
    funcadapt is imported (never under vmap, which refuses the init), without moving the RNG."""
    from funcadapt.rules import lora_mha

    assert lora_mha.out_proj_multiplicity.cache_info().currsize == 1
    state = torch.random.get_rng_state()
    lora_mha.out_proj_multiplicity.__wrapped__()
    assert torch.equal(torch.random.get_rng_state(), state)
    model = build(case("lora-mha"), dtype=F64)
    tree = funcadapt.extract(model)
    batch = inputs()
    got = funcadapt.vmap(lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), **batch)))(COEFFS)
    torch.testing.assert_close(got[0], output(model(**batch)), **TOL64)


# ---------------------------------------------------------------------------------------------
# the small helpers


def test_trainable_combine_unstack_and_load_params_refusals():
    model = lora_model()
    tree = funcadapt.extract(model)
    params = funcadapt.trainable(tree)
    assert params.keys() == {k for k, v in tree.params.items() if v.requires_grad}
    assert all(not v.requires_grad and v.data_ptr() != tree.params[k].data_ptr() for k, v in params.items())
    with pytest.raises(ValueError, match="not in the tree"):
        funcadapt.combine(tree, {"nope": torch.zeros(1)})
    stacked = funcadapt.stack(tree, [params, params])
    with pytest.raises(ValueError, match=r"looks stacked: write one member, funcadapt.unstack\(stacked\)\[k\]"):
        funcadapt.load_params(tree, stacked)
    with pytest.raises(ValueError, match="not the model's own Parameters"):
        funcadapt.load_params(funcadapt.combine(tree, params), params)
    with pytest.raises(ValueError, match="bfloat16"):
        funcadapt.load_params(tree, {k: v.bfloat16() for k, v in params.items()})
    with pytest.raises(ValueError, match="same leading"):
        funcadapt.unstack({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})


# ---------------------------------------------------------------------------------------------
# the docs and the example


def test_docs_loop_runs_as_written(tmp_path, monkeypatch):
    """docs/functional.md's first code block (the loop and the ensemble, with its own assertion that a
    member equals its separate run) runs as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "functional.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/functional.md", "exec"), {"__name__": "docs_functional"})
    assert (tmp_path / "out" / "member2" / "adapter_model.safetensors").is_file()


def test_quick_example_trains_an_ensemble_that_equals_the_sequential_runs(tmp_path):
    result = example.main(["--quick", "--out", str(tmp_path)])
    assert result["ensemble_vs_sequential"] <= 1e-5
    assert result["zero_identical"], "c = 0 is the base model for every member"
    assert result["loaded_matches"], "member 0 written into the model must give the stacked metrics"
    assert (Path(result["saved"]) / "adapter_model.safetensors").is_file()
    assert set(result["metrics"]) == {-1.0, 0.0, 1.0} and all(len(v) == 4 for v in result["metrics"].values())
