"""Shared by the reference-network tests: key digests, parameter counts, one intra-op thread."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU may be shared; one intra-op thread avoids oversubscription stalls in these small runs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def key_digest(sd) -> str:
    """Digest of ``"key:shape"`` lines in ``state_dict`` order (pins names, shapes and order)."""
    lines = "\n".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in sd.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
