"""Shared fixtures. Each area keeps its own fixtures in tests/<area>/conftest.py."""

from __future__ import annotations

import os

import pytest
import torch

# Never reach the network from tests: Hub look-ups must come from local folders or a prepared cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Test models are tiny: one thread is fastest, and two lose badly when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_shell_lcc():
    """A small random Shell-LCC (64 anchors, hidden 32) with non-trivial BatchNorm statistics, frozen."""
    from latent_rewards import ShellLCC

    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        m = ShellLCC(num_bases=kwargs.pop("num_bases", 64), hidden_dim=kwargs.pop("hidden_dim", 32), **kwargs)
        bn = m.predictor[1]
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
        return m.freeze()

    return make
