"""Train the default teacher shipped in ``ganslim/assets/default_teacher.safetensors``.

ResNet-9 generator (pix2pix/CycleGAN ``resnet_9blocks``, ngf 32, batch norm; 14.5 G MACs at 256x256) trained with an
L1 loss on the embedded photo -> cartoon pairs (``ganslim.data``), evaluated on the held-out photo.

    python benchmarks/train_teacher.py --ngf 32 --steps 6000 --batch 8 --out ganslim/assets/default_teacher.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from safetensors.torch import save_file

import ganslim
from ganslim import data
from ganslim.zoo import create_model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ngf", type=int, default=32)
    ap.add_argument("--norm", default="batch", help="batch (pix2pix's default) keeps the global colour that "
                    "instance norm removes; instance gave a colour cast on the held-out photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="ganslim/assets/default_teacher.safetensors")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = create_model("resnet_9blocks", ngf=args.ngf, norm=args.norm)
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
        if step % 500 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                p = psnr(model(tx), ty)
            model.train()
            print(f"step {step}/{args.steps} loss {loss.item():.4f} held-out PSNR {p:.2f} dB  {time.time() - t0:.0f}s", flush=True)
            save_file({k: (v.detach().half() if v.is_floating_point() else v).contiguous()
                       for k, v in model.state_dict().items()}, args.out + ".partial",
                      metadata={"step": str(step), "psnr": f"{p:.3f}", "args": json.dumps(vars(args))})
    model.eval()
    ganslim.save(model, args.out, dtype=torch.float16,
                 metadata={"task": "photo->cartoon (ganslim.data)", "trained_by": "benchmarks/train_teacher.py",
                           "train_args": vars(args), "steps": str(args.steps), "heldout_psnr_db": f"{p:.3f}"})
    print(f"done in {time.time() - t0:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
