"""Random generator architectures for fuzzing graph surgery (used with hypothesis).

A spec is a list of op names interpreted by :class:`RandomGenerator`; every op keeps the tensor
layout ``(N, C, H, W)`` consistent, so any sequence is a valid network.
"""
from __future__ import annotations

import torch
import torch.nn as nn

OPS = ("conv", "res", "down", "up_t", "up_conv", "cat", "dw", "leaky", "grouped")


def norm_layer(kind: str, c: int) -> nn.Module:
    return {"instance": lambda: nn.InstanceNorm2d(c), "instance_affine": lambda: nn.InstanceNorm2d(c, affine=True),
            "batch": lambda: nn.BatchNorm2d(c), "none": lambda: nn.Identity()}[kind]()


class ResBlock(nn.Module):
    def __init__(self, c: int, norm: str, inner: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, inner, 3, padding=1), norm_layer(norm, inner), nn.ReLU(True),
                                  nn.Conv2d(inner, c, 3, padding=1), norm_layer(norm, c))

    def forward(self, x):
        return x + self.body(x)


class CatBlock(nn.Module):
    """U-Net style: ``cat([x, f(x)])`` then a conv back to ``out`` channels."""

    def __init__(self, c: int, norm: str, inner: int, out: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, inner, 3, padding=1), norm_layer(norm, inner), nn.LeakyReLU(0.2))
        self.merge = nn.Sequential(nn.Conv2d(c + inner, out, 1), norm_layer(norm, out), nn.ReLU())

    def forward(self, x):
        return self.merge(torch.cat([x, self.f(x)], 1))


class RandomGenerator(nn.Module):
    """``in_ch`` -> 3-channel image in [-1, 1]; ``spec`` lists ops, ``widths`` their channel counts."""

    def __init__(self, spec: list[str], widths: list[int], norm: str = "instance", in_ch: int = 3):
        super().__init__()
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(in_ch, c, 3, padding=1), norm_layer(norm, c), nn.ReLU(True)]
        down = 0
        for op, w in zip(spec, widths[1:] + widths[:1] * len(spec)):
            if op == "conv":
                layers += [nn.Conv2d(c, w, 3, padding=1), norm_layer(norm, w), nn.ReLU(True)]
                c = w
            elif op == "res":
                layers += [ResBlock(c, norm, w)]
            elif op == "down" and down < 2:
                layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), norm_layer(norm, w), nn.ReLU(True)]
                c, down = w, down + 1
            elif op == "up_t" and down > 0:
                layers += [nn.ConvTranspose2d(c, w, 3, 2, 1, output_padding=1), norm_layer(norm, w), nn.ReLU(True)]
                c, down = w, down - 1
            elif op == "up_conv" and down > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, w, 3, padding=1),
                           norm_layer(norm, w), nn.ReLU(True)]
                c, down = w, down - 1
            elif op == "cat":
                layers += [CatBlock(c, norm, w, c)]
            elif op == "dw":
                layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), norm_layer(norm, c), nn.ReLU(True)]
            elif op == "grouped":  # groups=2: channels coupled in blocks (never pruned, must stay consistent)
                g_out = 2 * max(1, w // 2)
                if c % 2:
                    layers += [nn.Conv2d(c, c + 1, 1), norm_layer(norm, c + 1), nn.ReLU(True)]
                    c += 1
                layers += [nn.Conv2d(c, g_out, 3, padding=1, groups=2), norm_layer(norm, g_out), nn.ReLU(True),
                           nn.Conv2d(g_out, w, 1), norm_layer(norm, w), nn.ReLU(True)]  # a prunable group follows
                c = w
            elif op == "leaky":
                layers += [nn.Conv2d(c, w, 3, padding=1), norm_layer(norm, w), nn.LeakyReLU(0.2, True)]
                c = w
        while down > 0:
            layers += [nn.ConvTranspose2d(c, c, 4, 2, 1), norm_layer(norm, c), nn.ReLU(True)]
            down -= 1
        layers += [nn.Conv2d(c, 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class TwoInputGenerator(nn.Module):
    """Several inputs: an image and a conditioning map, fused after their stems."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.InstanceNorm2d(c), nn.ReLU())
        self.cond = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(),
                                  nn.Conv2d(2 * c, 3, 3, padding=1), nn.Tanh())

    def forward(self, x, cond):
        return self.body(torch.cat([self.img(x), self.cond(cond)], 1))
