"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), or alone with a
rank to imitate: re-estimates a BatchNorm's statistics from batches that differ per rank and saves
them (every rank writes its own file)."""
import sys

import torch
import torch.nn as nn

from ganslim.core import distributed as dist
from ganslim.core.averaging import recalibrate_batchnorm


def main() -> None:
    out = sys.argv[1]
    dist.init_from_env()
    rank = dist.rank() if len(sys.argv) < 3 else int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    g = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.randn(2, 3, 8, 8, generator=g) * (1 + rank),) for _ in range(3)]
    recalibrate_batchnorm(model, batches)
    torch.save({"mean": model[1].running_mean, "var": model[1].running_var}, f"{out}.{rank}")
    dist.barrier()


if __name__ == "__main__":
    main()
