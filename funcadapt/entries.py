"""What the forward running now processes, recorded where it enters the model and read by every layer.

Coefficients that vary over the batch by something only the model's input says (the positions of
per-token coefficients, the rows and denoising step of per-image ones) are placed by a record that a
patch on the model's entry modules pushes for each forward (a stack: an entry module's forward may call
another's). A frame keeps its recorders as ``states`` (:class:`funcadapt.swap.ForwardState`), so a
checkpoint's recomputation sees the record of the forward that ran the block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from .swap import current_thread

Record = TypeVar("Record")

Enter = Callable[[tuple, Mapping[str, Any]], Any]
"""(positional, keyword arguments of an entry module's forward) -> its record, or a string saying why
there is none (raised by the first layer that reads it)."""


class EntryRecorder(Generic[Record]):
    """Records of the forwards running now. Subclasses say what a forward's record is (:meth:`entering`)
    and what to say to a layer that runs outside any forward (``outside``)."""

    outside = "this layer ran outside a forward of the model"

    def __init__(self) -> None:
        self.stack: list[Record | str] = []

    def entering(self, forward: Callable[..., Any], wrapper: bool = False) -> Enter:
        """What a forward's record is. ``wrapper``: the entry module's forward hands the whole input to another
        entry module further in (a PEFT model's, DDP's, FSDP1's, torch.compile's), which records too."""
        raise NotImplementedError

    def current(self, where: str) -> Record:
        """The record of the innermost forward running now, or an error naming the layer ``where``."""
        if not self.stack:
            raise ValueError(f"{where}: {self.outside}")
        top = self.stack[-1]
        if isinstance(top, str):
            raise ValueError(f"{where}: {top}")
        return top

    def save(self) -> list[Record | str]:
        return list(self.stack)

    def load(self, saved: list[Record | str]) -> None:
        self.stack[:] = saved

    def finished(self) -> None:
        """Checked when the context exits; nothing by default (each forward was checked as it ran)."""

    def recording(self, forward: Callable[..., Any], wrapper: bool = False) -> Callable[..., Any]:
        """``forward`` (an entry module's), recording while it runs; only for the thread applying the frame
        (another thread's call is refused by the modules the frame changes, and must not leave its record
        where this thread's layers read it). ``wrapper``: see :meth:`entering`."""
        owner = current_thread()
        enter = self.entering(forward, wrapper)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if current_thread() is not owner:
                return forward(*args, **kwargs)
            record = enter(args, kwargs)  # (its own statement: no object waits on the stack across a graph break)
            self.stack.append(record)
            try:
                return forward(*args, **kwargs)
            finally:
                self.stack.pop()

        recorded.__wrapped__ = forward  # type: ignore[attr-defined]  # generate() reads the signature
        return recorded
