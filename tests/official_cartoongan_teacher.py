"""A CartoonGAN teacher for the official-code tests: the repository's own ``Transformer`` class trained
on the real photo -> cartoon pairs that ship in its checkout (``test_img/<x>`` -> ``test_output/<x>_<style>``,
made by the released model), saved as ``pretrained_model/<style>_net_G_float.pth`` like the released files.

The repository has inference code only (no train.py) and its released weights cannot be downloaded
here, so the teacher is fitted to the released model's outputs (L1, Adam) with the input convention of
its ``test.py``: BGR in [-1, 1]. Run from the root of a CartoonGAN-Test-Pytorch-Torch checkout:

    python tests/official_cartoongan_teacher.py --size 64 --steps 30 --style Hayao
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pairs(style: str, size: int):
    xs, ys = [], []
    for f in sorted(os.listdir("test_img")):
        stem, ext = os.path.splitext(f)
        target = [g for g in os.listdir("test_output") if os.path.splitext(g)[0] == f"{stem}_{style}"]
        if ext.lower() not in (".jpg", ".png") or not target:
            continue

        def load(p):
            img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            a = np.asarray(img)[:, :, [2, 1, 0]].astype(np.float32) / 127.5 - 1  # RGB -> BGR, [-1, 1]
            return torch.from_numpy(a.copy()).permute(2, 0, 1)

        xs.append(load(os.path.join("test_img", f)))
        ys.append(load(os.path.join("test_output", target[0])))
    if not xs:
        sys.exit(f"no test_img/<x> with test_output/<x>_{style}.* here: run from the CartoonGAN checkout's root")
    return torch.stack(xs), torch.stack(ys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style", default="Hayao")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    sys.path.insert(0, os.getcwd())
    from network.Transformer import Transformer  # the repository's class

    torch.manual_seed(a.seed)
    x, y = pairs(a.style, a.size)
    net = Transformer()
    opt = torch.optim.Adam(net.parameters(), a.lr, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(a.seed)
    for step in range(a.steps):
        idx = torch.randperm(len(x), generator=g)[:a.batch_size]
        loss = F.l1_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step}: L1 {loss.item():.4f}", flush=True)
    os.makedirs("pretrained_model", exist_ok=True)
    out = os.path.join("pretrained_model", f"{a.style}_net_G_float.pth")
    torch.save(net.state_dict(), out)
    print(f"saved {out} ({len(x)} pairs, {a.steps} steps at {a.size} px)")


if __name__ == "__main__":
    main()
