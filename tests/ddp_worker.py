"""Run by tests/test_distributed.py, once alone and once under ``torchrun --nproc_per_node 2`` (gloo, CPU):
compresses a small instance-norm generator and saves the result's state dict (rank 0 only)."""
import sys

import torch

import ganslim
from ganslim.core import distributed as dist
from ganslim.strategies import VARIANTS
from ganslim.zoo import create_model


def main() -> None:
    out, strategy = sys.argv[1], sys.argv[2]
    dist.init_from_env()
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="instance").eval()
    g = torch.Generator().manual_seed(1)
    # global batches of 4 images: each of 2 processes trains on 2 of them
    loader = [(x, torch.tanh(x.flip(1))) for x in (torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(4))]
    if len(sys.argv) > 3 and sys.argv[3] == "half":  # what one rank would learn without the gradient all-reduce
        loader = [(x[:2], y[:2]) for x, y in loader]
    settings = VARIANTS.get(strategy, {"strategy": strategy})  # a strategy, or a head-to-head variant of one
    res = ganslim.compress(teacher, teacher, loader, **settings, target_macs=0.4, steps=8, finetune_steps=4,
                           search_population=4, search_generations=1, progress=True, measure_latency=False)
    if dist.is_main():
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
        with torch.no_grad():
            y = res.model.eval()(x)
        torch.save({"state": res.model.state_dict(), "widths": res.report.widths, "world": dist.world_size(),
                    "output": y}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
