"""Training and inference speed in NCHW and in channels-last (NHWC), side by side in one run.

Why it exists: ``CompressConfig.memory_format="auto"`` trains in channels-last on CPU
(``ganslim.core.memory_format``); this measures what that buys on the generators of the field and
on the default teacher's students (built by ``ganslim.compress`` without training: timing does not
depend on the weights).

    python benchmarks/bench_layout.py                 # the table; writes benchmarks/results/layout.json

A training step is forward + backward + Adam step on one batch (the loss: mean output), timed in
alternating rounds (NCHW, channels-last, NCHW, ...) so the machine's drift falls on both alike; the
median step of each layout is reported. Inference: eager, batch 1, no gradients, the held-out photo
(1x3x256x384), for the default teacher and its students.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ganslim import data  # noqa: E402
from ganslim.compression import compress  # noqa: E402
from ganslim.core import memory_format as mf  # noqa: E402
from ganslim.zoo import create_model  # noqa: E402


def _photos(batch: int, crop: int) -> tuple:
    x, _ = next(iter(data.default_loader(batch_size=batch, crop=crop, length=batch, seed=0)))
    return (x,)


def _labels(batch: int, crop: int, classes: int) -> tuple:
    """A one-hot label map from a photo's brightness bands (as the per-generator tests make them)."""
    (x,) = _photos(batch, crop)
    idx = ((x.mean(1) + 1) / 2 * classes).long().clamp(0, classes - 1)
    return (torch.nn.functional.one_hot(idx, classes).permute(0, 3, 1, 2).float(),)


def _students(teacher: torch.nn.Module) -> dict:
    """The default teacher's students at the README's targets, untrained (finetune_steps=0)."""
    loader = data.default_loader(batch_size=8, crop=64, length=64, seed=0, teacher=teacher)
    out = {}
    for name, strategy, target in (("uniform 1/10", "uniform", 0.1), ("onestep 1/20", "onestep", 0.05),
                                   ("uniform 1/40", "uniform", 0.025), ("separable 1/40", "separable", 0.025)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = compress(copy.deepcopy(teacher), teacher, loader, strategy=strategy, target_macs=target,
                           steps=0, finetune_steps=0, progress=False, measure_latency=False)
        out[name] = res.model
    return out


def training_cases(teacher: torch.nn.Module, students: dict) -> list[tuple]:
    """``(name, network, input tuple, batch shape)``: the default teacher, its ``students`` and the
    field's generators, each with the batch it is timed on."""
    photo8 = _photos(8, 64)
    cases = [("default teacher (ResNet-9 BN, ngf 32)", teacher, photo8, "8x64x64")]
    cases += [(f"  its student {k}", m, photo8, "8x64x64") for k, m in students.items()]
    return cases + [
        ("ResNet-9 instance norm, ngf 64 (CycleGAN)", create_model("resnet_9blocks", ngf=64, norm="instance"),
         _photos(4, 64), "4x64x64"),
        ("U-Net 256, ngf 64 (pix2pix)", create_model("unet_256", ngf=64, norm="batch"), _photos(1, 256), "1x256x256"),
        ("SPADE, ngf 32, 8 classes", create_model("spade", label_nc=8, ngf=32, crop_size=64, no_instance=True),
         _labels(4, 64, 8), "4x8x64x64"),
        ("CartoonGAN", create_model("cartoongan"), _photos(4, 64), "4x64x64"),
    ]


def _train_step_ms(model: torch.nn.Module, inputs: tuple, channels_last: bool, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    if channels_last:
        inputs = mf.to_channels_last(inputs)
    times = []
    with mf.channels_last(model) if channels_last else contextlib.nullcontext():
        model.train()
        for _ in range(steps + 1):  # the first step of a round warms the caches up
            t0 = time.perf_counter()
            out = model(*inputs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]


def _eval_ms(model: torch.nn.Module, inputs: tuple, channels_last: bool, repeats: int) -> list[float]:
    if channels_last:
        inputs = mf.to_channels_last(inputs)
    times = []
    with mf.channels_last(model) if channels_last else contextlib.nullcontext(), torch.no_grad():
        model.eval()
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]


def paired(fn, model, inputs, rounds: int, per_round: int) -> tuple[float, float]:
    """Median ms of ``fn`` in NCHW and in channels-last, alternating ``rounds`` times (each layout on
    its own copy of ``model``)."""
    nchw, nhwc = copy.deepcopy(model), copy.deepcopy(model)
    a, b = [], []
    for _ in range(rounds):
        a += fn(nchw, inputs, False, per_round)
        b += fn(nhwc, inputs, True, per_round)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per round and layout")
    ap.add_argument("--out", default="benchmarks/results/layout.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    teacher = data.default_teacher()
    students = _students(teacher)
    cases = training_cases(teacher, students)
    rows = []
    print(f"\ntraining step (forward + backward + Adam), median of {args.rounds} x {args.steps} steps per layout")
    print(f"{'model':44s} {'batch':>10s} {'NCHW ms':>9s} {'NHWC ms':>9s} {'speed-up':>8s}")
    for name, model, inputs, shape in cases:
        a, b = paired(_train_step_ms, model, inputs, args.rounds, args.steps)
        rows.append({"model": name.strip(), "what": "train step", "input": shape, "nchw_ms": a, "channels_last_ms": b,
                     "speedup": a / b})
        print(f"{name:44s} {shape:>10s} {a:9.1f} {b:9.1f} {a / b:7.2f}x", flush=True)
    photo = (data.test_pairs()[0][0],)  # the held-out photo
    print(f"\ninference, eager, batch 1, {tuple(photo[0].shape)}, median of {args.rounds} x 5 runs per layout")
    print(f"{'model':44s} {'NCHW ms':>20s} {'NHWC ms':>9s} {'speed-up':>8s}")
    for name, model, _, _ in cases[:1 + len(students)]:
        a, b = paired(_eval_ms, model, photo, args.rounds, 5)
        rows.append({"model": name.strip(), "what": "inference batch 1", "input": "x".join(map(str, photo[0].shape)),
                     "nchw_ms": a, "channels_last_ms": b, "speedup": a / b})
        print(f"{name:44s} {a:20.1f} {b:9.1f} {a / b:7.2f}x", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
