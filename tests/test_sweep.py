"""funcadapt.sweep: the three methods agree with separate calls, auto falls back when vmap
cannot run (and only then), the result is tidy and plots, and the model is unchanged."""

from __future__ import annotations

import warnings

import matplotlib
import pytest
import torch
from cases import assert_unchanged, build, case, inputs, output, snapshot
from peft import LoraConfig, get_peft_model
from torch import nn

import funcadapt
from funcadapt.rows import rows_mismatch
from funcadapt.sweep import rows_refused, vmap_cannot_run

matplotlib.use("Agg")

COEFFS = torch.linspace(-2, 2, 5)


def mean_logit(out):
    return output(out).mean()


def per_example(out):
    return output(out).std(dim=(1, 2))


def expected(model, metric, coeffs, batch, mode="linear"):
    tree = funcadapt.extract(model)
    with torch.no_grad():
        return torch.stack(
            [metric(funcadapt.call(model, funcadapt.transform(tree, c, mode=mode), **batch)) for c in coeffs]
        )


@pytest.mark.parametrize("case_id", ["lora", "dora", "ia3", "oft"])
@pytest.mark.parametrize("method", ["vmap", "rows", "loop"])
@pytest.mark.parametrize("metric", [mean_logit, per_example], ids=["scalar", "per-example"])
def test_methods_agree_with_separate_calls(case_id, method, metric):
    model = build(case(case_id))
    batch = inputs(batch=3)
    before = snapshot(model)
    result = funcadapt.sweep(model, metric, COEFFS, batch, method=method, chunk_size=2)
    assert result.method == method
    torch.testing.assert_close(result.values, expected(model, metric, COEFFS, batch), rtol=1e-5, atol=1e-5)
    assert_unchanged(model, before)


def test_geometric_mode():
    model = build(case("ia3"))
    batch = inputs(batch=2)
    result = funcadapt.sweep(model, mean_logit, COEFFS, batch, mode="geometric")
    assert result.method == "vmap"
    torch.testing.assert_close(result.values, expected(model, mean_logit, COEFFS, batch, "geometric"))
    with pytest.raises(ValueError, match="linear"):
        funcadapt.sweep(model, mean_logit, COEFFS, batch, mode="geometric", method="rows")


@pytest.mark.parametrize(("mode", "fallback"), [("linear", "rows"), ("geometric", "loop")])
def test_auto_falls_back_when_vmap_cannot_run(mode, fallback):
    """A metric that calls .item() cannot run under vmap: auto warns and uses the fallback."""
    model = build(case("ia3"))
    batch = inputs(batch=2)

    def item_metric(out):
        return torch.tensor(output(out).mean().item())

    with pytest.warns(UserWarning, match=f"method='vmap' failed.*trying method='{fallback}'"):
        result = funcadapt.sweep(model, item_metric, COEFFS, batch, mode=mode)
    assert result.method == fallback
    torch.testing.assert_close(result.values, expected(model, mean_logit, COEFFS, batch, mode))


def test_auto_uses_vmap_when_it_works():
    model = build(case("lora"))
    result = funcadapt.sweep(model, mean_logit, [0.0, 1.0], inputs(batch=2))
    assert result.method == "vmap"
    with torch.no_grad():
        y0 = mean_logit(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), 0.0), **inputs(batch=2)))
    assert result.values[0] == pytest.approx(float(y0), abs=1e-6)


def test_tidy_records_pandas_free_and_plot(tmp_path):
    model = build(case("lora"))
    scalar = funcadapt.sweep(model, mean_logit, COEFFS, inputs(batch=3), name="mean logit")
    assert [r["coeff"] for r in scalar.records()] == pytest.approx(COEFFS.tolist())
    assert [r["value"] for r in scalar.records()] == pytest.approx(scalar.values.tolist())
    examples = funcadapt.sweep(model, per_example, COEFFS, inputs(batch=3))
    recs = examples.records()
    assert len(recs) == 5 * 3 and recs[4] == {
        "coeff": pytest.approx(-1.0),
        "example": 1,
        "value": pytest.approx(float(examples.values[1, 1])),
    }
    ax = scalar.plot().axes[0]
    assert examples.plot(ax=ax, label="per example") is ax.figure
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == pytest.approx(COEFFS.tolist())
    assert list(line.get_ydata()) == pytest.approx(scalar.values.tolist())
    assert ax.get_ylabel() == "mean logit"
    path = tmp_path / "sweep.png"
    ax.figure.savefig(path)
    assert path.stat().st_size > 1000


