"""funcadapt.export and funcadapt.merge: a coefficient deployed as a plain PEFT adapter, or merged.

Every rule × every transform (scale in linear and geometric mode, invert): where the effect is a set of
adapter tensors, a fresh base + PEFT's own ``PeftModel.from_pretrained`` on the exported directory, and
the merged base model, give funcadapt's logits (float64); where it acts while the layer runs, both refuse
with the reason. References: PEFT's loader and PEFT's merge, nothing from funcadapt.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cases
import pytest
import torch
from cases import CASES, TOL64, assert_unchanged, build, case, inputs, output, snapshot, tolerance
from cases_special import with_default_task_ids
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import funcadapt
from funcadapt.rules.base import rule_named

pytestmark = pytest.mark.filterwarnings("ignore")

TRANSFORMS = [
    ("scale", 0.4, "linear"),
    ("scale", -1.0, "linear"),
    ("scale", 0.4, "geometric"),
    ("invert", None, "linear"),
]
LLAMA_CASES = [c for c in CASES if "llama" in c.archs]

FORWARD_TIME = "acts while the layer runs"


RELOADED = {"poly": with_default_task_ids}
"""What the test model got beside its adapter, given to the reloaded model too (Poly's default task ids)."""


def base_of(c, model: torch.nn.Module) -> torch.nn.Module:
    """The model's base with its adapters removed, as PEFT leaves it (a copy: some initialisations change
    the base weights), or where PEFT cannot unload (adaption prompt) the base built again as cases.build does."""
    if callable(getattr(model.base_model, "unload", None)):
        return copy.deepcopy(model).unload()
    torch.manual_seed(0)
    return cases.float64(cases.ARCHS["llama"]())


def peft_merge_error(model: torch.nn.Module) -> str | None:
    """What PEFT's own merge_and_unload raises on the unmodified model (None: it merges)."""
    try:
        copy.deepcopy(model).merge_and_unload()
    except (ValueError, RuntimeError, AttributeError) as e:
        return str(e)
    return None


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return output(model(**batch))


@functools.cache
def built(case_id: str) -> torch.nn.Module:
    """The case's float64 model, built once per worker: every cell checks it is left unchanged."""
    return build(case(case_id), dtype=torch.float64)


@pytest.mark.parametrize("how", TRANSFORMS, ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
@pytest.mark.parametrize("c", LLAMA_CASES, ids=lambda c: c.id)
def test_export_and_merge_give_funcadapts_logits(c, how, tmp_path):
    op, coeff, mode = how
    model = built(c.id)
    batch = inputs(batch=2)
    tree = funcadapt.extract(model)
    before = snapshot(model)
    reason = rule_named(c.rule).not_deployable
    if reason:
        for deploy in (
            lambda: funcadapt.export(model, coeff, tmp_path / "out", op=op, mode=mode),
            lambda: funcadapt.merge(model, coeff, op=op, mode=mode),
        ):
            with pytest.raises(ValueError, match=re.escape(reason)):
                deploy()
        assert not (tmp_path / "out").exists()
        return
    try:
        params = funcadapt.transform(tree, coeff, op, mode)
    except ValueError as refused:  # the transform itself is undefined here: export and merge say the same
        with pytest.raises(ValueError, match=re.escape(str(refused)[:60])):
            funcadapt.export(model, coeff, tmp_path / "out", op=op, mode=mode)
        return
    with torch.no_grad():
        want = output(funcadapt.call(model, params, **batch))
    if any(e.ops for e in params.effects):
        for deploy in (
            lambda: funcadapt.export(model, coeff, tmp_path / "out", op=op, mode=mode),
            lambda: funcadapt.merge(model, coeff, op=op, mode=mode),
        ):
            with pytest.raises(ValueError, match=FORWARD_TIME):
                deploy()
        assert not (tmp_path / "out").exists()
        assert_unchanged(model, before)
        return
    path = funcadapt.export(model, coeff, tmp_path / "out", op=op, mode=mode)
    assert_unchanged(model, before)
    loaded = PeftModel.from_pretrained(base_of(c, model), str(path)).eval()
    loaded = RELOADED.get(c.id, lambda m: m)(loaded)
    torch.testing.assert_close(logits(loaded, batch), want, **tolerance(want, c))
    peft_cannot = peft_merge_error(model)
    if peft_cannot is not None:  # PEFT's own merge refuses this adapter (lora_bias on a bias-free layer, ...)
        with pytest.raises((ValueError, RuntimeError)) as info:
            funcadapt.merge(model, coeff, op=op, mode=mode)
        assert "PEFT has no merge" in str(info.value) or str(info.value) == peft_cannot
        assert_unchanged(model, before)
        return
    merged = RELOADED.get(c.id, lambda m: m)(funcadapt.merge(model, coeff, op=op, mode=mode))
    assert_unchanged(model, before)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), want, **tolerance(want, c))


