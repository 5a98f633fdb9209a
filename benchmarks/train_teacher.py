"""Train the default teacher shipped in ``ganslim/assets/default_teacher.safetensors``.

ResNet-9 generator (pix2pix/CycleGAN ``resnet_9blocks``, ngf 64, instance norm) trained with an
L1 loss on the embedded photo -> cartoon pairs (``ganslim.data``), evaluated on the held-out photo.

    python benchmarks/train_teacher.py --steps 2400 --out ganslim/assets/default_teacher.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from safetensors.torch import save_file

from ganslim import data
from ganslim.zoo import create_model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="ganslim/assets/default_teacher.safetensors")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = create_model("resnet_9blocks", ngf=args.ngf)
    loader = data.default_loader(batch_size=args.batch, crop=args.crop, length=args.steps * args.batch, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    (tx, ty), = data.test_pairs()
    t0 = time.time()
    for step, (x, y) in enumerate(loader, 1):
        loss = (model(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                p = psnr(model(tx), ty)
            model.train()
            print(f"step {step}/{args.steps} loss {loss.item():.4f} held-out PSNR {p:.2f} dB  {time.time() - t0:.0f}s", flush=True)
            save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, args.out + ".partial",
                      metadata={"step": str(step), "psnr": f"{p:.3f}", "args": json.dumps(vars(args))})
    print("done", time.time() - t0)


if __name__ == "__main__":
    main()
