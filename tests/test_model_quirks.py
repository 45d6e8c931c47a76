"""What models do that funcadapt must meet (issue 17): each test failed before its fix.

* Falcon adds a tensor that depends on the coefficient into one that does not, in place
  (``mlp_output += attention_output``): under vmap over c the left side is not batched.
  funcadapt batches the embeddings, so every activation is batched from the first layer on.
* Bloom's ``BloomGelu`` runs an ``autograd.Function`` without ``setup_context``, which
  torch.func refuses: funcadapt swaps in the same function in plain ops under transforms.
  An unknown such Function is refused naming its module and the alternatives.
* OPT runs fc1/fc2 on ``[batch·seq, d]``: per-row coefficients reach each token's row.

References are independent of funcadapt: the per-layer forward-hook interpolation
(``cases.reference_interpolation``), run in a loop over the coefficients; float64 throughout,
so "equal" means equal to float64 rounding (rtol 1e-10 leaves ~1e5 eps for these two-layer
models' reductions).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cases import assert_unchanged, randomize_adapters, reference_interpolation, snapshot
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import funcadapt
from funcadapt import AdapterModifier, swap

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 96
IDS = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(2, VOCAB, (2, *IDS.shape), generator=torch.Generator().manual_seed(1))
EXACT = {"rtol": 1e-10, "atol": 1e-12}

CONFIGS: dict[str, dict[str, Any]] = {
    "falcon": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "new_decoder_architecture": False,
        "multi_query": True,
        "parallel_attn": True,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},
    "opt": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 64,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 64,
    },
}


def build(arch: str, config: Any, train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=VOCAB, **CONFIGS[arch]))
    model = get_peft_model(base, config).double()
    randomize_adapters(model, seed=1)
    return model.train(train)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss in the logits' dtype (transformers' own loss casts to float32)."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def reference_losses_and_grads(model: nn.Module, coeffs: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    losses = []
    for i, c in enumerate(coeffs):
        with reference_interpolation(model, c):
            losses.append(cross_entropy(model(input_ids=IDS).logits, LABELS[i]))
    loss = torch.stack(losses)
    return loss.detach(), list(torch.autograd.grad(loss.sum(), list(trainable(model).values())))


def vmapped_losses_and_grads(model: nn.Module, coeffs: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tree = funcadapt.extract(model)

    def loss(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(funcadapt.call(model, funcadapt.transform(tree, c), input_ids=IDS).logits, labels)

    losses = funcadapt.vmap(loss)(torch.tensor(coeffs, dtype=torch.float64), LABELS[: len(coeffs)])
    return losses.detach(), list(torch.autograd.grad(losses.sum(), list(trainable(model).values())))


VMAP_CASES = [
    pytest.param("falcon", lambda: LoraConfig(r=4, init_lora_weights=False), False, id="falcon-lora"),
    pytest.param("falcon", lambda: IA3Config(), False, id="falcon-ia3"),
    pytest.param("bloom", lambda: LoraConfig(r=4, init_lora_weights=False), True, id="bloom-lora-train"),
    pytest.param("bloom", lambda: IA3Config(), False, id="bloom-ia3"),
]


@pytest.mark.parametrize(("arch", "config", "train"), VMAP_CASES)
def test_vmap_over_coefficients_runs_and_is_exact(arch, config, train):
    """vmap over c = [+1, −1] (per-coefficient labels) equals the reference loop: losses and
    gradients. Before: Falcon raised "output with shape [2, 8, 32] doesn't match the broadcast
    shape", Bloom torch's raw "must override the setup_context staticmethod"."""
    model = build(arch, config(), train)
    before = snapshot(model)
    want_loss, want_grads = reference_losses_and_grads(model, [1.0, -1.0])
    got_loss, got_grads = vmapped_losses_and_grads(model, [1.0, -1.0])
    assert_unchanged(model, before)
    torch.testing.assert_close(got_loss, want_loss, **EXACT)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **EXACT)
    assert not torch.allclose(want_loss[0], want_loss[1])


