"""torch.compile: a model under a funcadapt context traces as plain PEFT does, compiles once for
every coefficient value, computes what eager funcadapt computes, and still refuses other threads.

Graph breaks and compiles are counted with Dynamo's ``eager`` backend (``torch._dynamo.explain``
and ``CompileCounter``): capture, guards and recompiles are Dynamo's, whatever the backend. The
numbers of the comparison against compiled PEFT (speed, inductor) come from benchmarks/compile.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import cases
import pytest
import torch
import torch._dynamo
from cases import CASES as ALL_CASES
from cases import TOL64, build, case, inputs, output
from torch._dynamo.testing import CompileCounter

import funcadapt
from funcadapt import AdapterModifier

F64 = torch.float64

# one case per way an effect reaches the forward: recomputed tensors and LoRA's per-row scaling inside
# the layer (LoRA), a rule's own forward (IA3), the output interpolation (HRA), a layer read through a
# LayerAccess (PEFT's adaption prompt, a wrapped attention module); every other adapter is traced under a
# tensor coefficient below
CASES = ["lora", "ia3", "hra", "adaption-prompt"]

PEFT_BREAKS = {
    "dora": "PEFT's dequantize_module_weight calls str.startswith on a type's module",
    "shira": "PEFT's SHiRA forward calls a function Dynamo skips (sparse ops)",
    "waveft": "PEFT's WaveFT builds shapes from data (dynamic shape operators)",
    "waveft-db4": "PEFT's WaveFT builds shapes from data (dynamic shape operators)",
    "frod": "PEFT's FRoD forward runs a data-dependent operator and torch.sparse.mm",
    "poly": "PEFT's Poly router calls Tensor.item()",
    "xlora": "PEFT's X-LoRA classifier breaks the graph",
    "psoft-neumann-eps": "PEFT's PSOFT branches on tensor data",
    "lora-target-parameters": "PEFT's target_parameters forward breaks the graph (funcadapt's replacement does not)",
}
"""Adapters whose plain PEFT forward breaks the graph itself (benchmarks/compile.py --adapters lists the
breaks of every adapter): funcadapt runs those same forwards."""
KINDS = ["tensor", "float", "per_row", "per_token", "groups", "call"]


def _small(case_id: str) -> torch.nn.Module:
    """The case's model on the tiny Llama with one decoder block (two for the adaption prompt, whose config
    names two): tracing costs per block, and a break in an adapted layer or block shows in one block as in
    any number. The compile-count tests keep the two blocks."""
    from transformers import LlamaForCausalLM

    if case_id.startswith("adaption-prompt"):
        return build(case(case_id))
    config = cases.tiny_llama().config
    config.num_hidden_layers = 1
    with pytest.MonkeyPatch.context() as patched:
        patched.setitem(cases.ARCHS, "llama", lambda: LlamaForCausalLM(config))
        return build(case(case_id))


def _breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, list[str]]:
    """(graph breaks, those whose innermost frame is funcadapt's own code, with their reasons)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    own = [
        f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno}: {str(b.reason).splitlines()[0]}"
        for b in explained.break_reasons
        if b.user_stack and f"{os.sep}funcadapt{os.sep}" in b.user_stack[-1].filename
    ]
    return explained.graph_break_count, own


def _coefficient(kind: str, tree: funcadapt.AdapterTree, value: float = -1.0) -> Any:
    if kind == "tensor":
        return torch.tensor(value)
    if kind == "float":
        return value
    if kind == "per_row":
        return funcadapt.per_row(torch.tensor([value, 0.5]))
    if kind == "per_token":  # (a row of 10 positions for the batch's 8: the values reach past the forward)
        return funcadapt.per_token(torch.linspace(value, 2.0, 20).reshape(2, 10))
    if kind == "groups":
        groups = funcadapt.layer_groups(tree)
        return torch.linspace(value, 1.0, len(groups))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case_id", CASES)
def test_no_graph_breaks_under_every_kind_of_coefficient(case_id, kind):
    """Under every kind of coefficient, and with funcadapt.call inside the compiled function, the
    adapted model traces into one graph, as plain PEFT's does for these adapters (should a transformers or
    PEFT release break the graph in its own forward, no break may be in funcadapt's code)."""
    model = _small(case_id)
    tree = funcadapt.extract(model)
    x = inputs()
    with torch.no_grad():
        if kind == "call":
            breaks, own = _breaks(
                lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), **x)), torch.tensor(-1.0)
            )
        else:
            groups = "block" if kind == "groups" else None
            with AdapterModifier(model, "scale", _coefficient(kind, tree), groups=groups):
                breaks, own = _breaks(model, **x)
        if breaks:  # a transformers or PEFT release whose own forward breaks the graph: none of funcadapt's
            assert _breaks(model, **x)[0] > 0, own
    assert not own
    assert not funcadapt.active_contexts()


