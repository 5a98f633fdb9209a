"""Stylize a folder of photos with a slim CartoonGAN, preprocessing as the CartoonGAN test code
(resize the long side to --load_size, RGB -> BGR, [-1, 1]; output BGR -> RGB, [0, 1]).

    python adapters/cartoongan/stylize.py --model Hayao_slim.safetensors --input_dir test_img --output_dir out
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

import ganslim


def stylize(model, img: Image.Image, load_size: int = 450, device: str = "cpu") -> Image.Image:
    w, h = img.size
    if w >= h:
        size = (load_size, int(load_size * h / w))
    else:
        size = (int(load_size * w / h), load_size)
    img = img.convert("RGB").resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img)[:, :, ::-1].copy()).permute(2, 0, 1).float().div(255)[None] * 2 - 1
    with torch.no_grad():
        y = model(x.to(device))[0, [2, 1, 0]].cpu() * 0.5 + 0.5
    return Image.fromarray((y.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=".safetensors written by compress.py")
    p.add_argument("--input_dir", default="test_img")
    p.add_argument("--output_dir", default="test_output")
    p.add_argument("--load_size", type=int, default=450)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model = ganslim.load(a.model).to(a.device).eval()
    os.makedirs(a.output_dir, exist_ok=True)
    n = 0
    for f in sorted(os.listdir(a.input_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        stylize(model, Image.open(os.path.join(a.input_dir, f)), a.load_size, a.device).save(
            os.path.join(a.output_dir, f"{stem}_slim.jpg"))
        n += 1
    print(f"stylized {n} image(s) into {a.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