def test_bad_arguments():
    model = build(case("lora"))
    with pytest.raises(ValueError, match="unknown method"):
        funcadapt.sweep(model, mean_logit, COEFFS, inputs(), method="fast")
    with pytest.raises(ValueError, match="empty"):
        funcadapt.sweep(model, mean_logit, [], inputs())
    with pytest.raises(TypeError, match="must return a tensor"):
        funcadapt.sweep(model, lambda out: 1.0, COEFFS, inputs(), method="loop")
    with pytest.raises(TypeError, match=r"batch-mean out\.loss"):  # a batch-mean cannot be split per coefficient
        funcadapt.sweep(
            model, lambda out: out.loss, COEFFS, {**inputs(), "labels": inputs()["input_ids"]}, method="rows"
        )


def test_auto_skips_rows_where_rows_are_coupled():
    """Lily couples the rows of a batch: when vmap cannot run, auto goes straight to the loop."""
    model = build(case("lily"))
    batch = inputs(batch=2)

    def item_metric(out):
        return torch.tensor(output(out).mean().item())

    with pytest.warns(UserWarning, match="method='loop'"):
        result = funcadapt.sweep(model, item_metric, COEFFS, batch)
    assert result.method == "loop"
    torch.testing.assert_close(result.values, expected(model, mean_logit, COEFFS, batch))


def test_auto_falls_back_to_the_loop_for_a_batch_mean_loss():
    """A metric reading out.loss (a batch mean, not per row) cannot use rows; auto ends at the loop."""
    model = build(case("ia3"))
    batch = {**inputs(batch=2), "labels": inputs(batch=2, seed=3)["input_ids"]}

    def loss_item(out):
        return torch.tensor(out.loss.item())

    with pytest.warns(UserWarning) as caught:
        result = funcadapt.sweep(model, loss_item, COEFFS, batch)
    # rows is left before the metric runs: it would not see out.loss
    assert any("method='rows' cannot be used (the output's 'loss'" in str(w.message) for w in caught)
    assert result.method == "loop"
    torch.testing.assert_close(result.values, expected(model, lambda out: out.loss, COEFFS, batch))


def test_float64_coefficients_and_broadcast_inputs():
    model = build(case("lora")).double()
    ids = inputs(batch=3)["input_ids"]
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None]}  # (1, T): broadcast
    coeffs = torch.tensor([0.1, -0.3], dtype=torch.float64)
    result = funcadapt.sweep(model, mean_logit, coeffs, batch, method="rows")
    assert result.coeffs.dtype == torch.float64 and result.coeffs[0].item() == 0.1
    torch.testing.assert_close(result.values, expected(model, mean_logit, coeffs, batch))
    tiled = funcadapt.tile(batch, 2)
    assert tiled["input_ids"].shape == (6, ids.shape[1]) and tiled["position_ids"].shape == (1, ids.shape[1])


def test_values_carry_no_graph_and_pandas_frame():
    """sweep runs under no_grad; to_pandas() gives the records as a frame (or says how to get pandas)."""
    model = build(case("lora"))
    result = funcadapt.sweep(model, per_example, COEFFS, inputs(batch=2))
    assert not result.values.requires_grad
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            result.to_pandas()
    else:
        frame = result.to_pandas()
        assert frame.to_dict("records") == result.records()


# ----------------------------------------------------------------------------
# auto falls back on vmap's (and rows') own refusals only


def fallback_warnings(caught):
    return [str(w.message) for w in caught if "funcadapt.sweep" in str(w.message)]


