"""Small generators trained for a few steps, so tests compress and quantize something that is not random."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


def briefly_trained(make: Callable[[], nn.Module], loader: Iterable, lr: float = 1e-3) -> nn.Module:
    """``make()`` under seed 0, then one Adam step of L1 to the target per ``(input, target)`` batch;
    returned in eval mode."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr)
    for x, y in loader:
        loss = (model(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
