"""funcadapt.sweep: the three methods agree with separate calls, auto falls back when vmap
cannot run, the result is tidy and plots, and the model is unchanged."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from cases import assert_unchanged, build, case, inputs, output, snapshot

import funcadapt

matplotlib.use("Agg")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

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
    ax = scalar.plot()
    examples.plot(ax=ax, label="per example")
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

    with pytest.warns(UserWarning):
        result = funcadapt.sweep(model, loss_item, COEFFS, batch)
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
