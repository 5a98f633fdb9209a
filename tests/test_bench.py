"""`ganslim.bench` / `ganslim bench`: every model format, runtimes side by side, per-row errors, outputs."""
import json

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import data
from ganslim.deployment import quantization as Q
from ganslim.measure.benchmarking import NOT_COMPUTED, _fid, _labels, bench, format_markdown, format_table, image_grid, write_outputs
from ganslim.cli import main
from ganslim.deployment.deploy import export
from ganslim.zoo import create_model
from trained import briefly_trained


def teacher_arch():
    """The factory for the plain state dict below (CLI: --factory test_bench:teacher_arch)."""
    return create_model("resnet_6blocks", ngf=8, norm="batch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small trained teacher and compressed students in every format bench accepts."""
    d = tmp_path_factory.mktemp("bench")
    loader = data.default_loader(batch_size=2, crop=32, length=24)
    teacher = briefly_trained(teacher_arch, loader)
    res = ganslim.compress(teacher, teacher, loader, strategy="slim", target_macs=0.3, steps=10, finetune_steps=4, progress=False,
                           measure_latency=False)
    paths = {"teacher": ganslim.save(teacher, d / "teacher.safetensors"),
             "student": ganslim.save(res.model, d / "student.safetensors"),
             "qat": ganslim.save(Q.quantize(res.model, loader, calib_batches=2), d / "qat.safetensors")}
    x = data.test_pairs()[0][0][:, :, :64, :64]
    paths["onnx"] = export(res.model, d / "student.onnx", example_inputs=x)
    torch.save(teacher.state_dict(), d / "teacher.pth")
    paths["pth"] = d / "teacher.pth"
    (d / "junk.xyz").write_text("?")
    paths["junk"] = d / "junk.xyz"
    (d / "broken.safetensors").write_bytes(b"\x00" * 16)
    paths["broken"] = d / "broken.safetensors"
    return {k: str(v) for k, v in paths.items()}, loader


def _pairs():
    (x, y), = data.test_pairs()
    return [((x[:, :, :64, :96],), y[:, :, :64, :96]), ((x[:, :, 64:128, :96],), y[:, :, 64:128, :96])]


def test_every_format_side_by_side_with_ratios_and_per_row_errors(models):
    p, _ = models

    class WrongShape(nn.Module):
        def forward(self, x):
            return x[:, :, ::2, ::2]

    rows = bench([p["teacher"], p["student"], p["qat"], p["onnx"], p["pth"], p["junk"], p["broken"], WrongShape()],
                 eval_pairs=_pairs(), repeats=3, factory=teacher_arch, paired_rounds=3)
    by = {r.name: r for r in rows}
    t, s = by["teacher.safetensors"], by["student.safetensors"]
    # every measured row timed again in alternating turns; rows that failed are not
    assert t.speedup_paired == 1.0 and t.latency_paired_ms > 0
    assert all(r.speedup_paired > 0 and r.latency_paired_ms > 0 for r in rows if r.error is None)
    assert all(r.speedup_paired is None for r in rows if r.error is not None)
    assert t.error is None and t.macs_x == 1.0 and t.latency_x == 1.0 and t.psnr_to_teacher is None
    assert s.error is None and s.macs_x > 2.5 and s.params_x > 1.0 and s.psnr_to_gt is not None and s.peak_mb > 0
    assert by["student.onnx"].runtime == "onnxruntime"
    # the ONNX file is the same network: MACs (conv-only count, BN folded) and outputs agree
    # MACs counted from the ONNX graph: the thin output conv runs as a stride-2 conv with zero taps
    # (ganslim.deployment.onnx_rewrite), a few per cent more multiply-adds than the PyTorch module
    assert s.macs <= by["student.onnx"].macs <= 1.15 * s.macs
    assert by["student.onnx"].psnr_to_teacher == pytest.approx(s.psnr_to_teacher, abs=0.01)
    assert by["qat.safetensors"].error is None and by["qat.safetensors"].macs == pytest.approx(s.macs, rel=0.02)
    assert by["teacher.pth"].error is None and by["teacher.pth"].psnr_to_teacher > 100  # same weights as the teacher
    assert "unknown format" in by["junk.xyz"].error
    assert "broken.safetensors" in by["broken.safetensors"].error
    assert "does not match the teacher" in by["WrongShape#7"].error
    assert t.fid == NOT_COMPUTED
    text = format_table(rows)
    assert "(1.00x)" in text and "junk.xyz [-]" in text and "not computed" in text and "paired ms" in text
    assert "| model |" in format_markdown(rows)


def test_bench_and_the_compress_report_share_one_row_type(models, tmp_path):
    from ganslim.measure.benchmarking import BenchRow, rows_to_json
    from ganslim.measure.report import DeployStats
    from ganslim.measure.stats import ModelStats

    assert BenchRow is ModelStats and DeployStats is ModelStats  # the earlier names, one class
    p, loader = models
    teacher = ganslim.load(p["teacher"])
    pairs = _pairs()[:1]
    res = ganslim.compress(teacher, teacher, loader, strategy="slim", target_macs=0.3, steps=4, finetune_steps=2, progress=False,
                           eval_inputs=[(x, y) for (x,), y in pairs])
    rows = bench([teacher, res.model], eval_pairs=pairs, repeats=3)
    report = res.report
    for row, stats in zip(rows, (report.teacher, report.student)):
        assert type(row) is type(stats) is ModelStats
        assert row.macs == stats.macs and row.params == stats.params  # the same network counted the same way
        assert row.psnr_to_gt == pytest.approx(stats.psnr_to_gt, abs=1e-6)
    assert rows[1].psnr_to_teacher == pytest.approx(report.student.psnr_to_teacher, abs=1e-6)
    assert set(rows_to_json(rows)[0]) == set(report.to_dict()["student"])  # one set of JSON keys


def test_runtimes_eager_onnxruntime_and_int8(models):
    p, loader = models
    rows = bench([p["teacher"], p["qat"]], eval_pairs=_pairs(), repeats=3,
                 runtimes=("eager", "onnxruntime", "onnxruntime-int8"), calib_loader=loader)
    assert [(r.name, r.runtime) for r in rows] == [
        ("teacher.safetensors", "eager"), ("teacher.safetensors", "onnxruntime"), ("teacher.safetensors", "onnxruntime-int8"),
        ("qat.safetensors", "eager"), ("qat.safetensors", "onnxruntime"), ("qat.safetensors", "onnxruntime-int8")]
    assert all(r.error is None for r in rows), [r.error for r in rows]
    t_fp, t_i8 = rows[1], rows[2]
    assert t_i8.size_mb < 0.35 * t_fp.size_mb  # int8 weights on disk
    assert t_fp.psnr_to_teacher > 60 and t_i8.psnr_to_teacher > 25


def test_the_eager_channels_last_runtime_runs_the_same_function(models):
    p, _ = models
    rows = bench([p["teacher"], p["student"]], eval_pairs=_pairs(), repeats=3, runtimes=("eager", "eager-channels-last"))
    assert [r.runtime for r in rows] == ["eager", "eager-channels-last"] * 2
    assert all(r.error is None and r.latency_ms > 0 for r in rows), [r.error for r in rows]
    assert rows[1].psnr_to_teacher > 60  # the teacher in NHWC against itself in NCHW: summation order only
    assert rows[3].psnr_to_gt == pytest.approx(rows[2].psnr_to_gt, abs=0.01)
    assert rows[3].macs == rows[2].macs


def test_fid_and_lpips_with_local_exported_networks(models, tmp_path):
    p, _ = models
    feat = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    img = torch.rand(1, 3, 64, 96)
    dyn = {"input": {2: torch.export.Dim("h", min=16, max=512), 3: torch.export.Dim("w", min=16, max=512)}}
    torch.export.save(torch.export.export(feat, (img,), dynamic_shapes={"input": dyn["input"]}), tmp_path / "feat.pt2")

    class L1(nn.Module):
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3))

    torch.export.save(torch.export.export(L1(), (img, img.clone())), tmp_path / "lpips.pt2")  # distinct: no aliasing
    rows = bench([p["teacher"], p["student"]], eval_pairs=_pairs() * 3, repeats=3, fid_features=str(tmp_path / "feat.pt2"),
                 lpips_net=str(tmp_path / "lpips.pt2"))
    assert all(isinstance(r.fid, float) and r.fid >= 0 for r in rows), [(r.fid, r.error) for r in rows]
    assert all(isinstance(r.lpips, float) and r.lpips > 0 for r in rows), [(r.lpips, r.error) for r in rows]
    a = [torch.rand(1, 3, 16, 16) for _ in range(6)]
    assert _fid(feat, a, a) == pytest.approx(0.0, abs=1e-6)
    assert "needs at least 2" in _fid(feat, a[:1], a[:1])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        bench([p["teacher"]], eval_pairs=_pairs(), fid_features=str(tmp_path / "missing.pt"))


