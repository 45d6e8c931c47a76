"""The bundled example (README's first command) runs and shows what it claims."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scripts import load_script

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "contrastive_steering.py"


def load_example():
    return load_script("examples/contrastive_steering.py", "contrastive_steering")


@pytest.mark.filterwarnings("ignore")
def test_quick_example_trains_a_steering_adapter(tmp_path):
    example = load_example()
    result = example.main(["--quick", "--out", str(tmp_path)])
    metric = result["metric"]
    assert result["exact_zero"], "c = 0 must be the base model exactly"
    assert metric[1.0] > metric[0.0] + 0.1 > metric[-1.0] + 0.2, metric
    assert Path(result["plot"]).is_file()
    assert result["generation_matches_separate_runs"], "one-batch generation must equal one generate() per c"
    # the ±1 step as a coefficient batch (one plain forward) trains the same adapter as vmap
    rows = example.main(["--quick", "--method", "rows", "--out", str(tmp_path)])
    # not a rounding bound: the two methods' float32 gradients differ by rounding, and AdamW turns that into
    # parameter differences of up to ~lr where a gradient entry is near 0 (its step is lr·sign(g) at first);
    # 1e-3 of a metric that the training moves by > 0.3 (above) still fails a method that trains otherwise
    for c, v in metric.items():
        assert rows["metric"][c] == pytest.approx(v, abs=1e-3)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("adapter", ["ia3", "road", "oft", "vera"])
def test_quick_example_runs_with_every_offered_adapter(tmp_path, adapter):
    """README offers --adapter ia3|road|oft|vera: each runs end to end (a few steps), c = 0 is
    the base model and one-batch generation equals one generate() per coefficient."""
    result = load_example().main(["--quick", "--adapter", adapter, "--steps", "3", "--out", str(tmp_path)])
    assert result["exact_zero"]
    assert result["generation_matches_separate_runs"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method", ["vmap", "modifier", "rows"])
def test_fsdp_example_gradients_equal_one_process(method):
    """examples/fsdp_contrastive.py --quick: a ±1 step under FSDP2 (2 processes) has one process's gradients."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import fsdp_contrastive

    result = fsdp_contrastive.main(["--quick", "--method", method])
    assert result["tensors"] > 0
    # float32 (the example's dtype): two processes sum their halves of the batch where one process sums it
    # all, so losses and gradients differ by float32 rounding, a few u32 = 6e-8 of their size; the gradient
    # error is measured norm-wise (‖Δg‖/‖g‖), which cancellation in single entries cannot inflate:
    # 1e-5 (~170 u32) for both, ~1000 times below a gradient with a missing or doubled shard
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-5)
    assert result["max_rel_grad_err"] < 1e-5


@pytest.mark.filterwarnings("ignore:.*performance drop because we have not yet implemented the batching:UserWarning")
def test_coefficient_fields_example(tmp_path):
    """examples/coefficient_fields.py --quick: the attribution's exact effects and gradients are
    finite and non-trivial, the learned vector keeps most of the effect at +v and −v, the
    population search's vmapped generation gives the loop's values, and the plot is written."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import coefficient_fields

    result = coefficient_fields.main(["--quick", "--out", str(tmp_path)])
    attribution = result["attribution"]
    assert attribution.groups == ("0", "1") and attribution.method == "vmap"
    for values in (attribution.off, attribution.on, attribution.grad_at_one, attribution.grad_at_zero):
        assert bool(values.isfinite().all()) and float(values.abs().max()) > 1e-3
    assert attribution.at_one > attribution.at_zero + 0.1, "the trained adapter must steer the held-out metric"
    assert all(0.5 < kept < 1.5 for kept in result["kept"]), result["kept"]
    assert 1 <= result["blocks_used"] <= 2
    timing = result["search"]["timing"]
    # vmapped vs looped sweep of the same float32 metric, whose values stay below 1 (~0.6): float32 rounding,
    # within cases.tolerance's float32 bound of 1e-5 of the values (measured: 0)
    assert timing["vectors"] == 8 and timing["max_abs_difference"] < 1e-5
    assert Path(result["plot"]).is_file()


@pytest.mark.filterwarnings("ignore")
def test_shared_prefill_example_equals_separate_generate_calls():
    """examples/shared_prefill.py --quick: one prefill at c = 0 shared by 5 strengths gives the tokens of 5
    separate generate() calls under after_prompt (left padding included), and the strengths differ."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import shared_prefill

    result = shared_prefill.main(["--quick", "--repeats", "1"])
    assert result["identical"] and result["strengths_differ"]