@pytest.mark.parametrize(
    "case_id", [c.id for c in ALL_CASES if "llama" in c.archs and c.id not in CASES and c.id not in PEFT_BREAKS]
)
def test_no_graph_breaks_for_any_adapter(case_id):
    """Every other adapter whose PEFT forward traces into one graph does so under a tensor coefficient."""
    model = _small(case_id)
    with torch.no_grad(), AdapterModifier(model, "scale", torch.tensor(-1.0)):
        breaks, own = _breaks(model, **inputs())
    if breaks:  # plain PEFT's forward breaks too (a new release; else list the adapter in PEFT_BREAKS)?
        with torch.no_grad():
            assert _breaks(model, **inputs())[0] > 0, own
    assert not own


def _counted(model: torch.nn.Module) -> tuple[torch.nn.Module, CompileCounter]:
    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(model, backend=counter), counter


VALUES = [-1.0, 0.5, 2.0, -0.25, 3.0, 0.0, -2.0, 0.75, 1.5, -0.5]


@pytest.mark.parametrize("kind", ["tensor", "float", "per_row", "per_token", "groups"])
@pytest.mark.parametrize("case_id", ["lora", "hra"])  # recomputed tensors; the output interpolation
def test_ten_coefficient_values_compile_once(case_id, kind):
    """Ten values under AdapterModifier around a compiled model: a tensor coefficient, per-row vectors
    of one length and group vectors compile once; a Python float at most once more (Dynamo makes it
    dynamic after its first change). Every output is eager funcadapt's (float64)."""
    model = build(case(case_id), dtype=F64)
    tree = funcadapt.extract(model)
    compiled, counter = _counted(model)
    x = inputs()
    groups = "block" if kind == "groups" else None
    counts = []
    with torch.no_grad():
        for value in VALUES:
            c = _coefficient(kind, tree, value)
            if isinstance(c, torch.Tensor):
                c = c.to(F64)
            with AdapterModifier(model, "scale", c, groups=groups):
                got = output(compiled(**x))
                want = output(model(**x))
            torch.testing.assert_close(got, want, **TOL64)
            counts.append(counter.frame_count)
    assert counts[-1] == (2 if kind == "float" else 1), f"compiles after each value: {counts}"


@pytest.mark.parametrize("case_id", ["lora", "hra"])
def test_per_token_coefficients_compile_once_for_every_position(case_id):
    """Decoding one token at a time (cache_position 0, 1, …, 9) under per-token coefficients around a compiled
    model: one compile for every position (the start reaches the layers as a tensor; as a number each
    position was a graph of its own, until Dynamo's recompile limit, after which the model ran uncompiled).
    Every output is eager funcadapt's (float64)."""
    model = build(case(case_id), dtype=F64)
    compiled, counter = _counted(model)
    ids = inputs(batch=2, seq=6)["input_ids"]
    values = torch.linspace(-1.0, 2.0, 2 * 12, dtype=F64).reshape(2, 12)
    counts = []
    with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_token(values)):
        for start in range(10):
            step = {"input_ids": ids[:, :1], "cache_position": torch.tensor([start]), "use_cache": False}
            torch.testing.assert_close(output(compiled(**step)), output(model(**step)), **TOL64)
            counts.append(counter.frame_count)
    assert counts == [counts[0]] * 10 and 1 <= counts[0] <= 2, f"compiles after each position: {counts}"
    # and in one graph with fullgraph=True; a position past the values is refused in the graph
    whole = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), AdapterModifier(model, "scale", funcadapt.per_token(values)):
        for start in (0, 5, 11):
            step = {"input_ids": ids[:, :1], "cache_position": torch.tensor([start]), "use_cache": False}
            torch.testing.assert_close(output(whole(**step)), output(model(**step)), **TOL64)
        step = {"input_ids": ids[:, :1], "cache_position": torch.tensor([12]), "use_cache": False}
        with pytest.raises(RuntimeError, match="per-token coefficients cover positions 0…11"):
            whole(**step)