def two_adapter_model() -> torch.nn.Module:
    model = build(case("lora"), dtype=torch.float64)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]))
    model.base_model.set_adapter(["default", "other"])  # (before randomizing: PEFT freezes inactive adapters)
    cases.randomize_adapters(model, seed=5)
    model.eval()
    batch = inputs(batch=2)
    with torch.no_grad(), funcadapt.AdapterModifier(model, "disable", adapter_names="other"):
        without_other = output(model(**batch))
    assert (logits(model, batch) - without_other).abs().max() > 1e-3, "the second adapter must act"
    return model


def test_several_adapters_with_a_coefficient_each(tmp_path):
    """A dict of coefficients: PEFT's layout (default at the top, other in its subfolder), both loaded and
    active in plain PEFT give funcadapt's logits; merge folds both."""
    model = two_adapter_model()
    batch = inputs(batch=2)
    coeff = {"default": 0.5, "other": -1.5}
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), coeff), **batch))
    path = funcadapt.export(model, coeff, tmp_path / "both")
    assert (path / "adapter_config.json").is_file() and (path / "other" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(base_of(case("lora"), model), str(path))
    loaded.load_adapter(str(path / "other"), adapter_name="other")
    loaded.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(loaded.eval(), batch), want, **TOL64)
    torch.testing.assert_close(logits(funcadapt.merge(model, coeff), batch), want, **TOL64)


def test_merge_keeps_adapters_left_out_at_one():
    """adapter_names leaves the other active adapter as it is (c = 1) in funcadapt's forward; the merged
    model has it merged as it is."""
    model = two_adapter_model()
    batch = inputs(batch=2)
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model, "default"), -1.0), **batch))
    torch.testing.assert_close(logits(funcadapt.merge(model, -1.0, adapter_names="default"), batch), want, **TOL64)


def test_groups_export_each_layer_at_its_groups_coefficient(tmp_path):
    model = build(case("ia3"), dtype=torch.float64)
    batch = inputs(batch=2)
    tree = funcadapt.extract(model)
    groups = funcadapt.layer_groups(tree, "block")
    vector = torch.linspace(-1.0, 2.0, len(groups), dtype=torch.float64)
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(tree, vector, groups=groups), **batch))
    path = funcadapt.export(model, vector, tmp_path / "grouped", groups=groups)
    loaded = PeftModel.from_pretrained(base_of(case("ia3"), model), str(path)).eval()
    torch.testing.assert_close(logits(loaded, batch), want, **TOL64)
    torch.testing.assert_close(logits(funcadapt.merge(model, vector, groups=groups), batch), want, **TOL64)


RELOAD_WITHOUT_FUNCADAPT = """
import sys
sys.modules["funcadapt"] = None  # any import of funcadapt fails
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float64)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[4])
assert "funcadapt" not in sys.modules or sys.modules["funcadapt"] is None
"""


