"""Frames: make patches (and tensors given outright) visible on a live model, then restore it.

A :class:`Frame` holds attribute patches (a layer's ``forward``: the just-in-time effects
and the output interpolation of :mod:`funcadapt.call`; a helper method) and, for tensors
given outright, what ``torch.func.functional_call`` does internally (swap them into
``_parameters`` / ``_buffers``, run, swap back). It is re-enterable: the exact same
patches can be applied again later. That is what gradient checkpointing needs. Its
recompute runs during ``backward()``, after the call or context has exited; a plain
functional_call then recomputes with the restored parameters and gives silently wrong
gradients. While a frame is applied, every checkpointing layer's
``_gradient_checkpointing_func`` is wrapped so that its (non-reentrant) checkpoint
gets a ``context_fn`` whose recompute context re-applies the frames that were active
when the forward ran, and only those.

Threads: each thread has its own stack of frames, exited in reverse order. A frame
belongs to the thread that applied it: while it is applied, another thread that applies
a frame touching the same modules, or runs a forward through a module the frame
patched, gets a ``RuntimeError`` instead of seeing (or undoing) this thread's patches.
So one model per thread is exact, and one model shared by threads is refused while a
frame is applied, never silently wrong. Checkpoint recomputation (which may run on an
autograd worker thread) replays the frames of the thread that ran the forward. The check
in a patched forward compares per-thread objects (:class:`Thread`, read from a
thread-local), which torch.compile traces and guards on: a compiled model keeps it
without a graph break, and another thread's call is traced again there and refused.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .engines import forward_attr
from .rules.base import Patch, under_transforms

_MISSING = object()


class Thread:
    """A thread as the owner of frames, compared by identity. torch.compile reads it from a thread-local
    and guards on it, so compiled code that checks the owner traces without a graph break and is
    re-traced (then refused) in any other thread; ``threading.get_ident()`` cannot be traced."""

    __slots__ = ("ident",)

    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __repr__(self) -> str:
        return f"thread {self.ident}"


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.acting_for: Thread | None = None
        self.me = Thread(threading.get_ident())


def _me() -> Thread:
    """The thread frames are applied for: this one, or the one a checkpoint replay acts for."""
    acting = _STATE.acting_for
    return _STATE.me if acting is None else acting


_STATE = _ThreadState()
_OWNERS_LOCK = threading.Lock()
_OWNERS: dict[int, tuple[Thread, int]] = {}
"""id(module) -> (owning thread, number of applied frames of that thread patching it)."""


def _claim(modules: list[Any]) -> None:
    """Mark ``modules`` as modified by the current thread; refuse if another thread holds one."""
    me = _me()
    with _OWNERS_LOCK:
        for m in modules:
            owner = _OWNERS.get(id(m))
            if owner is not None and owner[0] is not me:
                raise RuntimeError(
                    f"{type(m).__name__} is being modified by funcadapt in another thread ({owner[0]}); one "
                    f"model cannot be modified from two threads at once. Give each thread its own model "
                    f"(copy.deepcopy), or serialise the calls with a lock"
                )
        for m in modules:
            owner = _OWNERS.get(id(m))
            _OWNERS[id(m)] = (me, 1 if owner is None else owner[1] + 1)


def _release(modules: list[Any], thread: Thread) -> None:
    with _OWNERS_LOCK:
        for m in modules:
            owner = _OWNERS.get(id(m))
            if owner is None or owner[0] is not thread:
                continue
            if owner[1] <= 1:
                del _OWNERS[id(m)]
            else:
                _OWNERS[id(m)] = (thread, owner[1] - 1)


def thread_guarded(what: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, refused from any thread but the one applying the frame now (call it while applying):
    a module a frame changes must not run another thread's coefficients. The check is traceable, so a
    compiled model keeps it without a graph break."""
    owner = _me()

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _me() is not owner:
            raise other_thread(what, owner)
        return forward(*args, **kwargs)

    guarded.__wrapped__ = forward  # type: ignore[attr-defined]  # inspect.signature follows it (generate() reads it)
    return guarded


def other_thread(what: str, owner: Thread) -> RuntimeError:
    """The error for running ``what``, which ``owner`` is modifying, from another thread."""
    return RuntimeError(
        f"{what} is being modified by funcadapt in another thread ({owner}), so running it from this "
        f"thread would see that thread's coefficients. Give each thread its own model (copy.deepcopy), "
        f"or serialise the calls with a lock"
    )


def current_thread() -> Thread:
    """The thread frames are applied for now (see :func:`thread_guarded`)."""
    return _me()