@pytest.mark.filterwarnings("ignore")
def test_token_attribution_example(tmp_path):
    """examples/token_attribution.py --quick: the gradient per position is non-zero on the prompts and zero
    where no scored prediction can depend on the coefficient (the continuation token, padding); the exact
    one-position effects are finite; the plot is written."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import token_attribution

    result = token_attribution.main(["--quick", "--steps", "3", "--out", str(tmp_path)])
    grad, off = result["grad"], result["off"]
    for i, k in enumerate(result["prompt_lengths"]):
        assert grad[i, :k].abs().max() > 0 and off[i, :k].abs().max() > 0, i
        assert grad[i, k:].abs().max() == 0 and off[i, k:].abs().max() == 0, i  # continuation and padding
    assert bool(off.isfinite().all()) and Path(result["plot"]).is_file()


def test_groups_benchmark_quick_runs():
    """benchmarks/groups.py --quick prints a ratio for every measure and variant (timings are
    reported by the benchmark, never asserted)."""
    sys.path.insert(0, str(EXAMPLE.parent.parent / "benchmarks"))
    import groups

    ratios = groups.main(["--quick", "--repeats", "1"])
    assert set(ratios) == {
        "extract+transform/scalar",
        'extract+transform/vector, groups="block"',
        "transform/scalar",
        'transform/vector, groups="block"',
        "transform/vector, precomputed groups",
        "forward/scalar",
        "forward/vector, precomputed groups",
        "forward+backward/scalar",
        "forward+backward/vector, precomputed groups",
    }
    assert all(r > 0 for r in ratios.values())


def test_overhead_benchmark_quick_runs(capsys):
    """benchmarks/overhead.py prints every column for each model, the slope and the stages of a call (the
    timings are reported, never asserted)."""
    bench = load_script("benchmarks/overhead.py", "overhead_benchmark")
    bench.main(["--blocks", "1", "2", "--repeats", "1", "--parts"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["layers", "PEFT", "ms", *bench.COLUMNS]
    assert [line.split()[0] for line in lines[2:5]] == ["4", "8", "slope"]
    assert all(len(line.split()) == 2 + len(bench.COLUMNS) for line in lines[2:4])
    header = next(i for i, line in enumerate(lines) if line.startswith("stages of call(c=-1)"))
    stages = lines[header + 1 :]
    assert len(stages) == 5, stages
    for line in stages:
        float(line.split()[-1])  # µs per layer, printed for each stage


def test_slider_step_benchmark_quick_runs():
    """benchmarks/slider_step.py times every step on both denoisers (the timings are reported, never asserted)."""
    bench = load_script("benchmarks/slider_step.py", "slider_step_benchmark")
    results = bench.main(["--batch", "2", "--repeats", "1", "--threads", "1"])
    assert list(results) == ["UNet2DModel (examples/sliders.py)", "SD3-style DiT"]
    assert all(list(r) == ["vmap", "vmap, unfolded", "coefficient batch"] for r in results.values())
    assert all(ms > 0 for r in results.values() for ms in r.values())


@pytest.mark.filterwarnings("ignore")
def test_sliders_example(tmp_path):
    """examples/sliders.py --quick (float64): the grid from one DDIMPipeline call at 5 strengths equals one
    call per strength (float64: rounding only, ~1e-16 of pixel values in [0, 1], amplified by a few
    denoising steps, far below 1e-10), the strengths act, and the figure is written."""
    sys.path.insert(0, str(EXAMPLE.parent))
    import sliders

    result = sliders.main(["--quick", "--dtype", "float64", "--out", str(tmp_path)])
    assert result["max_difference_one_call_vs_separate"] < 1e-10
    one = result["images"]["one"]
    assert (one[:, 0] - one[:, 2]).abs().max() > 1e-6  # −2 differs from 0
    assert Path(result["figure"]).is_file()