def test_the_exported_directory_loads_without_funcadapt(tmp_path):
    """PEFT's own loader in a process where funcadapt cannot be imported: the logits of funcadapt's call."""
    torch.manual_seed(0)
    base = cases.tiny_llama().double()
    base.set_attn_implementation("sdpa")  # (eager takes its softmax in float32; the reloading process uses sdpa)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), -0.5), input_ids=ids).logits
    funcadapt.export(model, -0.5, tmp_path / "adapter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_WITHOUT_FUNCADAPT,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, **TOL64)
    config_written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_written["peft_type"] == "LORA"


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    model = build(case("lora"), dtype=torch.float64)
    before = snapshot(model)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        funcadapt.export(model, 0.5, taken)
    assert (taken / "file.txt").read_text() == "mine"
    for bad, match in (
        (float("nan"), "not finite"),
        (torch.tensor(float("inf")), "not finite"),
        (funcadapt.per_row([1.0, -1.0]), "per-row coefficients"),
        (funcadapt.per_token(torch.ones(2, 8)), "per-token coefficients"),
        ({"default": funcadapt.per_row([1.0])}, "per-row coefficients"),
    ):
        with pytest.raises(ValueError, match=match):
            funcadapt.export(model, bad, tmp_path / "new")
        with pytest.raises(ValueError, match=match):
            funcadapt.merge(model, bad)
    with pytest.raises(TypeError, match="takes a PeftModel"):
        funcadapt.export(model.base_model.model, 0.5, tmp_path / "new")

    # a failure while writing leaves nothing behind: no target, no staging directory
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        funcadapt.export(model, 0.5, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert_unchanged(model, before)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    assert funcadapt.export(model, 0.5, empty) == empty and (empty / "adapter_config.json").is_file()


def test_deploy_benchmark_quick(tmp_path):
    """benchmarks/deploy.py --quick: every exported strength, reloaded with plain PEFT, generates
    funcadapt's tokens; the merged model's logits are funcadapt's at 0.5 to float32 rounding and its tokens
    equal (timings are printed, never asserted)."""
    from scripts import load_script

    bench = load_script("benchmarks/deploy.py", "deploy_benchmark")
    result = bench.main(["--quick", "--out", str(tmp_path / "deploy"), "--repeats", "1"])
    assert result["export_matches"] == dict.fromkeys(bench.COEFFS, True)
    assert result["merge_tokens_match"] and result["merge_max_diff"] < 1e-4
    written = json.loads((tmp_path / "deploy" / "tokens.json").read_text())
    assert set(written["tokens"]) == {f"{c:+g}" for c in bench.COEFFS}
    assert (tmp_path / "deploy" / "base" / "model.safetensors").is_file()


def test_export_with_adapter_names_keeps_the_other_active_adapters(tmp_path):
    """Adapters left out of adapter_names act at c = 1 in funcadapt's forward: the export carries them as
    they are (found in review: it dropped them)."""
    model = two_adapter_model()
    batch = inputs(batch=2)
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model, "default"), -1.0), **batch))
    path = funcadapt.export(model, -1.0, tmp_path / "a", adapter_names="default")
    loaded = PeftModel.from_pretrained(base_of(case("lora"), model), str(path))
    loaded.load_adapter(str(path / "other"), adapter_name="other")
    loaded.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(loaded.eval(), batch), want, **TOL64)


@pytest.mark.parametrize("case_id", ["vblora", "unilora", "tinylora-tied", "lily"])
def test_shift_of_tensors_layers_share_exports_under_every_name(case_id, tmp_path):
    """A tensor several layers share (a vector bank, Lily's A) is saved by PEFT under a name other than the
    one funcadapt extracts it by: the export substitutes tensors by identity (found in review: the file
    held the unshifted tensor)."""
    model = built(case_id)
    batch = inputs(batch=2)
    with torch.no_grad():
        want = output(funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), 0.05, "shift"), **batch))
    path = funcadapt.export(model, 0.05, tmp_path / "shifted", op="shift")
    loaded = PeftModel.from_pretrained(base_of(case(case_id), model), str(path)).eval()
    torch.testing.assert_close(logits(loaded, batch), want, **TOL64)


def test_export_refuses_a_scaling_changed_at_run_time(tmp_path):
    from peft.helpers import rescale_adapter_scale

    model = built("lora")
    with rescale_adapter_scale(model, 0.5), pytest.raises(ValueError, match=r"its LoRA scaling is .* not the"):
        funcadapt.export(model, 1.0, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_export_refuses_an_initialisation_that_changed_the_base(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        cases.ARCHS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    with pytest.raises(ValueError, match="init_lora_weights='pissa', which changed the base"):
        funcadapt.export(model, 0.5, tmp_path / "a")


def test_merge_refuses_tied_embeddings_and_non_commuting_stacks():
    torch.manual_seed(0)
    base = cases.ARCHS["llama"]()
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    tied = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    before = snapshot(tied)
    with pytest.raises(ValueError, match="tied to"):
        funcadapt.merge(tied, 0.4)
    assert_unchanged(tied, before)
    torch.manual_seed(0)
    from peft import OFTConfig

    stacked = get_peft_model(cases.ARCHS["llama"](), OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]))
    stacked.add_adapter("other", OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]))
    stacked.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="do not commute"):
        funcadapt.merge(stacked, 0.4, mode="geometric")


def test_export_leaves_the_models_configs_as_they_were(tmp_path):
    """PEFT's state-dict function rewrites an AdaLoRA config's rank_pattern in place (after rank
    allocation); export hands it a copy."""
    from peft import AdaLoraConfig

    torch.manual_seed(0)
    model = get_peft_model(
        cases.ARCHS["llama"](),
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"]),
    )
    batch = inputs(batch=2)
    model.train()
    for step in range(11):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.eval()
    assert model.peft_config["default"].rank_pattern
    before = copy.deepcopy(model.peft_config["default"])
    funcadapt.export(model, 0.4, tmp_path / "a")
    assert model.peft_config["default"] == before