def test_rows_are_named_by_folder_where_file_names_repeat():
    # every `ganslim compress --out DIR` writes DIR/student.safetensors: a table of several is unreadable by file name
    names = _labels(["default", "runs/a/student.safetensors", "runs/b/student.safetensors", "x/teacher.onnx", nn.Identity()])
    assert names == ["default teacher", "a/student.safetensors", "b/student.safetensors", "teacher.onnx", "Identity#4"]


def test_bad_arguments_fail_before_anything_is_timed(models, monkeypatch):
    p, _ = models
    import ganslim.measure.benchmarking as benchmarking

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(benchmarking, "resolve_model", no_loading)
    with pytest.raises(ValueError, match="paired_rounds must be 0"):
        bench([p["teacher"], p["student"]], eval_pairs=_pairs(), paired_rounds=2)
    with pytest.raises(ValueError, match="unknown runtime"):
        bench([p["teacher"], p["student"]], eval_pairs=_pairs(), runtimes=("tensorrt",))


def test_outputs_json_markdown_pareto_png_and_grid(models, tmp_path):
    p, _ = models
    rows = bench([p["teacher"], p["student"], p["onnx"]], eval_pairs=_pairs(), repeats=3)
    written = write_outputs(rows, str(tmp_path / "b.json"), str(tmp_path / "b.md"), str(tmp_path / "b.png"))
    assert len(written) == 3
    assert json.loads((tmp_path / "b.json").read_text())[1]["macs_x"] > 1
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = image_grid([p["teacher"], p["student"]], str(tmp_path / "g.png"), _pairs())
    from PIL import Image

    w, h = Image.open(grid).size
    assert w > 4 * 96 and h > 2 * 64  # input | teacher | student | ground truth, two rows


def test_cli_bench_on_an_image_folder(models, tmp_path, capsys):
    import numpy as np
    import skimage.io

    p, _ = models
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    x, _ = data.photo_pair("coffee")
    skimage.io.imsave(img_dir / "c.png", ((x[:, :70, :90].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8))
    rc = main(["bench", p["teacher"], p["student"], p["junk"], "--images", str(img_dir), "--repeats", "3",
               "--markdown", str(tmp_path / "t.md"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 image(s)" in out and "unknown format" in out and "paired ms" in out  # on by default
    assert (tmp_path / "t.md").exists()
    assert main(["bench", str(tmp_path / "nope.safetensors"), "--quiet"]) == 1  # nothing measurable
