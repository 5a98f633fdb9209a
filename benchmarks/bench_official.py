"""The adapters on real official-repository runs: a pix2pix teacher and a CycleGAN teacher trained by
the official pytorch-CycleGAN-and-pix2pix ``train.py``, compressed to 1/10 of their MACs through
``--model ganslim``, measured side by side.

    make setup-official                               # .venv-official: torch + torchvision + ganslim
    .venv/bin/python benchmarks/bench_official.py     # ~1-2 h on 2 cores with the defaults
    .venv/bin/python benchmarks/bench_official.py --quick    # a few minutes: checks the pipeline only

What runs (in a copy of ``../shared/official/pytorch-CycleGAN-and-pix2pix`` or ``GANSLIM_PIX2PIX_REPO``,
under ``--work``, with the official environment; the command lines are those of
``adapters/pix2pix/README.md``, with sizes appended):

* data: scikit-image's photos and their cartoon renderings (``ganslim.data``); training photos cut into
  ``--grid``x``--grid`` tiles of ``--size`` px (loaded at ``--size * 9 / 8`` and randomly cropped by
  the repository), held-out photos (``--test-photos``) whole at ``--size`` px;
* pix2pix: photo -> cartoon (``--direction BtoA``), ResNet-9 with batch norm and dropout as pix2pix
  trains it; CycleGAN: photos (A) and cartoons of other photos (B), unpaired, both generators;
* teacher: ``--teacher-epochs`` + as many decay epochs; compression: ``--slim-epochs`` + as many decay
  epochs, gating during the first half of the iterations.

Reported per generator (held-out images, this process, no official code): MACs ratio (papers'
convention), parameters, PSNR/SSIM of the student to the teacher and of both to the ground truth (the
cartoon rendering for photo -> cartoon, the photo for cartoon -> photo), CPU latency (median, batch 1),
wall time of each official command. Written: ``benchmarks/results/official.json`` and
``benchmarks/results/official_grid.png`` (input | teacher | student | ground truth per held-out image).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import official_helpers as H  # noqa: E402  (shared with tests/test_official_*.py)

import ganslim  # noqa: E402
from ganslim.measure.machine import describe_machine  # noqa: E402
from ganslim import measure  # noqa: E402
from ganslim.visualize import save_image_grid  # noqa: E402
from ganslim.zoo import create_model  # noqa: E402

CYCLE = "CycleGAN (both generators)"
PIX2PIX = "pix2pix (U-Net or ResNet generator)"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_official"), help="working folder (repository copies)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "official.json"))
    p.add_argument("--grid-png", default=str(ROOT / "benchmarks" / "results" / "official_grid.png"))
    p.add_argument("--size", type=int, default=128, help="training crop and test size (px, multiple of 8)")
    p.add_argument("--grid", type=int, default=2, help="training tiles per photo side")
    p.add_argument("--netG", default="resnet_9blocks")
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=40, help="epochs at full lr (+ as many decaying)")
    p.add_argument("--slim-epochs", type=int, default=40, help="compression epochs at full lr (+ as many decaying)")
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--test-photos", default="chelsea,coffee", help="held out (comma list of scikit-image photos)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the official runs")
    p.add_argument("--latency-threads", type=int, default=2)
    p.add_argument("--latency-size", type=int, default=256, help="square input (px) of the latency measurement")
    p.add_argument("--remeasure", action="store_true",
                   help="no training: measure the latency of the checkpoints a previous run left in --work again")
    p.add_argument("--only", choices=("pix2pix", "cycle_gan"), default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1-2 epochs: checks the pipeline, no numbers")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.grid, a.ngf, a.ndf, a.teacher_epochs, a.slim_epochs = 64, 1, 8, 8, 1, 1
    return a


def _train_flags(a, epochs: int) -> list[str]:
    return ["--gpu_ids", "-1", "--display_id", "0", "--no_html", "--num_threads", "0", "--netG", a.netG,
            "--ngf", str(a.ngf), "--ndf", str(a.ndf), "--load_size", str(a.size * 9 // 8), "--crop_size", str(a.size),
            "--n_epochs", str(epochs), "--n_epochs_decay", str(epochs), "--save_epoch_freq", str(max(1, epochs)),
            "--print_freq", "100"]


def _count(folder: pathlib.Path) -> int:
    return len([f for f in os.listdir(folder) if f.endswith(".png")])


def _evaluate(name: str, teacher, slim, pairs, a) -> tuple[dict, list]:
    """``pairs``: [(input, ground truth)] tensors (1, 3, H, W) in [-1, 1]."""
    x0 = pairs[0][0]
    with torch.no_grad():
        outs = [(x, gt, teacher(x), slim(x)) for x, gt in pairs]
    cat = [torch.cat([o[i] for o in outs]) for i in range(4)]
    mt, ms = measure.count_macs(teacher, x0), measure.count_macs(slim, x0)
    row = {
        "generator": name, "input_shape": list(x0.shape), "held_out_images": len(pairs),
        "macs_teacher_g": mt / 1e9, "macs_student_g": ms / 1e9, "macs_ratio": ms / mt, "macs_reduction": mt / ms,
        "params_teacher_m": measure.count_params(teacher) / 1e6, "params_student_m": measure.count_params(slim) / 1e6,
        "psnr_to_teacher": measure.psnr(cat[3], cat[2]), "ssim_to_teacher": measure.ssim(cat[3], cat[2]),
        "psnr_gt_teacher": measure.psnr(cat[2], cat[1]), "psnr_gt_student": measure.psnr(cat[3], cat[1]),
        "ssim_gt_teacher": measure.ssim(cat[2], cat[1]), "ssim_gt_student": measure.ssim(cat[3], cat[1]),
        "psnr_gt_input": measure.psnr(cat[0], cat[1]),
    }
    row.update(_latency(teacher, slim, a))
    return row, [[x[0], t[0], s[0], gt[0]] for x, gt, t, s in outs]


def _latency(teacher, slim, a) -> dict:
    """Batch-1 CPU latency of both networks at ``--latency-size`` (they are fully convolutional; at
    the 64 px training size the time is mostly per-layer overhead), median of 20 after warm-up."""
    x = torch.rand(1, 3, a.latency_size, a.latency_size) * 2 - 1
    lat_t = measure.measure_latency(teacher, x, threads=a.latency_threads, repeats=20)
    lat_s = measure.measure_latency(slim, x, threads=a.latency_threads, repeats=20)
    return {"latency_input": list(x.shape), "latency_ms_teacher": lat_t.median_ms, "latency_ms_student": lat_s.median_ms,
            "speedup": lat_t.median_ms / lat_s.median_ms, "latency_threads": a.latency_threads}


def remeasure(a) -> int:
    """Latency only, again, for the checkpoints a previous run left in ``--work`` (rows read from and
    written back to ``--out``): for a quiet machine after a run that shared the cores."""
    data = json.loads(pathlib.Path(a.out).read_text())
    work, st = pathlib.Path(a.work), data["meta"]["settings"]
    a.netG, a.ngf = st["netG"], st["ngf"]
    for r in data["rows"]:
        if r["generator"].startswith("pix2pix"):
            ck = work / "pix2pix" / "repo" / "checkpoints"
            teacher = _teacher(a, ck / "facades_pix2pix" / "latest_net_G.pth", "batch", True)
            slim = ganslim.load(ck / "facades_slim" / "latest_net_G.safetensors").eval()
        else:
            g = r["generator"].split()[1]
            ck = work / "cycle_gan" / "repo" / "checkpoints"
            teacher = _teacher(a, ck / "horse2zebra" / f"latest_net_{g}.pth", "instance", False)
            slim = ganslim.load(ck / "h2z_slim" / f"latest_net_{g}.safetensors").eval()
        r.update(_latency(teacher, slim, a))
    data["meta"]["latency_remeasured"] = {"latency_size": a.latency_size, "latency_threads": a.latency_threads}
    pathlib.Path(a.out).write_text(json.dumps(data, indent=2))
    print(_table(data["rows"]))
    print(f"rewrote {a.out}")
    return 0


def _images(folder: pathlib.Path, split: int | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, left, right) or (name, image, image) from a data folder."""
    out = []
    for f in sorted(os.listdir(folder)):
        img = H.load_image(folder / f)
        if split:
            out.append((f, H.to_input(img[:, :split]), H.to_input(img[:, split:])))
        else:
            out.append((f, H.to_input(img), None))
    return out


