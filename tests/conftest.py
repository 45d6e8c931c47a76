import os
import sys
from collections.abc import Iterator

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The models are tiny: a second intra-op thread gains nothing and, on shared cores,
# OpenMP spin-waiting makes every op orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_leaked_frames() -> Iterator[None]:
    """Every test must leave funcadapt's frame stack empty (a leaked frame would also
    corrupt later tests, so it is removed here either way)."""
    from funcadapt import swap

    yield
    leaked = list(swap.active_frames())
    for frame in reversed(leaked):
        frame.unapply()
    assert not leaked, f"{len(leaked)} funcadapt frame(s) left applied"
