"""Bad and stale input: an error that names the problem and the fix, never a silent wrong answer.

Non-finite coefficients, params computed before an optimizer step, a coefficient for an adapter
that is loaded but not active, a context left open, params from another model, a list where a
coefficient goes, and torch.compile with coefficients that change from call to call.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from cases import assert_unchanged, build, case, inputs, output, snapshot
from peft import LoraConfig

import funcadapt
from funcadapt import AdapterModifier, swap

BATCH = inputs()


def logits(model: torch.nn.Module, params: funcadapt.Transformed | None = None) -> torch.Tensor:
    with torch.no_grad():
        if params is None:
            return output(model(**BATCH))
        return output(funcadapt.call(model, params, **BATCH))


# ---------------------------------------------------------------- non-finite coefficients


@pytest.mark.parametrize(
    "coeff",
    [math.nan, math.inf, -math.inf, torch.tensor(math.nan), torch.tensor(-math.inf, requires_grad=True)],
    ids=["nan", "inf", "-inf", "tensor-nan", "tensor-inf-grad"],
)
def test_non_finite_coefficient_is_refused(coeff):
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    before = snapshot(model)
    number = float(coeff.detach()) if isinstance(coeff, torch.Tensor) else coeff
    for value in (coeff, {"default": coeff}, funcadapt.per_row(torch.tensor([1.0, number]))):
        with pytest.raises(ValueError, match=r"coefficient.* is not finite.*give a finite coefficient"):
            funcadapt.transform(tree, value)
        with pytest.raises(ValueError, match="is not finite"), AdapterModifier(model, "scale", value):
            pytest.fail("the context body must not run")
    with pytest.raises(ValueError, match="is not finite"):
        funcadapt.transform(tree, coeff, op="shift")
    assert not swap.active_frames()
    assert_unchanged(model, before)


def test_non_finite_coefficient_under_vmap_is_not_inspected():
    """Documented: under torch.func transforms the value is symbolic, so it cannot be checked."""
    model = build(case("lora"))
    tree = funcadapt.extract(model)

    def run(c: torch.Tensor) -> torch.Tensor:
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **BATCH))

    with torch.no_grad():
        out = funcadapt.vmap(run)(torch.tensor([1.0, math.nan]))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


# ---------------------------------------------------------------- params computed before a step


def _step(model: torch.nn.Module, tree: funcadapt.AdapterTree) -> None:
    """One SGD step on a loss through c = -1 that moves every adapter tensor."""
    trainable = [p for p in tree.params.values() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    loss = output(funcadapt.call(model, funcadapt.transform(tree, -1.0), **BATCH)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize(
    ("case_id", "coeff", "op"),
    [
        ("lora", -1.0, "scale"),
        ("lora", 1.0, "scale"),  # identity entries are the Parameters themselves: the same behaviour
        ("lora", 0.5, "scale"),
        ("ia3", -1.0, "scale"),  # IA3 is computed eagerly at transform (validation): recomputed at call
        ("oft", 0.5, "scale"),
        ("ia3", None, "invert"),
        ("lora", None, "disable"),
        ("lora", 0.05, "shift"),
    ],
)
def test_params_computed_before_a_step_apply_to_the_stepped_weights(case_id, coeff, op):
    model = build(case(case_id))
    tree = funcadapt.extract(model)
    params = funcadapt.transform(tree, coeff, op=op)
    unread = funcadapt.transform(tree, coeff, op=op)
    key = next(k for k, v in tree.params.items() if v.requires_grad)
    params[key]  # the Mapping view read before the step
    _step(model, tree)
    fresh = funcadapt.transform(tree, coeff, op=op)
    stepped = logits(model, fresh)
    torch.testing.assert_close(logits(model, params), stepped, rtol=0, atol=0)
    # the Mapping view: a first read after the step gives the stepped values; a view read before refuses
    torch.testing.assert_close(unread[key], fresh[key], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"changed in place since these transformed values were read"):
        params[key]


def test_a_step_inside_a_context_applies_to_the_next_forward():
    """shift and scale inside one context: the second forward uses the stepped weights."""
    for op, value in (("shift", 0.05), ("scale", -1.0)):
        model = build(case("lora"))
        reference = copy.deepcopy(model)
        tree, ref_tree = funcadapt.extract(model), funcadapt.extract(reference)
        with AdapterModifier(model, op, value):
            output(model(**BATCH))
            _step(model, tree)
            got = output(model(**BATCH)).detach()
        with AdapterModifier(reference, op, value):
            _step(reference, ref_tree)  # the same step (its call composes with the context)
        torch.testing.assert_close(got, logits(reference, funcadapt.transform(ref_tree, value, op=op)), rtol=0, atol=0)


# ---------------------------------------------------------------- adapters outside the tree


def _two_adapters() -> torch.nn.Module:
    model = build(case("lora"))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))  # loaded, not active
    return model


def test_coefficient_for_a_loaded_but_inactive_adapter_says_how_to_activate_it():
    model = _two_adapters()
    tree = funcadapt.extract(model)
    match = r"adapter 'b', which is loaded but not active.*set_adapter\('b'\)"
    with pytest.raises(ValueError, match=match):
        funcadapt.transform(tree, {"default": 1.0, "b": -0.5})
    before = snapshot(model)
    with pytest.raises(ValueError, match=match), AdapterModifier(model, "scale", {"default": 1.0, "b": -0.5}):
        pytest.fail("the context body must not run")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        funcadapt.transform(tree, {"nope": 1.0})


# ---------------------------------------------------------------- contexts left open


def _entered_and_left(model: torch.nn.Module) -> AdapterModifier:
    context = AdapterModifier(model, "scale", -1.0)
    context.__enter__()  # never exited here: the bug this guards against
    return context


def test_a_context_left_open_is_listed_and_warns_once_at_the_next_forward():
    model = build(case("lora"))
    context = _entered_and_left(model)
    try:
        (active,) = funcadapt.active_contexts(model)
        assert active.what == "AdapterModifier(op='scale', value=-1.0, mode='linear')"
        assert active.where.startswith(__file__) and active.model is model
        assert funcadapt.active_contexts(build(case("ia3"))) == []
        with pytest.warns(funcadapt.OpenContextWarning, match=r"still active, but the code that entered it") as w:
            model(**BATCH)
        assert w[0].filename == __file__  # pointed at the user's forward, not at torch
        with warnings.catch_warnings():
            warnings.simplefilter("error", funcadapt.OpenContextWarning)
            model(**BATCH)  # once per context
    finally:
        context.__exit__(None, None, None)
    assert funcadapt.active_contexts() == []


NOTEBOOK = [
    "import warnings; warnings.simplefilter('always')\nimport funcadapt, cases\n"
    "model = cases.build(cases.case('lora'))",
    "context = funcadapt.AdapterModifier(model, 'scale', -1.0)\ncontext.__enter__()",
    "model(**cases.inputs())",
]


def _run_python(code: str, stdin: str | None = None, args: tuple[str, ...] = ()) -> str:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return done.stderr


def test_a_context_left_open_at_a_scripts_top_level_warns_at_exit():
    """At a script's top level the entering code never returns before the script ends, so no forward
    can tell the context was forgotten: it is reported when the interpreter exits."""
    stderr = _run_python("\n".join(NOTEBOOK))
    assert "OpenContextWarning: funcadapt context(s) never exited: AdapterModifier(op='scale'" in stderr, stderr


def test_a_context_left_open_in_a_notebook_cell_or_repl_warns_at_the_next_cells_forward():
    """Notebook cells (IPython's run_cell when installed, else the same exec of one code object per cell)
    and REPL statements finish: the forward in the next one warns, pointing at it; exit then says nothing."""
    cells = repr(NOTEBOOK)
    shell = (
        "try:\n    from IPython.core.interactiveshell import InteractiveShell\n"
        "    run = InteractiveShell.instance().run_cell\n"
        "except ImportError:\n    ns = {'__name__': '__main__'}\n"
        "    def run(cell): exec(compile(cell, '<cell>', 'exec'), ns)\n"
        f"for cell in {cells}:\n    run(cell)\n"
        "import funcadapt\nfor c in funcadapt.active_contexts(): print('open', c)\n"
    )
    stderr = _run_python(shell)
    assert stderr.count("OpenContextWarning") == 1 and "the code that entered it" in stderr, stderr
    repl = _run_python("", stdin="\n".join(NOTEBOOK) + "\n", args=("-i",))
    assert repl.count("OpenContextWarning") == 1 and "the code that entered it" in repl, repl


def test_no_warning_for_contexts_in_use():
    """A `with` block, a context held open by a generator (a pytest fixture), contextlib.ExitStack."""
    import contextlib

    model = build(case("lora"))

    def fixture() -> Iterator[None]:
        with AdapterModifier(model, "scale", 0.5):
            yield

    with warnings.catch_warnings():
        warnings.simplefilter("error", funcadapt.OpenContextWarning)
        with AdapterModifier(model, "scale", -1.0):
            model(**BATCH)
        held = fixture()
        next(held)
        model(**BATCH)
        next(held, None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(AdapterModifier(model, "scale", 2.0))
            model(**BATCH)
    assert funcadapt.active_contexts() == []


def test_out_of_order_exit_names_the_context_still_open():
    model = build(case("lora"))
    outer = AdapterModifier(model, "scale", -1.0).__enter__()
    inner = AdapterModifier(model, "disable").__enter__()
    with pytest.raises(
        RuntimeError,
        match=r"AdapterModifier\(op='scale'.*cannot exit while AdapterModifier\(op="
        r"'disable'.*test_bad_input.py:\d+\) is still open inside it; exit that one first",
    ):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)


# ---------------------------------------------------------------- params from another model


def test_params_from_another_model_are_refused_and_replace_is_the_way():
    model_a, model_b = build(case("lora"), seed=0), build(case("lora"), seed=3)
    tree_a, tree_b = funcadapt.extract(model_a), funcadapt.extract(model_b)
    before = snapshot(model_b)
    with pytest.raises(ValueError, match=r"extracted from another model.*op='replace'"):
        funcadapt.call(model_b, funcadapt.transform(tree_a, -1.0), **BATCH)
    with pytest.raises(ValueError, match="extracted from another model"), AdapterModifier(model_b, "disable"):
        funcadapt.call(model_b, funcadapt.transform(tree_a, 0.5), **BATCH)
    assert_unchanged(model_b, before)
    # on purpose: model_b's base with model_a's adapter tensors, with gradients into model_a's
    given = funcadapt.transform(tree_b, dict(tree_a.params), op="replace")
    loss = output(funcadapt.call(model_b, given, **BATCH)).square().mean()
    with torch.no_grad():
        b_with_a = copy.deepcopy(model_b)
        for key, tensor in funcadapt.extract(b_with_a).params.items():
            tensor.copy_(tree_a.params[key])
    torch.testing.assert_close(loss, output(b_with_a(**BATCH)).square().mean(), rtol=1e-6, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in tree_a.params.values() if p.requires_grad)
    # tensors of one's own (a functional loop's state): accepted
    own = tree_b.with_params({k: v.detach().clone() for k, v in tree_a.params.items()})
    torch.testing.assert_close(logits(model_b, funcadapt.transform(own, 1.0)), logits(b_with_a), rtol=0, atol=0)


# ---------------------------------------------------------------- small gaps


def test_a_list_coefficient_gets_the_hint():
    tree = funcadapt.extract(build(case("lora")))
    with pytest.raises(TypeError, match=r"got a list; .*funcadapt.vmap.*funcadapt.per_row.*funcadapt.sweep"):
        funcadapt.transform(tree, [1.0, -1.0])


# ---------------------------------------------------------------- torch.compile


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_torch_compile_of_a_function_calling_transform():
    """Inside a compiled function: a 0-d tensor coefficient compiles once for every value, exact; a
    Python number warns once with that fix (Dynamo would specialise on each value)."""
    import torch._dynamo

    from funcadapt import transform as transform_module

    model = build(case("lora"))
    tree = funcadapt.extract(model)

    def run(c):
        return output(funcadapt.call(model, funcadapt.transform(tree, c), **BATCH))

    compiled = torch.compile(run, backend="eager")
    torch._dynamo.reset()
    seen = []
    with torch.no_grad():
        for c in (0.25, 0.5, -1.0, 2.0):
            torch.testing.assert_close(compiled(torch.tensor(c)), run(c), rtol=1e-5, atol=1e-6)
            seen.append(_graphs())
    assert len(set(seen)) == 1, f"graphs after each coefficient: {seen}"
    torch._dynamo.reset()
    transform_module._WARNED_COMPILED_NUMBER = False
    with torch.no_grad(), pytest.warns(UserWarning, match=r"Python number .* Pass a 0-d tensor instead"):
        compiled(0.3)


# ---------------------------------------------------------------- what call and shift take


@pytest.mark.parametrize("given", ["tree", "number", "tensor"])
def test_call_without_transform_says_what_it_takes(given):
    """funcadapt.call(model, tree, ...) or call(model, -1.0, ...): a TypeError that says what call takes
    and how to make it (before: AttributeError 'AdapterTree' object has no attribute 'items')."""
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    params = {"tree": tree, "number": -1.0, "tensor": torch.tensor(-1.0)}[given]
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"takes params: what funcadapt\.transform\(tree, coeff\) returns") as info:
        funcadapt.call(model, params, **BATCH)
    assert "funcadapt.transform(" in str(info.value) and "AdapterModifier" in str(info.value)
    assert not funcadapt.swap.active_frames()
    assert_unchanged(model, before)


def test_shift_with_an_unknown_key_names_both_readings():
    model = build(case("lora"))
    tree = funcadapt.extract(model)
    with pytest.raises(ValueError, match=r"\['foo'\] is neither an adapter name nor a parameter key.*\['default'\]"):
        funcadapt.transform(tree, {"foo": torch.tensor(0.1)}, op="shift")
    key = next(iter(tree.params))
    shifted = funcadapt.transform(tree, {key: torch.tensor(0.1)}, op="shift")  # a key works
    torch.testing.assert_close(shifted[key], tree.params[key] + 0.1)
    assert funcadapt.transform(tree, {"default": 0.1}, op="shift")[key] is not tree.params[key]  # an adapter too
