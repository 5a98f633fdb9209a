"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), or alone with a
rank to play: widths chosen from timings (``uniform_widths="latency"``, ``strategy="halp"``) must be
the same on every rank, though each process times differently. Here the difference is made certain:
each rank's device (its whole-network timer and its per-layer table) favours other widths. Writes each
rank's chosen widths to ``OUT.<rank>`` (JSON)."""
import json
import sys

import torch

import ganslim
from ganslim.core import distributed as dist
from ganslim.measure import latency_table
from ganslim.strategies import halp
from ganslim.zoo import create_model


def main() -> None:
    out, variant = sys.argv[1], sys.argv[2]
    dist.init_from_env()
    rank = dist.rank() if dist.is_distributed() else int(sys.argv[3])

    def measured_ms(model, targets, alive, *args, **kwargs) -> float:  # odd or even totals look fast, by rank
        kept = sum(int(a.sum()) for a in alive)
        return float(kept) * (1.0 + 0.5 * ((kept + rank) % 2))

    def conv_ms(self, sig) -> float:  # rank 1's device makes the resampling convs ten times dearer
        resampling = sig.transposed or tuple(sig.stride) != (1, 1)
        return 1e-3 * sig.in_channels * sig.out_channels * (10.0 if resampling and rank == 1 else 1.0)

    halp.measured_ms = measured_ms
    latency_table.LatencyTable._time = conv_ms
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=16, norm="instance").eval()
    g = torch.Generator().manual_seed(1)
    loader = [(x, torch.tanh(x.flip(1))) for x in (torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(2))]
    kw = dict(strategy="uniform", uniform_widths="latency") if variant == "uniform-latency" else dict(strategy="halp")
    res = ganslim.compress(teacher, teacher, loader, target_macs=0.2, finetune_steps=2, progress=False,
                           measure_latency=False, latency_runtime="eager", latency_step=4,
                           latency_table=f"{out}.table{rank}.json", **kw)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({k: list(v) for k, v in res.report.widths.items()}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