def test_call_inside_a_compiled_function_compiles_once_for_every_tensor_value():
    model = build(case("lora"), dtype=F64)
    tree = funcadapt.extract(model)
    x = inputs()

    def run(c: torch.Tensor) -> torch.Tensor:
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **x))

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(run, backend=counter)
    with torch.no_grad():
        for value in VALUES:
            c = torch.tensor(value, dtype=F64)
            torch.testing.assert_close(compiled(c), run(c), **TOL64)
    assert counter.frame_count == 1


def test_inductor_is_as_close_to_eager_as_it_is_for_plain_peft():
    """Inductor's code for the contrastive step (+1 and −1, one backward) gives eager funcadapt's loss and
    gradients, to the adapter and to a coefficient that requires grad, as closely as inductor's code for
    plain PEFT's step gives eager PEFT's (float64; inductor reorders and fuses reductions and does not
    reproduce eager float64 bit for bit, ~1e-8 relative in the gradients, for plain PEFT too). A
    coefficient lost or applied twice would differ by ~1e-1."""
    model = build(case("lora"), dtype=F64)
    x = inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    coeff = torch.tensor(-1.0, dtype=F64, requires_grad=True)

    def plain_step(m: torch.nn.Module) -> list[torch.Tensor]:
        loss = output(m(**x)).square().mean()
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    def step(m: torch.nn.Module) -> list[torch.Tensor]:
        with AdapterModifier(model, "scale", 1.0):
            positive = output(m(**x)).square().mean()
        with AdapterModifier(model, "scale", coeff):
            negative = output(m(**x)).square().mean()
        loss = positive - negative
        return [positive.detach(), negative.detach(), *torch.autograd.grad(loss, [*params, coeff])]

    def rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        norm = torch.linalg.vector_norm
        return max(float(norm(g - w) / norm(w)) for g, w in zip(got, want, strict=True))

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    peft_gap = rel(plain_step(compiled), plain_step(model))
    assert peft_gap < 1e-6
    assert rel(step(compiled), step(model)) <= max(10 * peft_gap, 1e-9)  # (should inductor match PEFT exactly)


def test_a_compiled_model_shared_between_threads_is_refused():
    """A compiled model under a context in one thread: another thread's call is refused (Dynamo guards
    on the thread and traces the check again there), never run with the first thread's coefficient;
    once the context exits, both threads run c = 1."""
    model = _small("lora")
    compiled, _ = _counted(model)
    x = inputs()
    with torch.no_grad():
        plain = output(compiled(**x))
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def holder() -> None:
        with torch.no_grad(), AdapterModifier(model, "scale", -1.0):
            seen["before"] = output(compiled(**x))
            entered.set()
            release.wait(30)
            seen["after"] = output(compiled(**x))

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert entered.wait(60)
        with pytest.raises(RuntimeError, match="another thread"), torch.no_grad():
            compiled(**x)
    finally:
        release.set()
        t.join()
    want = output(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), -1.0), **x)).detach()
    torch.testing.assert_close(seen["before"], want)
    torch.testing.assert_close(seen["after"], want)
    with torch.no_grad():
        torch.testing.assert_close(output(compiled(**x)), plain, rtol=0, atol=0)


def test_a_compiled_call_leaves_the_registries_of_open_contexts_alone():
    """funcadapt.call inside a compiled function applies its frame within the trace: it neither claims
    modules nor joins a stack, so it does not guard on (or, replaying its side effects after the graph,
    restore) the registries other contexts are in. A context opened on another model after the compile
    neither recompiles the function nor is forgotten by it, and still refuses other threads."""
    model, other = _small("lora"), _small("ia3")
    tree = funcadapt.extract(model)
    x = inputs()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(
        lambda c: output(funcadapt.call(model, funcadapt.transform(tree, c), **x)), backend=counter
    )
    with torch.no_grad():
        compiled(torch.tensor(0.5))
        with AdapterModifier(other, "scale", -1.0):
            compiled(torch.tensor(-1.0))
            assert [c.model for c in funcadapt.active_contexts()] == [other]
            refused: dict[str, BaseException] = {}

            def enter() -> None:
                try:
                    with AdapterModifier(other, "scale", 2.0):
                        pass
                except RuntimeError as e:
                    refused["error"] = e

            t = threading.Thread(target=enter)
            t.start()
            t.join()
            assert "another thread" in str(refused.get("error"))
    assert counter.frame_count == 1
    assert not funcadapt.active_contexts()
