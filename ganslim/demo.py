"""The main job on the embedded default: compress the shipped teacher on the embedded photo ->
cartoon data, print the before/after table, save the slim checkpoint, reload it without its
class and check the outputs, and write an image grid (input | teacher | student | ground truth).
"""
from __future__ import annotations

import os
import time

import torch

from . import data, measure
from .deployment.checkpoint import load, save
from .compression import compress
from .config import CompressConfig
from .measure.report import write_json
from .visualize import save_image_grid

# The library's defaults, which are this task's recipe (strategy "uniform", 12000 fine-tune steps): 16
# minutes on 2 CPU cores of the demo's machine for the default ResNet-9 -> 10x fewer MACs at +0.14 dB
# to ground truth; benchmarks/bench_peer.py compares it with the other strategies.
DEMO_CONFIG = CompressConfig()
DEMO_BATCH = 8


def demo_loader(teacher, cfg: CompressConfig, batch_size: int = DEMO_BATCH, crop: int = 64):
    """Embedded training crops for a whole run, carrying the teacher's outputs (computed once on
    each whole photo), so the fine-tune skips the teacher's forward: about 2x faster steps."""
    steps_total = cfg.steps + cfg.finetune_steps + (cfg.quantization.steps if cfg.quantization.mode else 0)
    return data.default_loader(batch_size=batch_size, crop=crop, length=max(steps_total, 1) * batch_size, seed=cfg.seed,
                               teacher=teacher)


def run_demo(out_dir: str = "runs/demo", config: CompressConfig | None = None, batch_size: int = DEMO_BATCH,
             crop: int = 64, **overrides) -> dict:
    """Run the demo; returns the report as a dict (also written to ``out_dir/report.json``)."""
    cfg = (config or DEMO_CONFIG).replace(**overrides)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    teacher = data.default_teacher()
    pairs = data.test_pairs()
    (x, y), = pairs
    fid = measure.fidelity_to_target(teacher, pairs)
    print(f"default teacher: ResNet-9 ngf 32 (batch norm), {measure.count_params(teacher) / 1e6:.3f} M params, "
          f"{measure.count_macs(teacher, x) / 1e9:.2f} G MACs at {tuple(x.shape)} (papers' convention); "
          f"held-out photo {data.TEST_PHOTOS[0]!r}: PSNR {fid['psnr']:.2f} dB, SSIM {fid['ssim']:.4f} to ground truth "
          f"(the photo itself: {measure.psnr(x, y):.2f} dB)")
    loader = demo_loader(teacher, cfg, batch_size, crop)
    result = compress(teacher, teacher, loader, config=cfg.replace(eval_inputs=[(x, y)]))
    print(result.report)
    ckpt = save(result.model, os.path.join(out_dir, "student.safetensors"),
                metadata={"task": "photo->cartoon (ganslim default)", "teacher": "default_teacher"})
    reloaded = load(ckpt)
    with torch.no_grad():
        same = torch.equal(reloaded(x), result.model.eval()(x))
    print(f"saved {ckpt} ({os.path.getsize(ckpt) / 1e6:.2f} MB); reloaded without the original class: "
          f"outputs {'bit-identical' if same else 'DIFFER'}")
    with torch.no_grad():
        grid = save_image_grid([[x, teacher(x), result.model(x), y]], os.path.join(out_dir, "grid.png"),
                               labels=["input", "teacher", "student", "ground truth"])
    print(f"image grid: {grid}")
    rep = result.report.to_dict()
    rep["reload_bit_identical"] = same
    rep["demo_seconds"] = time.time() - t0
    write_json(rep, os.path.join(out_dir, "report.json"))
    print(f"report: {os.path.join(out_dir, 'report.json')}; total {rep['demo_seconds'] / 60:.1f} min")
    return rep
