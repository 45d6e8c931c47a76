"""README's example runs as written, and does what its comments say."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from cases import build, case, tolerance

FLOAT32 = "README's examples run the tiny models in float32, as written"
"""Why the README checks compare at float32 rounding (cases.tolerance's float32 bound)."""

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_readme_example_runs_and_gradients_are_exact():
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # complete as written: it builds its own model
    model, ids, pos, neg = (namespace[name] for name in ("model", "ids", "pos", "neg"))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "the adapter is a no-op"

    # the vmapped losses are the +1 and -1 passes, and the context's loss is the -1 pass
    import funcadapt

    tree = funcadapt.extract(model)
    lp = funcadapt.call(model, funcadapt.transform(tree, 1.0), input_ids=ids, labels=pos).loss
    ln = funcadapt.call(model, funcadapt.transform(tree, -1.0), input_ids=ids, labels=neg).loss
    want = torch.stack([lp, ln])
    torch.testing.assert_close(namespace["losses"], want, **tolerance(want, FLOAT32))
    torch.testing.assert_close(namespace["ln"], ln, **tolerance(ln, FLOAT32))
    # accumulated gradients: (lp + ln) from the vmapped step plus ln from the context
    params = [p for p in tree.params.values() if p.requires_grad]
    expected = torch.autograd.grad(lp + 2 * ln, params)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, **tolerance(e, FLOAT32))


@pytest.mark.filterwarnings("ignore")
def test_readme_coefficient_batch_and_sweep_example(monkeypatch):
    """README's second example: generate() at three coefficients from one batch equals three
    separate generate() calls, and the sweep equals separate calls."""
    import matplotlib

    matplotlib.use("Agg")
    import funcadapt

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    code = blocks[1]
    model = build(case("lora"))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # no early stop: every row generates 20 tokens
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(3, 64, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    batch["attention_mask"][0, :2] = 0  # left padding

    def metric(out):
        return out.logits.mean()

    namespace = {
        "model": model,
        "prompts": ["a", "b"],
        "batch": batch,
        "metric": metric,
        "torch": torch,
        "funcadapt": funcadapt,
    }
    exec(compile(code, str(README), "exec"), namespace)

    separate = []
    for c in (-1.0, 0.0, 1.0):
        with funcadapt.AdapterModifier(model, "scale", c):
            separate.append(model.generate(**batch, max_new_tokens=20))
    assert torch.equal(namespace["out"], torch.cat(separate))
    # response-only steering: the prompt runs at c = 0, so the first new token is the base model's (the same
    # computation in float32: no rounding between them); the whole continuation equals generate() without a
    # KV cache under hooks interpolating each token at 0 on the prompt and 1.5 after it
    # (cases.per_token_reference), compared in float64, where cached and uncached decoding cannot round a
    # near tie differently on another CPU
    from cases import per_token_reference, reference_interpolation

    with model.disable_adapter():
        base = model.generate(**batch, max_new_tokens=20)
    assert torch.equal(namespace["response"][:, 8], base[:, 8])
    wide = copy.deepcopy(model).double()
    steer = funcadapt.after_prompt(batch, max_new_tokens=20, coeff=1.5)
    with funcadapt.AdapterModifier(wide, "scale", steer):
        got_response = wide.generate(**batch, max_new_tokens=20)
    values = torch.cat([torch.zeros(8), torch.full((20,), 1.5)]).double().expand(2, -1)
    with torch.no_grad(), reference_interpolation(wide, per_token_reference(values)):
        want_response = wide.generate(**batch, max_new_tokens=20, use_cache=False)
    assert torch.equal(got_response, want_response)
    tree = funcadapt.extract(model)
    with torch.no_grad():
        want = [metric(funcadapt.call(model, funcadapt.transform(tree, c), **batch)) for c in torch.linspace(-2, 2, 9)]
    want = torch.stack(want)
    torch.testing.assert_close(namespace["result"].values, want, **tolerance(want, FLOAT32))


def _readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _pip_install_args(line: str) -> list[str]:
    """The words after `pip install`, without `-q`: `python -m pip install -q X` equals `pip install X`."""
    words = shlex.split(line)
    return [w for w in words[words.index("install") + 1 :] if w != "-q"]


def _ci_installs() -> tuple[list[str], list[str]]:
    """CI's two funcadapt installs: (pinned, newest); the pinned one carries the constraints."""
    lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    installs = [_pip_install_args(line) for line in lines if "python -m pip install" in line and " -e " in line]
    pinned = [words for words in installs if "-c" in words]
    newest = [words for words in installs if "-c" not in words]
    assert len(pinned) == len(newest) == 1, installs
    return pinned[0], newest[0]


def test_readme_install_and_test_commands_are_what_ci_runs():
    """README's install is CI's pinned job (job 1) word for word, CI's newest-releases job (job 2) is
    the same install without the constraints, and both jobs run README's exact test command."""
    install = next(b for b in _readme_bash_blocks() if "pip install" in b).strip()
    steps = [step.strip() for step in install.split("&&")]
    readme_install = [_pip_install_args(s) for s in steps if s.startswith("pip install") and "-e" in shlex.split(s)]
    assert len(readme_install) == 1, steps
    assert "-c .ci/constraints.txt" in install
    pinned, newest = _ci_installs()
    assert pinned == readme_install[0]
    assert newest == [w for w in pinned if w not in ("-c", ".ci/constraints.txt")]

    text = README.read_text(encoding="utf-8")
    test_command = re.search(r"The tests \(what CI runs.*?\):\s*```bash\n(.*?)\n```", text, re.S).group(1).strip()
    assert test_command == "python -m pytest -q -n auto"
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert ci_lines.count(test_command) == 2


def test_pyproject_declares_only_the_ranges_ci_tests():
    """Every package pyproject.toml declares (all extras, which CI installs) is pinned by CI and the pin
    satisfies the declared range and is its lower bound: the low end of each range is what job 1 tests,
    the high end what job 2 (no constraints) resolves."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"] + [r for rs in extras.values() for r in rs]]
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    # torch is pinned on .ci/run's install line (the local CPU build), not in the constraints
    pinned_install = _ci_installs()[0]
    pins["torch"] = Version(next(w for w in pinned_install if w.startswith("torch==")).split("==")[1])
    editable = pinned_install[pinned_install.index("-e") + 1]
    assert set(re.search(r"\[(.*)\]", editable).group(1).split(",")) == set(extras)

    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {req}"
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower == [pins[name]], f"{req}: the lower bound should be the pinned (tested) {pins[name]}"
