"""Engines that place weights just in time, and threads: funcadapt is exact under each, or refuses
with an error that names the engine and the setting (issue 9).

* FSDP2 (``fully_shard`` per decoder layer + root, root only), FSDP1 (``use_orig_params=True``,
  root only and decoder-layer auto-wrap), DDP: 2 CPU processes over gloo, one run of
  ``distributed_worker.py`` for all of them; every check compares against one process.
* accelerate ``cpu_offload``, ``disk_offload`` and a ``device_map`` that offloads a block to disk.
* Threads: one model per thread is exact; one model used from two threads at once is refused.
* DeepSpeed ZeRO-3 partitioned parameters are refused.
"""

from __future__ import annotations

import copy
import threading

import distributed_worker as dw
import pytest
import torch
from cases import (
    CASES,
    assert_unchanged,
    build,
    case,
    inputs,
    output,
    per_token_reference,
    reference_interpolation,
    snapshot,
)

import funcadapt
from funcadapt import AdapterModifier

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(FSDP|fully_shard|FullyShardedDataParallel|use_orig_params|gradient checkpointing|offload).*"
)

# ----------------------------------------------------------------------------------------
# distributed: one 2-process run, then one test per (scenario, check)

FSDP1_VMAP = "cannot run under torch.func transforms"
DDP_VMAP = "find_unused_parameters=True"


OWN_UNIT = "is in an FSDP unit of its own"


def expected_error(engine: str, adapter: str, check: str) -> str | None:
    """The refusal a check must raise, or None where it must equal one process. Under the
    per-leaf layouts, IA3's vectors (a ParameterDict, no leaf with a ``weight``) stay in their
    block's unit, so IA3 is exact there like under the block layouts."""
    if engine in dw.REFUSED and adapter != "ia3":
        return OWN_UNIT
    if check in ("vmap", "vmap_modifier") and engine.startswith("fsdp1"):
        return FSDP1_VMAP
    if check in ("vmap", "vmap_modifier") and engine == "ddp-find-unused":
        return DDP_VMAP
    return None


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return dw.run(str(tmp_path_factory.mktemp("dist")))


@pytest.mark.parametrize("check", dw.CHECKS)
@pytest.mark.parametrize(("engine", "adapter", "warm"), dw.scenarios(), ids=lambda v: str(v))
def test_distributed_equals_one_process(distributed, engine, adapter, warm, check):
    name = f"{engine}/{adapter}/{'warm' if warm else 'cold'}"
    for rank in (0, 1):
        result = distributed[rank][name][check]
        want = expected_error(engine, adapter, check)
        if want is None:
            assert result is None, f"rank {rank}: {result}"
        else:
            message = f"rank {rank}: expected a refusal naming {want!r}, got {result}"
            assert result is not None and want in result, message


@pytest.fixture(scope="module")
def distributed_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return dw.run(str(tmp_path_factory.mktemp("dist_models")), "models")


@pytest.mark.parametrize(("engine", "check"), dw.MODEL_CASES)
def test_engine_wrappers_are_transparent_to_what_funcadapt_reads(distributed_models, engine, check):
    """A denoiser called with its timestep and text embeddings positional under DDP and FSDP1 (whose
    forward(*args, **kwargs) names neither: they are read where the wrapped module's forward starts), the
    classes torch.distributed swaps in (FSDPUNet2DConditionModel is UNet2DConditionModel for the unconditional
    half's order, FSDPOPTDecoderLayer is OPT's decoder layer for its flattened fc1/fc2, FSDP-, DDP- and
    ReplicateXLNetModel are XLNetModel, which runs sequence-first): equal to one process, refusals included."""
    for rank in (0, 1):
        result = distributed_models[rank][engine][check]
        assert result is None, f"rank {rank}: {result}"


# ----------------------------------------------------------------------------------------
# accelerate offload


def _lora_model():
    return build(case("lora"))


def _logits(model, params=None, **batch):
    batch = batch or inputs()
    with torch.no_grad():
        return output(funcadapt.call(model, params, **batch) if params is not None else model(**batch))


def _offloaded(model, how: str, tmp_path):
    from accelerate import cpu_offload, disk_offload, dispatch_model

    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return disk_offload(model, offload_dir=str(tmp_path), execution_device="cpu")
    inner = "base_model.model.model"
    device_map = {
        f"{inner}.embed_tokens": "cpu",
        f"{inner}.layers.0": "cpu",
        f"{inner}.layers.1": "disk",
        f"{inner}.norm": "cpu",
        f"{inner}.rotary_emb": "cpu",
        "base_model.model.lm_head": "cpu",
    }
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))