@pytest.mark.parametrize(
    "error",
    [KeyError("logits_typo"), ValueError("the metric's own check failed"), RuntimeError("the metric's own failure")],
    ids=["KeyError", "ValueError", "RuntimeError"],
)
def test_auto_propagates_an_error_of_the_metric_once(error):
    """An error unrelated to vmap is the caller's: raised as is, the metric called once, no fallback."""
    model = build(case("lora"))
    calls = []

    def failing(out):
        calls.append(1)
        raise error

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(type(error)) as raised:
            funcadapt.sweep(model, failing, COEFFS, inputs(batch=2))
    assert raised.value is error
    assert len(calls) == 1
    assert fallback_warnings(caught) == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"position_ids": torch.arange(5)[None]}, RuntimeError),  # 5 positions for 8 tokens
        ({"labels": inputs(batch=2)["input_ids"][:, :5]}, ValueError),  # labels of another length
    ],
    ids=["position_ids", "labels"],
)
def test_auto_propagates_a_shape_error_in_the_batch(bad, error):
    model = build(case("lora"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error):
            funcadapt.sweep(model, mean_logit, COEFFS, {**inputs(batch=2), **bad})
    assert fallback_warnings(caught) == []


@pytest.mark.filterwarnings("ignore:funcadapt.sweep. method='vmap' failed")
def test_auto_propagates_the_metrics_error_from_rows_without_a_loop():
    """vmap cannot run .item(), so auto moves on to rows; there the metric's own error is raised,
    not retried in a loop."""
    model = build(case("ia3"))
    calls = []

    def item_then_error(out):
        calls.append(1)
        output(out).mean().item()
        raise ValueError("the metric's own check failed")

    with pytest.raises(ValueError, match="own check"):
        funcadapt.sweep(model, item_then_error, COEFFS, inputs(batch=2))
    assert len(calls) == 2  # once under vmap (stopped at .item()), once on the first coefficient's rows


class SequenceMajor(nn.Module):
    """Runs its Linear on the (T, B, d) layout: the first axis of the adapted layer's output is
    not the batch, so per-row coefficients cannot be matched to rows."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.filterwarnings("ignore:funcadapt.sweep. method='vmap' failed")
def test_auto_falls_back_to_the_loop_where_a_layer_refuses_rows():
    torch.manual_seed(0)
    model = get_peft_model(SequenceMajor(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)).eval()
    batch = {"x": torch.randn(2, 3, 4)}

    def item_metric(out):
        return torch.tensor(out.mean().item())

    with pytest.warns(UserWarning, match=r"method='rows' failed \(ValueError: .*per-row coefficients.*'loop'"):
        result = funcadapt.sweep(model, item_metric, COEFFS, batch)
    assert result.method == "loop"
    torch.testing.assert_close(result.values, expected(model, lambda out: out.mean(), COEFFS, batch))


def captured():
    return torch.zeros(2, 5)


VMAP_CANNOT_RUN = {
    ".item()": lambda t: torch.tensor(t.sum().item()),
    "data-dependent if": lambda t: t if t.sum() > 0 else -t,
    ".tolist()": lambda t: torch.tensor(t.tolist()),
    "torch.tensor(t)": lambda t: torch.tensor(t),
    "+= into a captured tensor": lambda t: captured().add_(t),
    "mul_ of a captured tensor": lambda t: captured().mul_(t),
    "copy_ into a captured tensor": lambda t: captured().copy_(t),
    "dynamic shape (nonzero)": lambda t: torch.nonzero(t),
    "boolean mask": lambda t: t[t > 0],
    "no batching rule": lambda t: torch.tensor(torch.equal(t, t)),
    "out=": lambda t: torch.add(t, 1, out=captured()),
    "allclose": lambda t: torch.tensor(torch.allclose(t, t)),
    "storage": lambda t: torch.tensor(t.untyped_storage().size()),
}

NOT_VMAP = {
    "shape error": lambda t: t @ torch.ones(4, 2),
    "broadcast error of the function itself": lambda t: captured().add_(torch.ones(4, 2, 5)),
    "KeyError": lambda t: {}["logits"],
    "ValueError": lambda t: int("not a number"),
    "RuntimeError": lambda t: torch.ones(2).view(3),
}


def vmap_error(fn):
    with pytest.raises(Exception) as raised:
        torch.func.vmap(fn, randomness="different")(torch.randn(3, 2, 5))
    return raised.value


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("name", list(VMAP_CANNOT_RUN))
def test_what_torch_raises_when_vmap_cannot_run_is_recognised(name):
    """The classifier reads torch's actual messages (torch 2.13): each of these moves auto on."""
    assert vmap_cannot_run(vmap_error(VMAP_CANNOT_RUN[name]), size=3)


@pytest.mark.parametrize("name", list(NOT_VMAP))
def test_errors_of_the_function_itself_are_not_taken_for_vmaps(name):
    assert not vmap_cannot_run(vmap_error(NOT_VMAP[name]), size=3)


def test_a_vmap_refusal_reraised_by_other_code_is_recognised():
    outer = ValueError("the model could not run")
    outer.__cause__ = vmap_error(VMAP_CANNOT_RUN[".item()"])
    assert vmap_cannot_run(outer, size=3)


def test_rows_refusals_are_recognised():
    assert rows_refused(rows_mismatch("layer 'proj'", 3, 10))
    with pytest.raises(ValueError) as untile_error:
        funcadapt.untile(torch.tensor(1.0), 2)
    assert rows_refused(untile_error.value)
    assert not rows_refused(ValueError("the metric's own check failed"))
    assert not rows_refused(KeyError("per-row coefficient"))  # only funcadapt's ValueError / TypeError


# ----------------------------------------------------------------------------
# plot layout


def test_plot_on_its_own_figure_keeps_the_labels_inside_when_saved(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    wide = funcadapt.Sweep(COEFFS, torch.tensor([-12345.5, -20000.0, 3.0, 15000.0, 25000.5]), "loop", "metric")
    fig = wide.plot()
    (ax,) = fig.axes
    try:
        assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
        fig.savefig(tmp_path / "sweep.png")  # the default bbox: the figure as it is
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        inside = fig.bbox
        for label in (ax.xaxis.label, ax.yaxis.label):
            box = label.get_window_extent(renderer)
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
                label.get_text(),
                box,
            )
    finally:
        plt.close(fig)


def test_plot_on_a_given_axes_leaves_its_figure_alone():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        before = fig.get_layout_engine()
        assert funcadapt.Sweep(COEFFS, COEFFS, "loop").plot(ax=ax) is fig
        assert ax.get_lines(), "nothing was drawn on the given Axes"
        assert fig.get_layout_engine() is before
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------
# the row order docs/coefficient-batches.md states


def test_tiled_rows_are_coefficient_major_as_documented():
    """k coefficients, n inputs: row i·n + j of the tiled batch is input j at coefficient i;
    untile(out, k)[i][j] is that row; per_row(coeffs, repeat=n) gives row i·n + j coefficient i."""
    k, n = 3, 2
    coeffs = torch.tensor([-1.0, 0.5, 2.0])
    batch = {"input_ids": torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])}
    tiled = funcadapt.tile(batch, k)["input_ids"]
    rows = funcadapt.per_row(coeffs, repeat=n).values
    assert tiled.shape[0] == len(rows) == k * n
    for i in range(k):
        for j in range(n):
            assert torch.equal(tiled[i * n + j], batch["input_ids"][j])
            assert rows[i * n + j] == coeffs[i]
    parts = funcadapt.untile(tiled, k)
    assert len(parts) == k and all(torch.equal(part, batch["input_ids"]) for part in parts)
    assert torch.equal(torch.stack(parts), tiled.unflatten(0, (k, n)))
    # input-major, built by hand: row j·k + i is input j, so the coefficients go as coeffs.repeat(n)
    by_input = batch["input_ids"].repeat_interleave(k, 0)
    by_input_rows = funcadapt.per_row(coeffs.repeat(n)).values
    for i in range(k):
        for j in range(n):
            assert torch.equal(by_input[j * k + i], batch["input_ids"][j]) and by_input_rows[j * k + i] == coeffs[i]
    # generate() with m beams / return sequences: m consecutive copies of each tiled row
    m = 2
    assert torch.equal(funcadapt.per_row(coeffs, repeat=n * m).values, rows.repeat_interleave(m))

    model = build(case("lora"))
    tree = funcadapt.extract(model)
    batch = inputs(batch=n)
    with torch.no_grad():
        out = funcadapt.call(
            model, funcadapt.transform(tree, funcadapt.per_row(coeffs, repeat=n)), **funcadapt.tile(batch, k)
        )
        logits = torch.stack([part.logits for part in funcadapt.untile(out, k)])  # [k, n, T, V]
        for i, c in enumerate(coeffs):
            alone = funcadapt.call(model, funcadapt.transform(tree, c), **batch).logits
            for j in range(n):
                torch.testing.assert_close(out.logits[i * n + j], alone[j], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(logits[i, j], alone[j], rtol=1e-5, atol=1e-5)