def _teacher(a, path, norm, dropout):
    net = create_model(a.netG, ngf=a.ngf, norm=norm, use_dropout=dropout)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def run_pix2pix(a, work: pathlib.Path, test: list[str], train: list[str]):
    repo = H.copy_repo("pix2pix", work / "pix2pix" / "repo")
    sh = H.Shell(repo, work / "pix2pix" / "commands.log", timeout=6 * 3600)
    sh(H.find_command(H.readme_commands("pix2pix"), "cp ", "ganslim_model.py"))
    H.make_aligned(repo / "datasets" / "facades", a.size * 9 // 8,
                   train=train, test=test, grid=a.grid, test_size=a.size)
    teacher_cmd, slim_cmd, test_cmd, _ = H.readme_commands("pix2pix", PIX2PIX)
    n = _count(repo / "datasets" / "facades" / "train")
    iters = 2 * a.slim_epochs * n
    times = {"teacher_train_s": sh(teacher_cmd, *_train_flags(a, a.teacher_epochs)).seconds}
    times["compress_s"] = sh(slim_cmd, *_train_flags(a, a.slim_epochs), "--slim_iters", str(iters // 2),
                             "--target_macs", str(a.target)).seconds
    times["test_s"] = sh(test_cmd, "--gpu_ids", "-1", "--load_size", str(a.size), "--crop_size", str(a.size)).seconds
    ck = repo / "checkpoints"
    teacher = _teacher(a, ck / "facades_pix2pix" / "latest_net_G.pth", "batch", True)
    slim = ganslim.load(ck / "facades_slim" / "latest_net_G.safetensors").eval()
    pairs = [(photo, cartoon) for _, cartoon, photo in _images(repo / "datasets" / "facades" / "test", a.size)]
    row, grid = _evaluate("pix2pix G (photo -> cartoon)", teacher, slim, pairs, a)
    row.update(times, train_images=n, teacher_iterations=2 * a.teacher_epochs * n, compress_iterations=iters,
               slim_iters=iters // 2)
    return [row], grid


def run_cyclegan(a, work: pathlib.Path, test: list[str], train: list[str]):
    repo = H.copy_repo("pix2pix", work / "cycle_gan" / "repo")
    sh = H.Shell(repo, work / "cycle_gan" / "commands.log", timeout=6 * 3600)
    sh(H.find_command(H.readme_commands("pix2pix"), "cp ", "ganslim_model.py"))
    data = H.make_unaligned(repo / "datasets" / "horse2zebra", a.size * 9 // 8, train=train, test=test,
                            grid=a.grid, test_size=a.size)
    teacher_cmd, slim_cmd, test_a, test_b = H.readme_commands("pix2pix", CYCLE)
    n = max(_count(data / "trainA"), _count(data / "trainB"))
    iters = 2 * a.slim_epochs * n
    times = {"teacher_train_s": sh(teacher_cmd, *_train_flags(a, a.teacher_epochs)).seconds}
    times["compress_s"] = sh(slim_cmd, *_train_flags(a, a.slim_epochs), "--slim_iters", str(iters // 2),
                             "--target_macs", str(a.target)).seconds
    for cmd in (test_a, test_b):
        times.setdefault("test_s", 0.0)
        times["test_s"] += sh(cmd, "--gpu_ids", "-1", "--load_size", str(a.size), "--crop_size", str(a.size)).seconds
    ck = repo / "checkpoints"
    photos = {f: x for f, x, _ in _images(data / "testA")}
    cartoons = {f.replace("_cartoon", ""): x for f, x, _ in _images(data / "testB")}
    rows, grid = [], []
    for g, pairs, what in (("G_A", [(photos[k], cartoons[k]) for k in photos], "photo -> cartoon"),
                           ("G_B", [(cartoons[k], photos[k]) for k in photos], "cartoon -> photo")):
        teacher = _teacher(a, ck / "horse2zebra" / f"latest_net_{g}.pth", "instance", False)
        slim = ganslim.load(ck / "h2z_slim" / f"latest_net_{g}.safetensors").eval()
        row, gr = _evaluate(f"CycleGAN {g} ({what})", teacher, slim, pairs, a)
        row.update(times, train_images_per_domain=n, teacher_iterations=2 * a.teacher_epochs * n,
                   compress_iterations=iters, slim_iters=iters // 2)
        rows.append(row)
        grid += gr
    return rows, grid


def _table(rows: list[dict]) -> str:
    head = ("generator", "MACs red.", "PSNR to teacher", "PSNR-GT teacher", "PSNR-GT student", "SSIM-GT t/s",
            "latency ms t/s (batch 1)", "speed-up", "teacher min", "compress min")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['generator']} | {r['macs_reduction']:.2f}x | {r['psnr_to_teacher']:.2f} dB | "
                     f"{r['psnr_gt_teacher']:.2f} dB | {r['psnr_gt_student']:.2f} dB | "
                     f"{r['ssim_gt_teacher']:.3f} / {r['ssim_gt_student']:.3f} | "
                     f"{r['latency_ms_teacher']:.1f} / {r['latency_ms_student']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['teacher_train_s'] / 60:.1f} | {r['compress_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _args(argv)
    if a.remeasure:
        return remeasure(a)
    reason = H.missing("pix2pix")
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    os.environ["GANSLIM_OFFICIAL_THREADS"] = str(a.threads)
    work = pathlib.Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    test = [t for t in a.test_photos.split(",") if t]
    train = [p for p in H.TRAIN_PHOTOS if p not in test]
    t0 = time.time()
    rows, grid = [], []
    for kind, fn in (("pix2pix", run_pix2pix), ("cycle_gan", run_cyclegan)):
        if a.only in (None, kind):
            r, g = fn(a, work, test, train)
            rows += r
            grid += g
            print(_table(r), flush=True)
    total = time.time() - t0
    print(_table(rows))
    print(f"total {total / 60:.1f} min; logs in {work}/*/commands.log")
    if a.quick:
        print("--quick: pipeline check only; nothing written to benchmarks/results")
        return 0
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(grid, a.grid_png, labels=["input", "teacher", "student", "ground truth"])
    meta = {"machine": describe_machine(), "cpus": os.cpu_count(), "torch_here": torch.__version__,
            "official_python": str(H.official_python()), "official_threads": a.threads, "total_s": total,
            "settings": {k: v for k, v in vars(a).items() if k not in ("work", "out", "grid_png")},
            "test_photos": test, "train_photos": train}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {a.out} and {a.grid_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