def _orphan_checked(root: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, first warning about the frames of this thread changing ``root`` whose ``with`` block was
    left without exiting them (see :func:`_warn_if_orphaned`). On a model's entry modules, so once per
    forward, not per layer; skipped while torch.compile traces and during checkpoint replays."""

    @functools.wraps(forward)  # keeps the signature, which transformers' generate() reads
    def checked(*args: Any, **kwargs: Any) -> Any:
        if _STATE.frames and _STATE.acting_for is None and not torch.compiler.is_compiling():
            _warn_if_orphaned(root)
        return forward(*args, **kwargs)

    return checked


class OpenContextWarning(UserWarning):
    """A funcadapt context is still active although the code that entered it has returned."""


@dataclass(frozen=True)
class ActiveContext:
    """An applied frame, as :func:`funcadapt.active_contexts` reports it."""

    what: str
    """What it applies, e.g. ``AdapterModifier(op='scale', value=-1.0, mode='linear')``."""
    where: str
    """Where it was entered (``file:line``), or ``""`` when unknown."""
    thread: int
    """The ident (``threading.get_ident()``) of the thread that applied it."""
    model: nn.Module = field(repr=False)

    def __str__(self) -> str:
        return f"{self.what} entered at {self.where or 'an unknown place'} (thread {self.thread})"


class ForwardState(Protocol):
    """State a frame's patches keep for the forward running now (see :class:`Frame`)."""

    def save(self) -> Any: ...

    def load(self, saved: Any) -> None: ...

    def finished(self) -> None:
        """Raise if what ran while the frame was applied did not meet its coefficients (checked on exit)."""


class Frame:
    """Tensors to show under their ``named_parameters``/``named_buffers`` keys, and
    patch builders (called at apply time, so a wrapper wraps what is there then).

    ``states``: what the patches record while a forward runs and read in its layers (the positions of
    per-token coefficients); a checkpoint's recomputation sees them as they were in that forward.

    ``label`` names it in errors and in :func:`funcadapt.active_contexts`; ``entered_in``, the
    Python frame whose ``with`` block applied it (None: not watched), is watched so that a
    forward running after that function returned, with this frame still applied, warns."""

    def __init__(
        self,
        root: nn.Module,
        tensors: Mapping[str, Tensor],
        builders: list[Callable[[], list[Patch]]],
        modules: Mapping[str, nn.Module] | None = None,
        checkpointing: Iterable[nn.Module] | None = None,
        guarded: Iterable[nn.Module] = (),
        label: str = "funcadapt.call",
        states: Iterable[ForwardState] = (),
    ) -> None:
        self.root = root
        self._label: str | Callable[[], str] = label
        self.entered_in: FrameType | None = None
        self.where = ""
        self._warned = False
        self._guarded = [root, *guarded]
        self._guarded_ids = {id(m) for m in self._guarded}
        if modules is None:
            modules = dict(root.named_modules(remove_duplicate=False))
        self._slots = [(_owner(modules, key), key.rpartition(".")[2], t) for key, t in tensors.items()]
        self._builders = builders
        candidates = modules.values() if checkpointing is None else checkpointing
        self._checkpointing: list[tuple[nn.Module, str]] = []
        for m in candidates:  # a loop, not a comprehension with `:=`, which torch.compile cannot trace
            attr = checkpoint_attr(m)
            if attr is not None:
                self._checkpointing.append((m, attr))
        self.states = tuple(states)
        self._undo: list[Callable[[], None]] | None = None
        self._stack: list[Frame] | None = None
        self._thread: Thread | None = None

    @property
    def label(self) -> str:
        """What the frame applies (computed when first asked: a coefficient tensor's repr is not free)."""
        if callable(self._label):
            self._label = self._label()
        return self._label

    @property
    def applied(self) -> bool:
        return self._undo is not None

    def apply(self) -> None:
        if self._undo is not None:
            raise RuntimeError("this funcadapt frame is already applied")
        # A frame applied while torch.compile traces (funcadapt.call inside a compiled function) is applied
        # and undone within the trace, and no other thread can see its patches: it claims nothing and joins
        # no stack. (Dynamo would replay changes to the shared registries after the graph runs, restoring them
        # as they were when traced, over what other threads did meanwhile.)
        tracing = torch.compiler.is_compiling()
        thread = _me()
        undo: list[Callable[[], None]] = []
        if not tracing:
            _claim(self._guarded)
            undo.append(functools.partial(_release, self._guarded, thread))
        try:
            for module, name, tensor in self._slots:
                store: dict[str, Any] = module._parameters if name in module._parameters else module._buffers
                undo.append(functools.partial(store.__setitem__, name, store[name]))
                store[name] = tensor
            patched: dict[int, nn.Module] = {id(m): m for m in self._guarded}
            for build in self._builders:
                for patch in build():
                    if patch.item:
                        _set_item(patch.obj, patch.attr, patch.value(patch.obj[patch.attr]), undo)
                        continue
                    inside = patch.attr == "forward" and not patch.outside_hooks
                    attr = forward_attr(patch.obj) if inside else patch.attr
                    value = patch.value(getattr(patch.obj, attr, None)) if patch.wrap else patch.value
                    _set(patch.obj, attr, value, undo)
                    if isinstance(patch.obj, nn.Module):
                        patched[id(patch.obj)] = patch.obj
            for module, attr in self._checkpointing:
                current: Any = getattr(module, attr)
                if not getattr(current, "_funcadapt", False):
                    _set(module, attr, _replaying(current), undo)
            if not tracing:
                self._refuse_copies(patched.values(), undo)
        except BaseException:
            run_undo(undo)
            raise
        self._undo = undo
        self._thread = thread
        if tracing:
            return
        self._stack = _STATE.frames
        self._stack.append(self)
        with _OWNERS_LOCK:
            _APPLIED[id(self)] = self

    def _refuse_copies(self, modules: Iterable[nn.Module], undo: list[Callable[[], None]]) -> None:
        """While applied, ``copy.deepcopy`` of the model or of any module this frame patched raises: the copy
        would keep the patches, bound to the original modules, and compute with the original's tensors for
        good, whatever is done to its own (copy.deepcopy reads ``__deepcopy__`` off the instance)."""
        refuse = functools.partial(_refused_copy, self)
        for module in modules:
            if "__deepcopy__" not in module.__dict__:
                _set(module, "__deepcopy__", refuse, undo)

    def unapply(self) -> None:
        if self._undo is None:
            raise RuntimeError("this funcadapt frame is not applied")
        if self._stack is None:  # applied while torch.compile traced (see apply)
            undo, self._undo = self._undo, None
            run_undo(undo)
            return
        stack = self._stack
        if not stack or stack[-1] is not self:
            inner = stack[-1] if stack else None
            raise RuntimeError(
                f"funcadapt contexts must be exited in the reverse order they were entered: {self.describe()} "
                f"cannot exit while {inner.describe() if inner else 'another context'} is still open inside it; "
                f"exit that one first"
            )
        if self._thread is not _me():
            raise RuntimeError("a funcadapt context must be exited by the thread that entered it")
        stack.pop()
        with _OWNERS_LOCK:
            _APPLIED.pop(id(self), None)
        undo, self._undo, self._stack = self._undo, None, None
        run_undo(undo)

    def describe(self) -> str:
        return f"{self.label} (entered at {self.where})" if self.where else self.label

    def watch(self, label: str | Callable[[], str], skip: Iterable[str], entries: Iterable[nn.Module] = ()) -> None:
        """Name this frame ``label`` and watch the first caller outside the modules ``skip``
        (funcadapt's own, contextlib): ``file:line`` for messages, and its Python frame unless it is
        a generator or coroutine (suspended there is not returned, so it cannot be watched). The
        ``entries`` (the modules a forward of the model starts in) check it when they run."""
        if self._undo is not None:
            raise RuntimeError("watch a funcadapt frame before applying it")
        checks = [
            Patch(m, "forward", functools.partial(_orphan_checked, self.root), wrap=True, outside_hooks=True)
            for m in entries
        ]
        self._builders = [*self._builders, lambda: checks]
        self._label = label
        caller: FrameType | None = sys._getframe(1)
        while caller is not None and caller.f_globals.get("__name__", "").split(".")[0] in skip:
            caller = caller.f_back
        if caller is None:
            return
        self.where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        suspendable = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
        self.entered_in = None if caller.f_code.co_flags & suspendable else caller

    def __enter__(self) -> Frame:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unapply()


def _refused_copy(frame: Frame, memo: Any = None) -> Any:
    raise RuntimeError(
        f"copy.deepcopy of a model while {frame.describe()} is applied would copy its temporary patches, which "
        f"stay bound to the original model: the copy would compute with the original's tensors for good. Copy "
        f"the model before entering the context, or after it exits"
    )


def checkpoint_attr(module: Any) -> str | None:
    """The attribute holding the checkpoint function a module runs its body through, if it
    checkpoints: transformers' ``_gradient_checkpointing_func`` (while ``gradient_checkpointing``
    is on), or torch's ``checkpoint_wrapper`` (``CheckpointWrapper.checkpoint_fn``, what
    ``apply_activation_checkpointing`` and accelerate's FSDP activation checkpointing install)."""
    if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
        return "_gradient_checkpointing_func"
    if "checkpoint_fn" in module.__dict__ and hasattr(module, "_checkpoint_wrapped_module"):
        return "checkpoint_fn"
    return None


def _owner(modules: Mapping[str, nn.Module], key: str) -> nn.Module:
    prefix, _, name = key.rpartition(".")
    module = modules.get(prefix)
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise KeyError(key)
    return module


def _set(obj: Any, attr: str, value: Any, undo: list[Callable[[], None]]) -> None:
    old = obj.__dict__.get(attr, _MISSING)
    if isinstance(obj, nn.Module) and not isinstance(value, (Tensor, nn.Module)) and not _registered(obj, attr):
        store = obj.__dict__  # what nn.Module.__setattr__ does for a plain value, without its checks
        store[attr] = value
        if old is _MISSING:
            undo.append(functools.partial(store.pop, attr))
        else:
            undo.append(functools.partial(store.__setitem__, attr, old))
        return
    setattr(obj, attr, value)
    if old is _MISSING:
        undo.append(functools.partial(delattr, obj, attr))
    else:
        undo.append(functools.partial(setattr, obj, attr, old))


def _registered(module: nn.Module, attr: str) -> bool:
    return attr in module._parameters or attr in module._buffers or attr in module._modules


def _set_item(container: Any, key: Any, value: Any, undo: list[Callable[[], None]]) -> None:
    """Replace one entry; on undo restore it only if it is still ours (it may have been removed)."""
    old = container[key]
    container[key] = value

    def restore() -> None:
        if container.get(key) is value:
            container[key] = old

    undo.append(restore)


def run_undo(undo: list[Callable[[], None]]) -> None:
    """Every step, last first; a step that raises does not stop the others (the model is restored
    as far as it can be), and the first error is raised at the end."""
    error: BaseException | None = None
    for step in reversed(undo):
        try:
            step()
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


@contextlib.contextmanager
def replay(
    snapshot: tuple[Frame, ...], stack: list[Frame], thread: Thread, states: Iterable[tuple[ForwardState, Any]] = ()
) -> Iterator[None]:
    """Show exactly the frames of ``snapshot`` (as at the original forward) while the body runs, with
    their forward ``states`` as saved then. ``stack`` is the frame stack of the thread that ran that
    forward; the recompute may run on an autograd worker thread, which then acts for that thread."""
    saved = _STATE.frames, _STATE.acting_for
    _STATE.frames, _STATE.acting_for = stack, thread
    now = [(state, state.save()) for state, _ in states]
    for state, value in states:
        state.load(value)
    try:
        current = list(stack)
        for frame in reversed(current):
            frame.unapply()
        try:
            applied: list[Frame] = []
            try:
                for frame in snapshot:
                    frame.apply()
                    applied.append(frame)
                yield
            finally:
                for frame in reversed(applied):
                    frame.unapply()
        finally:
            for frame in current:
                frame.apply()
    finally:
        for state, value in now:
            state.load(value)
        _STATE.frames, _STATE.acting_for = saved


_warned_functorch = False


_CHECKPOINT_OPTIONS = frozenset(
    {"use_reentrant", "context_fn", "determinism_check", "debug", "preserve_rng_state", "early_stop"}
)
"""Keyword arguments torch.utils.checkpoint takes for itself (the others go to the function)."""


def _diffusers_default(checkpoint_func: Callable[..., Any]) -> bool:
    """diffusers' ``enable_gradient_checkpointing()`` without a function of the user's: a closure running
    ``torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)``."""
    return getattr(checkpoint_func, "__module__", "") == "diffusers.models.modeling_utils" and getattr(
        checkpoint_func, "__qualname__", ""
    ).endswith("enable_gradient_checkpointing.<locals>._gradient_checkpointing_func")


def _replaying(checkpoint_func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a checkpoint function (see :func:`checkpoint_attr`) so its recompute replays the frames."""
    if _diffusers_default(checkpoint_func):  # the same call, with the options funcadapt passes
        checkpoint_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    stored = dict(getattr(checkpoint_func, "keywords", None) or {})

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        global _warned_functorch
        if not torch.is_grad_enabled():  # nothing will be recomputed
            return checkpoint_func(function, *args, **kwargs)
        if under_transforms():
            # torch.utils.checkpoint cannot recompute under vmap/grad transforms; running the
            # layer directly gives the same values and gradients, with the memory of no checkpointing.
            if not _warned_functorch:
                warnings.warn(
                    "funcadapt: gradient checkpointing is skipped inside torch.func transforms (vmap/grad); "
                    "results are identical, memory use is that of an uncheckpointed forward",
                    stacklevel=2,
                )
                _warned_functorch = True
            return function(*args, **{k: v for k, v in kwargs.items() if k not in _CHECKPOINT_OPTIONS})
        options = {**stored, **kwargs}
        if options.get("use_reentrant", True) is not False:
            raise ValueError(
                "reentrant gradient checkpointing recomputes layers without funcadapt's effects and "
                "would give silently wrong gradients; enable it with use_reentrant=False: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), "
                "or checkpoint_wrapper(..., checkpoint_impl=CheckpointImpl.NO_REENTRANT); a diffusers model: "
                "enable_gradient_checkpointing() without a function of your own (or functools.partial("
                "torch.utils.checkpoint.checkpoint, use_reentrant=False))"
            )
        user_context = options.get("context_fn")
        stack, thread = _STATE.frames, _me()
        snapshot = tuple(stack)
        states = [(state, state.save()) for frame in snapshot for state in frame.states]

        def context_fn() -> tuple[Any, Any]:
            if user_context is None:
                forward_ctx, recompute_ctx = contextlib.nullcontext(), contextlib.nullcontext()
            else:
                forward_ctx, recompute_ctx = user_context()

            @contextlib.contextmanager
            def recompute() -> Iterator[None]:
                with recompute_ctx, replay(snapshot, stack, thread, states):
                    yield

            return forward_ctx, recompute()

        return checkpoint_func(function, *args, **{**kwargs, "context_fn": context_fn})

    run._funcadapt = True  # type: ignore[attr-defined]
    return run


_APPLIED: dict[int, Frame] = {}
"""Every applied frame, of every thread (for :func:`active_contexts`; frames applied while torch.compile
traces are not registered, see :meth:`Frame.apply`); guarded by ``_OWNERS_LOCK``."""


def _on_stack(target: FrameType) -> bool:
    f: FrameType | None = sys._getframe(2)
    while f is not None:
        if f is target:
            return True
        f = f.f_back
    return False


def _warn_if_orphaned(module: Any) -> None:
    """Warn once per frame of this thread that changes ``module`` and whose ``with`` block was
    left without exiting it (``__enter__`` called by hand and never ``__exit__``): that block's
    Python frame is no longer on the stack."""
    for frame in _STATE.frames:
        target = frame.entered_in
        if target is None or frame._warned or id(module) not in frame._guarded_ids or _on_stack(target):
            continue
        frame._warned = True
        warnings.warn(
            f"{frame.describe()} is still active, but the code that entered it (a function, a notebook cell, a "
            f"REPL statement) has finished: every forward of this model still runs with it. Exit it (use a "
            f"`with` block, or call __exit__); funcadapt.active_contexts(model) lists the contexts that are open",
            OpenContextWarning,
            stacklevel=_user_stacklevel(),
        )


_LIBRARIES = frozenset({"funcadapt", "torch", "transformers", "peft", "accelerate", "bitsandbytes"})


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside these libraries."""
    level, f = 2, sys._getframe(2)
    frame: FrameType | None = f
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
        level, frame = level + 1, frame.f_back
    return level


def active_contexts(model: nn.Module | None = None) -> list[ActiveContext]:
    """The funcadapt contexts and calls active now, in every thread, outermost first per thread
    (those touching ``model`` only, when given)."""
    with _OWNERS_LOCK:
        frames = list(_APPLIED.values())
    if model is not None:
        modules = {id(m) for m in model.modules()}
        frames = [f for f in frames if id(f.root) in modules or any(i in modules for i in f._guarded_ids)]
    return [ActiveContext(f.label, f.where, f._thread.ident if f._thread else 0, f.root) for f in frames]


def _report_open_at_exit() -> None:
    """At interpreter exit, warn about every context still applied: one entered at a script's top
    level stays on the stack until the script ends, so no forward could tell it was forgotten."""
    with _OWNERS_LOCK:
        frames = [f for f in _APPLIED.values() if not f._warned]
    if frames:
        shown = "; ".join(f.describe() for f in frames)
        warnings.warn(
            f"funcadapt context(s) never exited: {shown}. Every forward after they were entered ran with them. "
            f"Use a `with` block, or call __exit__",
            OpenContextWarning,
            stacklevel=1,
        )


atexit.register(_report_open_at_exit)


def active_frames() -> tuple[Frame, ...]:
    """The frames this thread has applied, outermost first."""
    return tuple(_STATE.frames)
