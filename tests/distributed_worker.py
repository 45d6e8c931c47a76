"""One 2-process gloo run of every engine scenario of ``test_distributed.py``.

Each rank builds the same tiny model (same seed) and feeds it the same batch, so FSDP's and
DDP's averaged gradients equal one process's gradients on that batch. Each rank first computes
the one-process reference on an unwrapped copy, then wraps a copy in the engine and runs every
check; the outcome of each (scenario, check) is written as JSON by rank 0 (rank 1 writes its own
file too, and the test reads both).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

ADAPTERS = ("lora", "ia3", "dora", "oft")
ENGINES = (
    "fsdp2-layers",
    "fsdp2-root",
    "fsdp1-root",
    "fsdp1-layers",
    "ddp",
    "ddp-find-unused",
    "fsdp1-peft-policy",  # PEFT's fsdp_auto_wrap_policy: every trainable leaf (lora_A/B) its own unit: refused
    "fsdp2-leaves",  # fully_shard on each adapter leaf too: refused
)
CHECKS = (
    "call",
    "modifier",
    "two_pass",
    "vmap",
    "vmap_modifier",
    "per_row",
    "per_token",
    "shift_replace",
    "checkpointing",
)
TOL = {"rtol": 1e-4, "atol": 1e-5}


REFUSED = ("fsdp1-peft-policy", "fsdp2-leaves")
"""Layouts funcadapt refuses (adapter tensors in FSDP units of their own); run cold only: PEFT's own
DoRA forward already fails under them."""


def scenarios() -> list[tuple[str, str, bool]]:
    """(engine, adapter, warm-up forward before funcadapt) for every scenario the worker runs."""
    return [(e, a, w) for e in ENGINES for a in ADAPTERS for w in (False, True) if not (w and e in REFUSED)]


def _batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    from cases import inputs

    batch = inputs("llama", batch=2, seq=8)
    g = torch.Generator().manual_seed(7)
    pos = torch.randint(0, 64, (2, 8), generator=g)
    neg = torch.randint(0, 64, (2, 8), generator=g)
    return batch, pos, neg


def _model(adapter: str) -> torch.nn.Module:
    from cases import build, case

    model = build(case(adapter))
    model.train()  # checkpointing only recomputes in training mode; the tiny models have no dropout
    return model


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "").removeprefix("module.")


def _grads(model: torch.nn.Module, engine: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) gradients of the trainable parameters, by their one-process names."""
    out: dict[str, torch.Tensor] = {}
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, with_grads=True):
            for n, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    out[_clean(n)] = p.grad.detach().clone()
        return out
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad
            out[_clean(n)] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _zero(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _wrap(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    layers = model.base_model.model.model.layers
    if engine.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        if engine == "fsdp2-leaves":
            leaves = [m for m in model.modules() if not list(m.children()) and getattr(m, "weight", None) is not None]
            for leaf in leaves:
                if leaf.weight.requires_grad:
                    fully_shard(leaf)
        if engine in ("fsdp2-layers", "fsdp2-leaves"):
            for layer in layers:
                fully_shard(layer)
        fully_shard(model)
        return model
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy: Any = ModuleWrapPolicy({type(layers[0])}) if engine == "fsdp1-layers" else None
        if engine == "fsdp1-peft-policy":
            from peft.utils.other import fsdp_auto_wrap_policy

            policy = fsdp_auto_wrap_policy(model)
        return FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, find_unused_parameters=engine == "ddp-find-unused")


def _checks(
    model: torch.nn.Module, engine: str, ref_params: dict[str, torch.Tensor]
) -> dict[str, Callable[[], Any]]:
    """check name -> a function computing what is compared (outputs and/or full gradients).
    ``ref_params``: the one-process model's parameters by name (full tensors to give ``replace``)."""
    import funcadapt

    batch, pos, neg = _batch()

    def call() -> Any:
        with torch.no_grad():
            return funcadapt.call(model, funcadapt.transform(funcadapt.extract(model), -1.0), **batch).logits

    def modifier() -> Any:
        with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", -1.0):
            return model(**batch).logits

    def two_pass() -> Any:
        _zero(model)
        with funcadapt.AdapterModifier(model, "scale", 1.0):
            lp = model(**batch, labels=pos).loss
        with funcadapt.AdapterModifier(model, "scale", -1.0):
            ln = model(**batch, labels=neg).loss
        (lp + ln).backward()
        return {"loss": (lp + ln).detach(), **_grads(model, engine)}

    def vmap() -> Any:
        _zero(model)
        tree = funcadapt.extract(model)

        def loss(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return funcadapt.call(model, funcadapt.transform(tree, c), **batch, labels=labels).loss

        losses = funcadapt.vmap(loss)(torch.tensor([1.0, -1.0]), torch.stack([pos, neg]))
        losses.sum().backward()
        return {"loss": losses.detach(), **_grads(model, engine)}

    def vmap_modifier() -> Any:
        """vmap over a function that enters the context and calls the (wrapped) model itself."""
        _zero(model)

        def loss(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with funcadapt.AdapterModifier(model, "scale", c):
                return model(**batch, labels=labels).loss

        losses = funcadapt.vmap(loss)(torch.tensor([1.0, -1.0]), torch.stack([pos, neg]))
        losses.sum().backward()
        return {"loss": losses.detach(), **_grads(model, engine)}

    def per_row() -> Any:
        _zero(model)
        coeffs = funcadapt.per_row([1.0, -1.0], repeat=2)
        with funcadapt.AdapterModifier(model, "scale", coeffs):
            logits = model(**funcadapt.tile(batch, 2)).logits
        labels = torch.cat([pos, neg])
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, labels[:, 1:].reshape(-1))
        loss.backward()
        return {"logits": logits.detach(), **_grads(model, engine)}

    def per_token() -> Any:
        """A coefficient per token (positions read where the engine-wrapped model's forward starts)."""
        _zero(model)
        rows, length = batch["input_ids"].shape
        values = torch.linspace(-1.0, 1.5, rows * (length + 2)).reshape(rows, length + 2)
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_token(values)):
            out = model(**batch, labels=pos)
        out.loss.backward()
        return {"loss": out.loss.detach(), "logits": out.logits.detach(), **_grads(model, engine)}

    def shift_replace() -> Any:
        """op='shift' and op='replace' apply when each layer runs too, with gradients through the shift."""
        _zero(model)
        tree = funcadapt.extract(model)
        key = sorted(tree.params)[0]
        full = dict(ref_params)[_clean(key)].detach()
        # the no-grad forward first: FSDP2 (root unit) drops the gradients of a backward before it, plain PEFT too
        with torch.no_grad():
            replaced = funcadapt.call(model, funcadapt.transform(tree, {key: 0.5 * full}, op="replace"), **batch)
        with funcadapt.AdapterModifier(model, "shift", 0.05):
            loss = model(**batch, labels=pos).loss
        loss.backward()
        return {"loss": loss.detach(), "replaced": replaced.logits, **_grads(model, engine)}

    checks = {
        "call": call,
        "modifier": modifier,
        "two_pass": two_pass,
        "vmap": vmap,
        "vmap_modifier": vmap_modifier,
        "per_row": per_row,
        "per_token": per_token,
        "shift_replace": shift_replace,
    }
    return checks


def _enable_checkpointing(model: torch.nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _compare(got: Any, want: Any) -> str | None:
    if isinstance(want, str) or isinstance(got, str):  # an outcome ("refused") rather than tensors
        return None if isinstance(got, str) and got == want else f"got {str(got)[:200]}, one process {want}"
    if isinstance(want, dict):
        if set(got) != set(want):
            return f"gradients for {sorted(set(want) ^ set(got))[:3]} missing or extra"
        for k in want:
            err = _compare(got[k], want[k])
            if err:
                return f"{k}: {err}"
        return None
    try:
        torch.testing.assert_close(got, want, **TOL)
    except AssertionError as e:
        return str(e).splitlines()[-1] if str(e) else "differs"
    return None


def _run_scenario(engine: str, adapter: str, warm: bool) -> dict[str, str | None]:
    """check -> None (equal to one process) or the failure, for one scenario."""
    results: dict[str, str | None] = {}
    batch, _, _ = _batch()
    for checkpointing in (False, True):
        ref_model = _model(adapter)
        if checkpointing:
            _enable_checkpointing(ref_model)
        wrapped = _wrap(copy.deepcopy(ref_model), engine)
        ref_params = {_clean(n): p for n, p in ref_model.named_parameters()}
        refs = _checks(ref_model, "none", ref_params)
        gots = _checks(wrapped, engine, ref_params)
        if warm:
            with torch.no_grad():
                wrapped(**batch)
        names = ("two_pass",) if checkpointing else tuple(refs)
        for name in names:
            key = "checkpointing" if checkpointing else name
            try:
                want = refs[name]()
                got = gots[name]()
                results[key] = _compare(got, want)
            except Exception as e:  # reported, then the test fails with it
                results[key] = f"raised {type(e).__name__}: {str(e)[:400]}"
                if os.environ.get("FUNCADAPT_DIST_DEBUG"):
                    traceback.print_exc()
    return results


MODEL_ENGINES = ("ddp", "fsdp1-root", "fsdp2-root", "fsdp2-layers", "replicate", "replicate-fsdp")
MODEL_CHECKS = ("per_step_uncond", "per_image_grads", "opt_per_row", "xlnet_per_row_refused")
MODEL_CASES = [
    (engine, check)
    for engine in MODEL_ENGINES
    for check in MODEL_CHECKS
    if check == "xlnet_per_row_refused" or not engine.startswith("replicate")
]
"""Checks on other models than the matrix's Llama, where engine wrappers change what funcadapt reads of the
model: a diffusers UNet called with positional arguments; OPT, whose decoder layer is looked up by class, and
XLNet, whose model is (it runs sequence-first: per-row coefficients are refused), the looked-up module wrapped
in place by FSDP2 or torch's composable replicate (``replicate``, ``replicate_with_fsdp``) where the engine
allows it."""


def _denoiser() -> torch.nn.Module:
    from diffusion_cases import UNET_CONV, UNET_LINEAR, configs, randomize_adapters, tiny_unet

    unet = tiny_unet()
    unet.add_adapter(configs(UNET_LINEAR, UNET_CONV)["lora"]())
    randomize_adapters(unet, scale=0.1)
    return unet.double()


def _image_checks(denoiser: torch.nn.Module, engine: str) -> dict[str, Callable[[], Any]]:
    """A sampling loop of its own over a guidance batch, calling the denoiser as pipelines do but with the
    timestep and the text embeddings positional (which an engine wrapper's ``forward(*args, **kwargs)``
    does not name): a per-step schedule with an unconditional strength, and per-image slider gradients."""
    from diffusion_cases import HIDDEN, TOKENS

    import funcadapt

    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    uncond = torch.zeros_like(cond)

    def per_step_uncond() -> Any:
        schedule = funcadapt.per_step([[0.5, -1.0], [1.5, 2.0]], uncond=0.0)
        x = latents
        with torch.no_grad(), funcadapt.AdapterModifier(denoiser, "scale", schedule):
            for t in (torch.tensor(900.0), torch.tensor(500.0)):
                eps = denoiser(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
                eps_u, eps_c = eps.chunk(2)
                x = x - 0.1 * (eps_u + 3.0 * (eps_c - eps_u))
        return x

    def per_image_grads() -> Any:
        _zero(denoiser)
        with funcadapt.AdapterModifier(denoiser, "scale", funcadapt.per_image([1.0, -1.0])):
            eps = denoiser(latents, torch.tensor(700.0), cond).sample
        loss = (eps * torch.linspace(-1.0, 1.0, eps.numel(), dtype=eps.dtype).reshape(eps.shape)).sum()
        loss.backward()
        return {"loss": loss.detach(), **_grads(denoiser, engine)}

    return {"per_step_uncond": per_step_uncond, "per_image_grads": per_image_grads}


def _opt() -> torch.nn.Module:
    from architectures import ARCHS, cases
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(ARCHS["opt"].build(), config)
    cases.randomize_adapters(model, seed=1)
    return model.double().train()


def _opt_check(model: torch.nn.Module, engine: str) -> Callable[[], Any]:
    """Per-row coefficients reach OPT's fc1 and fc2, which its decoder layer runs on the batch flattened."""
    from architectures import batch

    import funcadapt

    def opt_per_row() -> Any:
        _zero(model)
        with funcadapt.AdapterModifier(model, "scale", funcadapt.per_row([1.0, -0.5, 2.0, 0.0])):
            logits = model(**funcadapt.tile(batch("opt"), 2)).logits
        loss = (logits * torch.linspace(-1.0, 1.0, logits.shape[-1], dtype=logits.dtype)).sum()
        loss.backward()
        return {"logits": logits.detach(), **_grads(model, engine)}

    return opt_per_row


def _xlnet() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import XLNetConfig, XLNetModel

    torch.manual_seed(0)
    config = XLNetConfig(vocab_size=32, d_model=16, n_layer=1, n_head=2, d_inner=32, dropout=0.0)
    model = get_peft_model(XLNetModel(config), LoraConfig(r=2, target_modules=["layer_1"], init_lora_weights=False))
    return model.double().eval()


def _xlnet_check(model: torch.nn.Module) -> Callable[[], Any]:
    """XLNet runs its layers sequence-first ([T, B, …]), so per-row coefficients are refused (with T == B they
    would otherwise be placed on tokens), also where an engine swapped in its own class for XLNetModel."""
    import funcadapt

    def xlnet_per_row_refused() -> Any:
        ids = torch.randint(0, 32, (3, 3), generator=torch.Generator().manual_seed(1))
        coeffs = funcadapt.per_row(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
        try:
            with torch.no_grad(), funcadapt.AdapterModifier(model, "scale", coeffs):
                out = model(input_ids=ids).last_hidden_state
        except ValueError as e:
            return "refused" if "sequence-first" in str(e) else f"raised {e}"
        return out.full_tensor() if hasattr(out, "full_tensor") else out

    return xlnet_per_row_refused


def _wrap_other(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    xlnet = type(getattr(model, "get_base_model", lambda: None)()).__name__ == "XLNetModel"
    if engine.startswith("replicate"):
        if engine == "replicate":
            from torch.distributed._composable import replicate
        else:
            from torch.distributed._composable.replicate_with_fsdp import replicate
        replicate(model.get_base_model())
        return model
    if engine.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        if engine == "fsdp2-layers":
            if xlnet:
                fully_shard(model.get_base_model())
            for module in model.modules():
                if type(module).__name__ in ("OPTDecoderLayer", "Transformer2DModel", "ResnetBlock2D"):
                    fully_shard(module)
        fully_shard(model)
        return model
    if engine == "fsdp1-root":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


def _run_models() -> dict[str, dict[str, str | None]]:
    """engine -> check -> None (equal to one process) or the failure, for :data:`MODEL_CASES`."""
    out: dict[str, dict[str, str | None]] = {}
    for engine in MODEL_ENGINES:
        checks = [check for e, check in MODEL_CASES if e == engine]
        refs: dict[str, Callable[[], Any]] = {}
        gots: dict[str, Callable[[], Any]] = {}
        if "per_image_grads" in checks:
            reference = _denoiser()
            refs.update(_image_checks(reference, "none"))
            gots.update(_image_checks(_wrap_other(copy.deepcopy(reference), engine), engine))
        if "opt_per_row" in checks:
            opt = _opt()
            refs["opt_per_row"] = _opt_check(opt, "none")
            gots["opt_per_row"] = _opt_check(_wrap_other(copy.deepcopy(opt), engine), engine)
        xlnet = _xlnet()
        refs["xlnet_per_row_refused"] = _xlnet_check(xlnet)
        gots["xlnet_per_row_refused"] = _xlnet_check(_wrap_other(copy.deepcopy(xlnet), engine))
        results: dict[str, str | None] = {}
        for name in checks:
            try:
                results[name] = _compare(gots[name](), refs[name]())
            except Exception as e:
                results[name] = f"raised {type(e).__name__}: {str(e)[:400]}"
                if os.environ.get("FUNCADAPT_DIST_DEBUG"):
                    traceback.print_exc()
        out[engine] = results
        dist.barrier()
    return out


def main(rank: int, world: int, port: int, out_dir: str, only: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results: dict[str, dict[str, str | None]] = {}
    try:
        if only == "models":
            results = _run_models()
            return
        for engine, adapter, warm in scenarios():
            if only and only not in f"{engine}-{adapter}":
                continue
            results[f"{engine}/{adapter}/{'warm' if warm else 'cold'}"] = _run_scenario(engine, adapter, warm)
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def run(out_dir: str, only: str | None = None, timeout: float = 400.0) -> dict[int, dict[str, dict[str, str | None]]]:
    """Spawn the two ranks, wait (at most ``timeout`` s), and return each rank's results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        main, args=(2, port, out_dir, only), nprocs=2, join=False, start_method="spawn"
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not ctx.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the distributed run did not finish in {timeout} s")
    out = {}
    for rank in (0, 1):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            out[rank] = json.load(f)
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = run(d, sys.argv[1] if len(sys.argv) > 1 else None)
        for name, checks in res[0].items():
            bad = {k: v for k, v in checks.items() if v}
            print(f"{name:32s} {bad or 'ok'}")
