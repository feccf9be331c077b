"""Shared fixtures: no leaking of global RNG state between tests, float64 helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# pytest-xdist runs one worker per core: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate_global_rng():
    """Seed and restore torch/numpy global RNGs so tests neither depend on nor leak state."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    torch.manual_seed(1234)
    np.random.seed(1234)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