def test_bloom_gelu_is_swapped_only_under_transforms():
    """Outside torch.func transforms Bloom's own BloomGelu (its autograd.Function) runs unchanged."""
    model = build("bloom", LoraConfig(r=4, init_lora_weights=False), train=True)
    gelu = next(m for m in model.modules() if type(m).__name__ == "BloomGelu")
    calls: list[int] = []
    from transformers.models.bloom import modeling_bloom

    real = modeling_bloom.GeLUFunction.apply

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    modeling_bloom.GeLUFunction.apply = spy  # type: ignore[method-assign]
    try:
        with AdapterModifier(model, "scale", -1.0):
            model(input_ids=IDS)
        assert calls, "Bloom's own GeLUFunction did not run outside transforms"
        calls.clear()
        vmapped_losses_and_grads(model, [1.0, -1.0])
        assert not calls, "GeLUFunction ran under vmap"
    finally:
        modeling_bloom.GeLUFunction.apply = real  # type: ignore[method-assign]
    assert gelu.forward.__func__ is type(gelu).forward  # type: ignore[attr-defined]


class Doubling(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context), as some models still have."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Doubling.apply(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.act = Doubler()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.inner(x)))


def test_unknown_custom_function_refused_naming_the_module():
    """An autograd.Function funcadapt does not know: funcadapt.vmap names the module and what works
    instead (torch only says "must override the setup_context staticmethod"), the model unchanged;
    the coefficient batch it points to runs and equals separate calls."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["inner", "head"], init_lora_weights=False))
    x = torch.randn(3, 8)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    pattern = r"module .*Doubler computes through an autograd\.Function.*per_row.*sweep"
    with pytest.raises(RuntimeError, match=pattern):
        funcadapt.vmap(lambda c: funcadapt.call(model, funcadapt.transform(tree, c), x))(torch.tensor([1.0, -1.0]))
    assert not swap.active_frames()
    assert_unchanged(model, before)
    with torch.no_grad():
        with AdapterModifier(model, "scale", funcadapt.per_row([1.0, -1.0], repeat=3)):
            rows = model(funcadapt.tile(x, 2))
        separate = [funcadapt.call(model, funcadapt.transform(tree, c), x) for c in (1.0, -1.0)]
    torch.testing.assert_close(rows, torch.cat(separate))


OPT_CASES = [
    pytest.param(lambda: IA3Config(), id="ia3-default-targets"),  # fc2 is a feed-forward IA3 layer
    pytest.param(lambda: LoraConfig(r=4, target_modules=["q_proj", "fc1", "fc2"], init_lora_weights=False), id="lora"),
]


@pytest.mark.parametrize("config", OPT_CASES)
def test_opt_per_row_reaches_flattened_layers(config):
    """OPT runs fc1/fc2 on the batch flattened batch-major ([B·T, d]); per-row coefficients reach
    each token's row there: the forward and generate() equal separate reference runs. Before, the
    correctly tiled batch was refused ("its output has 30 rows but 6 per-row coefficients")."""
    model = build("opt", config())
    coeffs = [-1.0, 0.0, 2.0]
    tiled = funcadapt.tile(IDS, len(coeffs))
    before = snapshot(model)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=len(IDS))):
            logits = model(input_ids=tiled).logits
            generated = model.generate(input_ids=tiled, **settings)
        want_logits, want_generated = [], []
        for c in coeffs:
            with reference_interpolation(model, c):
                want_logits.append(model(input_ids=IDS).logits)
                want_generated.append(model.generate(input_ids=IDS, **settings))
    assert_unchanged(model, before)
    torch.testing.assert_close(logits, torch.cat(want_logits), **EXACT)
    assert torch.equal(generated, torch.cat(want_generated))


def test_flattened_layer_of_an_unknown_model_is_refused_by_name():
    """A layer whose output has a multiple of the per-row coefficients' rows, in a model funcadapt
    does not know to flatten batch-major, is refused naming the layer and both readings (beams, a
    flattened batch), not blamed on the tiling alone."""
    from funcadapt import rows

    model = build("opt", IA3Config())
    saved = dict(rows.BATCH_MAJOR)
    rows.BATCH_MAJOR.clear()
    try:
        before = snapshot(model)
        with (
            pytest.raises(ValueError, match=r"layer '.*fc2'.*num_beams.*flattens the batch at this layer"),
            AdapterModifier(model, "scale", funcadapt.per_row([1.0, -1.0], repeat=len(IDS))),
        ):
            model(input_ids=funcadapt.tile(IDS, 2))
        assert not swap.active_frames()
        assert_unchanged(model, before)
    finally:
        rows.BATCH_MAJOR.update(saved)


def test_another_thread_during_a_vmapped_call_gets_funcadapts_refusal():
    """While a vmapped call has the blocks' inputs batched, a forward of the same model from another
    thread is refused by funcadapt's thread check (before: functorch's "tensor escaped from vmap")."""
    import threading

    model = build("falcon", LoraConfig(r=4, init_lora_weights=False))
    tree = funcadapt.extract(model)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, BaseException | None] = {}
    last_block = model.get_base_model().transformer.h[-1]

    def pause(module: nn.Module, args: Any) -> None:
        if threading.current_thread() is threading.main_thread() and not inside.is_set():
            inside.set()
            done.wait(timeout=60)

    def other() -> None:
        inside.wait(timeout=60)
        try:
            with torch.no_grad():
                model(input_ids=IDS)
            seen["error"] = None
        except BaseException as e:
            seen["error"] = e
        finally:
            done.set()

    handle = last_block.register_forward_pre_hook(pause)
    thread = threading.Thread(target=other)
    thread.start()
    try:
        with torch.no_grad():
            funcadapt.vmap(lambda c: funcadapt.call(model, funcadapt.transform(tree, c), input_ids=IDS).logits)(
                torch.tensor([1.0, -1.0], dtype=torch.float64)
            )
    finally:
        handle.remove()
        thread.join()
    assert isinstance(seen["error"], RuntimeError), seen
    assert "is being modified by funcadapt in another thread" in str(seen["error"]), seen


def test_int8_rows_coupled_follows_bitsandbytes_dispatch():
    """bitsandbytes runs LLM.int8's outlier kernel (rows coupled) in eval mode everywhere and in train
    mode off the CPU/XPU (CUDA: train mode too); its dequantising kernel only in train mode on CPU/XPU.
    (A meta tensor stands in for a CUDA input: only its device type is read.)"""
    import bitsandbytes as bnb

    from funcadapt import quantized

    layer = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False, threshold=6.0)
    cpu, cuda = torch.zeros(2, 8), torch.zeros(2, 8, device="meta")
    layer.eval()
    assert quantized.rows_coupled(layer, cpu) and quantized.rows_coupled(layer, cuda)
    layer.train()
    assert not quantized.rows_coupled(layer, cpu) and quantized.rows_coupled(layer, cuda)
    layer.state.threshold = 0.0
    assert not quantized.rows_coupled(layer, cuda)


def test_batched_inputs_follow_the_tensors_device():
    """The batched 1 that batches the blocks' inputs under vmap is moved to each input's device (a CPU
    coefficient with a model elsewhere; a meta tensor stands in for a CUDA one)."""
    from funcadapt.call import _batched

    block = nn.Linear(3, 3)

    def run(c: torch.Tensor) -> torch.Tensor:
        one = torch.ones_like(c.reshape(-1)[:1]).reshape(())
        out = _batched(block, one, lambda x: x)(torch.zeros(2, 3, device="meta"))
        assert out.device.type == "meta"
        return c

    funcadapt.vmap(run)(torch.tensor([1.0, -1.0]))
