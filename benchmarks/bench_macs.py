"""MACs (papers' and true conventions) and parameters of the reference generators at standard sizes.

    python benchmarks/bench_macs.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim import measure  # noqa: E402
from ganslim.zoo import create_model  # noqa: E402

CASES = [
    ("resnet_9blocks", dict(ngf=64), (1, 3, 256, 256)),
    ("resnet_9blocks", dict(ngf=32), (1, 3, 256, 256)),
    ("resnet_6blocks", dict(ngf=64), (1, 3, 256, 256)),
    ("unet_256", dict(ngf=64), (1, 3, 256, 256)),
    ("unet_128", dict(ngf=64), (1, 3, 128, 128)),
    ("cartoongan", dict(), (1, 3, 256, 256)),
]


def main() -> None:
    print("| network | input | params | MACs (papers) | MACs (true) |")
    print("|---|---|---|---|---|")
    for name, kw, shape in CASES:
        m = create_model(name, **kw).eval()
        x = torch.randn(shape)
        p = measure.count_params(m)
        mp, mt = measure.count_macs(m, x, "papers"), measure.count_macs(m, x, "true")
        args = ", ".join(f"{k}={v}" for k, v in kw.items())
        print(f"| {name}({args}) | {'x'.join(map(str, shape))} | {p / 1e6:.3f} M | {mp / 1e9:.2f} G | {mt / 1e9:.2f} G |")


if __name__ == "__main__":
    main()