OFFLOADS = ["cpu_offload", "disk_offload", "device_map"]


def assert_unchanged_offloaded(model, before, plain, forward=None):
    """Unchanged as far as a plain forward leaves an offloaded model: accelerate itself puts a new
    meta Parameter back after every forward, so the identity of meta parameters is not compared;
    everything else is, and ``forward(model)`` (a plain forward by default) still gives ``plain``."""
    after = snapshot(model)
    meta = {k for k, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
    assert meta, "nothing is offloaded"
    for k in meta & after["ids"].keys():  # (snapshot leaves out what PEFT re-registers itself)
        before["ids"][k] = after["ids"][k]
    for key in ("ids", "buffer_ids", "grad", "training", "dicts", "classes"):
        assert after[key] == before[key], f"{key} changed"
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.device == w.device and v.dtype == w.dtype and v.shape == w.shape, k
        assert v.device.type == "meta" or torch.equal(v, w), f"{k} changed"
    torch.testing.assert_close((forward or _logits)(model), plain, rtol=0, atol=0)


PEFT_FAILS_OFFLOADED = ["ia3", "dora", "road_1", "boft"]
"""Adapters whose plain PEFT forward fails under accelerate offload (a sample; the survey is in the
docstring of test_offload_exact)."""


@pytest.mark.parametrize("how", OFFLOADS)
@pytest.mark.parametrize("adapter", PEFT_FAILS_OFFLOADED)
def test_peft_fails_under_offload_by_itself(adapter, how, tmp_path):
    """Documents why funcadapt loads an offloaded adapter layer's tensors itself: accelerate loads a
    module's tensors in that module's own forward, and PEFT reads its ParameterDicts (IA3, VeRA,
    RoAd, ...) or its base weight (DoRA) without calling one, so plain PEFT (no funcadapt) meets
    tensors on the meta device. When this test fails, PEFT or accelerate changed that."""
    model = _offloaded(build(case(adapter)), how, tmp_path)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        _logits(model)


def test_peft_is_silently_wrong_under_offload_by_itself(tmp_path):
    """Worse than an error: HRA's plain PEFT forward under cpu_offload reads the base weight off the
    meta device and returns numbers far from the model's. Under funcadapt it is exact, even at c = 1."""
    reference = build(case("hra"))
    model = _offloaded(copy.deepcopy(reference), "cpu_offload", tmp_path)
    assert not torch.allclose(_logits(model), _logits(reference), atol=1e-2)
    tree = funcadapt.extract(model)
    torch.testing.assert_close(_logits(model, funcadapt.transform(tree, 1.0)), _logits(reference), rtol=1e-5, atol=1e-6)


def _offload_cases() -> list[object]:
    """Every case on the tiny Llama under cpu_offload; a few families under every offload layout."""
    llama = [c.id for c in CASES if "llama" in c.archs]
    out = [pytest.param("cpu_offload", cid, id=f"cpu_offload-{cid}") for cid in llama]
    for how in OFFLOADS[1:]:
        out += [pytest.param(how, cid, id=f"{how}-{cid}") for cid in ("lora", "ia3", "oft", "hra", "road_1")]
    return out


@pytest.mark.parametrize(("how", "adapter"), _offload_cases())
def test_offload_exact(how, adapter, tmp_path):
    """Under accelerate offload every rule is exact against the independent per-layer reference on the
    model before offloading (linear mode at c = −1 and 0.5, a number and a 0-d tensor), c = 1 is PEFT's
    forward of that model, and the offloaded model is left as a plain forward leaves it. Plain PEFT under
    offload fails for many families and is silently wrong for others (HRA, HiRA, GLoRA, SuperTuning,
    Lily, DEFT, VB-LoRA read tensors whose module's forward, which would load them, never runs); funcadapt
    loads every tensor of an adapter layer's subtree when that layer runs."""
    reference = build(case(adapter))
    model = _offloaded(copy.deepcopy(reference), how, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded"
    tree = funcadapt.extract(model)
    assert funcadapt.structure.structure(model).engine.startswith("accelerate offload")
    before = snapshot(model)
    torch.testing.assert_close(_logits(model, funcadapt.transform(tree, 1.0)), _logits(reference), rtol=0, atol=0)
    for c in (-1.0, 0.5):
        with torch.no_grad(), reference_interpolation(reference, c):
            want = output(reference(**inputs()))
        for coeff in (c, torch.tensor(c)):
            got = _logits(model, funcadapt.transform(tree, coeff))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, c=coeff: f"c={c!r}: {m}")
        with torch.no_grad(), AdapterModifier(model, "scale", c):
            torch.testing.assert_close(output(model(**inputs())), want, rtol=1e-5, atol=1e-6)
    at_one = _logits(reference)  # plain PEFT under offload is wrong for some families: compare funcadapt's c = 1

    def forward(m):
        return _logits(m, funcadapt.transform(tree, 1.0))

    assert_unchanged_offloaded(model, before, at_one, forward)


@pytest.mark.parametrize("how", OFFLOADS)
def test_offload_generate_per_row(how, tmp_path):
    reference = _lora_model()
    model = _offloaded(copy.deepcopy(reference), how, tmp_path)
    ids = inputs(batch=2, seq=5)["input_ids"]
    coeffs = [-1.0, 0.0, 1.0]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with AdapterModifier(model, "scale", funcadapt.per_row(coeffs, repeat=2)):
            batched = model.generate(input_ids=funcadapt.tile(ids, 3), **settings)
        for k, c in enumerate(coeffs):
            with AdapterModifier(reference, "scale", c):
                alone = reference.generate(input_ids=ids, **settings)
            assert torch.equal(batched[2 * k : 2 * k + 2], alone), f"c = {c}"


@pytest.mark.parametrize("adapter", ["lora", "dora", "hra"])
@pytest.mark.parametrize("how", OFFLOADS)
def test_offload_per_token_exact(how, adapter, tmp_path):
    """Per-token coefficients under accelerate offload equal the token-by-token reference on the model before
    offloading (the positions are read where accelerate's hooked forward starts)."""
    reference = build(case(adapter))
    model = _offloaded(copy.deepcopy(reference), how, tmp_path)
    batch = inputs(batch=2, seq=6)
    values = torch.linspace(-1.0, 1.5, 16).reshape(2, 8)
    with torch.no_grad():
        with reference_interpolation(reference, per_token_reference(values)):
            want = output(reference(**batch))
        with AdapterModifier(model, "scale", funcadapt.per_token(values)):
            got = output(model(**batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", OFFLOADS)
def test_offload_shift_and_replace_exact_plain_dict_refused(how, tmp_path):
    """shift and replace apply when each layer runs, to the weights accelerate just loaded; a plain
    {key: tensor} dict (swapped in at the root, where the hook would override it) is refused."""
    reference = _lora_model()
    model = _offloaded(copy.deepcopy(reference), how, tmp_path)
    tree, offloaded_tree = funcadapt.extract(reference), funcadapt.extract(model)
    key = next(k for k in tree.params if ".lora_B." in k)
    new = torch.randn(tree.params[key].shape)
    for op, value in (("shift", 0.1), ("shift", {key: new}), ("replace", {key: new})):
        want = _logits(reference, funcadapt.transform(tree, value, op=op))
        got = _logits(model, funcadapt.transform(offloaded_tree, value, op=op))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"accelerate offload.*op='replace'"):
        funcadapt.call(model, {key: torch.zeros(new.shape, device="meta")}, **inputs())


# ----------------------------------------------------------------------------------------
# threads


def test_one_model_per_thread_is_exact():
    models = [_lora_model() for _ in range(2)]
    befores = [snapshot(m) for m in models]
    batch = inputs()
    wants = {c: _logits(models[0], funcadapt.transform(funcadapt.extract(models[0]), c)) for c in (-1.0, 0.5)}
    errors: list[BaseException] = []
    wrong: list[str] = []
    start = threading.Barrier(2)

    def work(model):
        try:
            tree = funcadapt.extract(model)
            start.wait()
            for i in range(60):
                c = (-1.0, 0.5)[i % 2]
                if i % 3:
                    got = _logits(model, funcadapt.transform(tree, c), **batch)
                else:
                    with torch.no_grad(), AdapterModifier(model, "scale", c):
                        got = output(model(**batch))
                if not torch.allclose(got, wants[c], rtol=1e-5, atol=1e-6):
                    wrong.append(f"call {i} at c = {c}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    for model, before in zip(models, befores, strict=True):
        assert_unchanged(model, before)
        assert not funcadapt.swap.active_frames()


@pytest.mark.parametrize("case_id", ["lora", "dora"])  # DoRA: an effect at forward time, no tensor recomputed
def test_same_model_from_two_threads_is_refused_not_corrupted(case_id):
    model = build(case(case_id))
    before = snapshot(model)
    plain = _logits(model)
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, BaseException | torch.Tensor] = {}

    def holder():
        with torch.no_grad(), AdapterModifier(model, "scale", -1.0):
            entered.set()
            release.wait(30)
            seen["holder"] = output(model(**inputs()))

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            _logits(model)  # a plain forward would see the other thread's coefficient
        with pytest.raises(RuntimeError, match="another thread"), torch.no_grad():
            model.generate(**inputs(), max_new_tokens=2, do_sample=False, pad_token_id=0)  # bypasses the root
        with pytest.raises(RuntimeError, match="another thread"), AdapterModifier(model, "scale", 2.0):
            pytest.fail("must not enter")
        with pytest.raises(RuntimeError, match="another thread"):
            _logits(model, funcadapt.transform(funcadapt.extract(model), 0.5))
    finally:
        release.set()
        t.join()
    want = _logits(model, funcadapt.transform(funcadapt.extract(model), -1.0))
    torch.testing.assert_close(seen["holder"], want, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), plain, rtol=0, atol=0)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3


def test_zero3_partitioned_parameters_refused():
    """ZeRO-3 marks its partitioned parameters with ``ds_id`` (DeepSpeed is not installed here; the
    detection is what is tested)."""
    model = _lora_model()
    next(p for k, p in model.named_parameters() if ".lora_A." in k).ds_id = 0
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3.*FSDP2"):
        funcadapt.extract(model)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"), AdapterModifier(model, "scale", -1.0):
        pytest.fail("must not enter")


def test_accelerate_hook_on_a_layer_with_its_own_forward_runs_inside_it():
    """A rule that runs its own forward for a layer (C3A; OFT and PSOFT do it for their rotation
    modules) installs it inside an accelerate hook placed on that very layer (``_old_forward``),
    so the hook still runs, and the result is the independent reference's."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = build(case("c3a"))
    tree = funcadapt.extract(model)
    path = tree.layers[0].path
    with torch.no_grad(), reference_interpolation(model, -1.0):
        want = output(model(**inputs()))
    add_hook_to_module(model.get_submodule(path), Counting())
    before = snapshot(model)
    got = _logits(model, funcadapt.transform(tree, -1.0))
    assert Counting.calls == 1, "the layer's accelerate hook did not run"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not funcadapt.swap.active_frames()
    assert_unchanged(model, before)


def test_ddp_vmap_refusal_names_each_option():
    """The DDP refusal names the option actually set (static_graph as well as find_unused_parameters);
    without either, DDP runs under vmap and nothing is refused (the distributed run checks both paths)."""
    from funcadapt import engines

    class DistributedDataParallel:  # the name is what is checked, as for torch's class
        def __init__(self, **options: bool) -> None:
            self.__dict__.update(options)

    assert engines.ddp_vmap_error(DistributedDataParallel()) is None
    error = engines.ddp_vmap_error(DistributedDataParallel(static_graph=True))
    assert error is not None and "static_graph=True" in str(error) and "per_row" in str(error)
    error = engines.ddp_vmap_error(DistributedDataParallel(find_unused_parameters=True, static_graph=True))
    assert error is not None and "find_unused_parameters=True and static_graph=True" in str(error)


def test_the_accelerate_fsdp_config_the_docs_name_exists_and_shards_decoder_layers():
    """docs/distributed.md launches with examples/fsdp.yaml: it exists, accelerate's own loader reads
    it as an FSDP2 config that wraps whole decoder layers (a class transformers has), not PEFT's
    fsdp_auto_wrap_policy (adapter weights in units of their own, which funcadapt refuses). accelerate
    does not shard on the CPU, so launching it is a GPU check, not run here."""
    from pathlib import Path

    import transformers.models.llama.modeling_llama
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1]
    assert "--config_file examples/fsdp.yaml" in (root / "docs" / "distributed.md").read_text()
    config = load_config_from_file(str(root / "examples" / "fsdp.yaml"))
    assert str(config.distributed_type).endswith("FSDP")
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert hasattr(transformers.models.llama.modeling_llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])
