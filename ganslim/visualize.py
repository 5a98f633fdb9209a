"""Things people look at: image grids (input | teacher | student | ground truth) as PNG."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` uint8."""
    if img.dim() == 4:
        img = img[0]
    arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, 2)
    return arr[..., :3]


def save_image_grid(rows: Sequence[Sequence[torch.Tensor]], path: str, labels: Sequence[str] = (), pad: int = 4) -> str:
    """Save a grid: one row per example, one column per image (all the same size), with column
    ``labels`` written above. Written atomically; returns ``path``."""
    from PIL import Image, ImageDraw

    tiles = [[to_uint8(t) for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    top = 18 if labels else 0
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, top + len(tiles) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(labels):
        draw.text((pad + j * (w + pad) + 2, 3), lab, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile[:h, :w]), (pad + j * (w + pad), top + pad + i * (h + pad)))
    tmp = f"{path}.tmp{os.getpid()}.png"
    canvas.save(tmp)
    os.replace(tmp, path)
    return path
