import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import cases

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


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama on disk, saved once; hidden sizes are multiples of 64 for the 4-bit blocks
    (tests/test_quantized.py and tests/test_groups.py load it quantized)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cases.VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path
