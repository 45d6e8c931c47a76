"""README's example runs as written, and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cases import build, case

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.filterwarnings("ignore")
def test_readme_example_runs_and_gradients_are_exact():
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    model = build(case("lora"))
    g = torch.Generator().manual_seed(0)
    ids, pos, neg = (torch.randint(0, 64, (2, 8), generator=g) for _ in range(3))
    namespace = {"model": model, "ids": ids, "pos": pos, "neg": neg}
    exec(compile(code, str(README), "exec"), namespace)

    # the vmapped losses are the +1 and -1 passes, and the context's loss is the -1 pass
    import funcadapt

    tree = funcadapt.extract(model)
    lp = funcadapt.call(model, funcadapt.transform(tree, 1.0), input_ids=ids, labels=pos).loss
    ln = funcadapt.call(model, funcadapt.transform(tree, -1.0), input_ids=ids, labels=neg).loss
    torch.testing.assert_close(namespace["losses"], torch.stack([lp, ln]))
    torch.testing.assert_close(namespace["ln"], ln)
    # accumulated gradients: (lp + ln) from the vmapped step plus ln from the context
    params = [p for p in tree.params.values() if p.requires_grad]
    expected = torch.autograd.grad(lp + 2 * ln, params)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


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
    tree = funcadapt.extract(model)
    with torch.no_grad():
        want = [metric(funcadapt.call(model, funcadapt.transform(tree, c), **batch)) for c in torch.linspace(-2, 2, 9)]
    torch.testing.assert_close(namespace["result"].values, torch.stack(want))
