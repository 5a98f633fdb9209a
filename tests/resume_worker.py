"""Run by tests/test_resume.py as a real subprocess (killed with SIGKILL, then run again):
compress with checkpoints every 2 steps, a short sleep per step so the kill lands mid-run."""
import sys
import time

import torch

import ganslim
from ganslim.zoo import create_model


def main() -> None:
    ckpt_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.manual_seed(0)
    teacher = create_model("resnet_6blocks", ngf=8, norm="batch").eval()
    g = torch.Generator().manual_seed(1)
    loader = [(x, torch.tanh(x.flip(1))) for x in (torch.rand(4, 3, 24, 24, generator=g) * 2 - 1 for _ in range(5))]
    res = ganslim.compress(teacher, teacher, loader, strategy="slim", target_macs=0.4, steps=12, finetune_steps=12, progress=False,
                           measure_latency=False, checkpoint_dir=ckpt_dir, checkpoint_every=2,
                           finetune_average=0.5,  # a 6-step horizon: the resumed run must carry the average
                           finetune_bn_batches=2,
                           callbacks=[lambda tr, losses: time.sleep(delay)])
    torch.save({"state": res.model.state_dict(), "notes": res.report.notes}, out)


if __name__ == "__main__":
    main()
