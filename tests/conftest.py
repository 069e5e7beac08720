"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Tiny tensors on a busy 2-core machine: one torch thread is several times faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
