"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a time-budgeted
compress whose ranks time different paces (faked: rank r claims 1 + 2r seconds per step), so each
fits a different number of fine-tune steps on its own. Every rank writes what it fitted alone and
how many steps it ran. The deadline's re-fits are switched off here: they would re-agree from the
real pace, hiding the first agreement."""
import json
import sys

import torch

import ganslim
from ganslim.core import budget
from ganslim.core import distributed as dist
from ganslim.zoo import create_model


def main() -> None:
    out = sys.argv[1]
    dist.init_from_env()
    torch.manual_seed(0)
    alone = []
    fit_alone = budget.fit_steps
    budget.fit_steps = lambda *a, **k: alone.append(fit_alone(*a, **k)) or alone[-1]
    budget.time_steps = lambda run, steps=20, skip=5: (1.0 + 2.0 * dist.rank(), 0.0)
    deadline_init = budget.Deadline.__init__
    budget.Deadline.__init__ = lambda self, *a, **k: deadline_init(self, *a, **dict(k, refit_at=()))
    teacher = create_model("resnet_6blocks", ngf=8, norm="instance").eval()
    g = torch.Generator().manual_seed(1)
    loader = [(x, torch.tanh(x.flip(1))) for x in (torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(4))]
    ran = []
    res = ganslim.compress(teacher, teacher, loader, strategy="uniform", target_macs=0.4, finetune_steps=60,
                           time_budget_min=0.75, progress=False, measure_latency=False,
                           callbacks=[lambda tr, losses: ran.append(tr.state.step)])
    with open(f"{out}.{dist.rank()}", "w") as f:
        json.dump({"alone": alone, "ran": len(ran), "reported": res.report.finetune_steps,
                   "checksum": float(sum(p.double().sum() for p in res.model.parameters()))}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
