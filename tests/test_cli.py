"""The command line is a thin layer over the API: real runs on tiny models, errors as exit codes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ganslim
from ganslim.cli import main
from ganslim.zoo import create_model


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "teacher.safetensors"
    ganslim.save(create_model("resnet_6blocks", ngf=4), path)
    return str(path)


def test_compress_then_bench_then_info(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compress", "--teacher", tiny_teacher, "--target-macs", "0.5", "--steps", "4", "--finetune-steps", "2",
               "--crop", "32", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    student = out / "student.safetensors"
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["macs"] < report["teacher"]["macs"]
    assert "MACs (papers' convention)" in capsys.readouterr().out

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 10)
    rc = main(["bench", tiny_teacher, str(student), str(bad), "--input-shape", "1,3,32,32", "--repeats", "3",
               "--json", str(tmp_path / "bench.json")])
    assert rc == 0  # one bad row does not stop the others
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows[1]["macs"] < rows[0]["macs"] and rows[1]["macs_x"] > 1.0
    assert rows[1]["psnr_to_teacher"] is not None
    assert rows[2]["error"] and "broken.safetensors" in rows[2]["error"]

    assert main(["info", str(student)]) == 0
    assert '"arch"' in capsys.readouterr().out


def test_bad_input_gives_one_line_error_and_exit_code_2(tmp_path):
    env = dict(os.environ, TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "ganslim", "compress", "--teacher", str(tmp_path / "nope.safetensors")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if "ganslim compress: error" in line]
    assert err and "nope.safetensors" in err[0]
    p = subprocess.run([sys.executable, "-m", "ganslim", "compress", "--target-macs", "abc"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "invalid float value" in p.stderr


def test_bad_factory_string(capsys):
    assert main(["compress", "--factory", "no_colon_here"]) == 2
    assert "package.module:function" in capsys.readouterr().err


def test_compress_from_factory_weights_and_an_image_folder(tmp_path):
    import numpy as np
    import skimage.io

    from ganslim import data

    x, _ = data.photo_pair("astronaut")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    skimage.io.imsave(img_dir / "a.png", ((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8))
    torch.manual_seed(0)
    weights = tmp_path / "g.pth"
    torch.save(create_model("resnet_6blocks").state_dict(), weights)  # a plain state dict, as the official repos save
    out = tmp_path / "run"
    rc = main(["compress", "--factory", "ganslim.zoo.resnet:resnet_6blocks", "--weights", str(weights),
               "--images", str(img_dir), "--target-macs", "0.5", "--steps", "3", "--finetune-steps", "1",
               "--crop", "32", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["psnr_to_gt"] is None  # an image folder has no targets: pseudo pairs only
    assert report["student"]["macs"] <= 0.5 * report["teacher"]["macs"] * 1.05


def test_config_file_options_and_errors(tiny_teacher, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"strategy": "slim", "target_macs": 0.5, "steps": 3, "finetune_steps": 1, "gate_lr": 0.01}))
    out = tmp_path / "run"
    rc = main(["compress", "--teacher", tiny_teacher, "--config", str(cfg), "--finetune-steps", "2", "--crop", "32",
               "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["finetune_steps"] == 2  # the file's steps, the flag's fine-tune steps
    for text, msg in [("{", "not valid JSON (line 1"), ('{"stepz": 3}', "unknown option 'stepz'"),
                      ('{"steps": "many"}', "option 'steps' must be int"), ('[1, 2]', "expected a JSON object"),
                      ('{"strategy": "magic"}', "unknown strategy 'magic'")]:
        cfg.write_text(text)
        bad_out = tmp_path / "bad"
        assert main(["compress", "--teacher", tiny_teacher, "--config", str(cfg), "--out", str(bad_out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "c.json" in err[0], err
        assert not bad_out.exists()  # nothing half-written
    assert main(["compress", "--config", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_batch_with_another_layout_is_named_in_the_error():
    teacher = create_model("resnet_6blocks", ngf=4).eval()
    good = torch.rand(2, 3, 16, 16) * 2 - 1
    loader = [(good,), (good,), (torch.rand(2, 1, 16, 16),)]  # a grayscale batch slipped in
    with pytest.raises(ValueError, match=r"failed on the batch at step 2 \(input shape \(2, 1, 16, 16\)\)"):
        ganslim.compress(teacher, teacher, loader, strategy="slim", steps=4, finetune_steps=0, progress=False, measure_latency=False)


def test_compress_on_the_embedded_photos_does_not_run_the_teacher_per_step(tiny_teacher, tmp_path, monkeypatch):
    """The embedded crops carry the teacher's outputs (computed once per whole photo), so training
    steps skip the teacher's forward: it sees a training crop only for compress's first-batch check."""
    import ganslim.cli as cli

    calls = []
    load = cli._load_model

    def counted(*args):
        teacher = load(*args)
        teacher.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
        return teacher

    monkeypatch.setattr(cli, "_load_model", counted)
    rc = main(["compress", "--teacher", tiny_teacher, "--strategy", "uniform", "--target-macs", "0.5",
               "--finetune-steps", "6", "--crop", "32", "--batch-size", "2", "--out", str(tmp_path / "run"),
               "--no-progress"])
    assert rc == 0
    crops = [s for s in calls if s == (2, 3, 32, 32)]
    assert len(crops) <= 1, calls
    assert any(s[0] == 1 and s[2] > 32 for s in calls)  # the whole photos, once each


def test_the_time_budget_counts_the_commands_start_up_too(tiny_teacher, tmp_path, capsys, monkeypatch):
    from ganslim.core import budget

    monkeypatch.setattr(budget, "process_age_s", lambda: 90.0)  # as if start-up and the data took 1.5 min
    args = ["compress", "--teacher", tiny_teacher, "--strategy", "uniform", "--target-macs", "0.5", "--finetune-steps",
            "3", "--crop", "32", "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--time-budget-min", "30"]) == 0
    assert "time budget: 90 s of 30 min went to start-up" in capsys.readouterr().out
    notes = json.loads((tmp_path / "run" / "report.json").read_text())["notes"]
    assert any(n.startswith("time budget 28.4667 min: all 3 fine-tune steps fit") for n in notes), notes  # 2 s to save
    assert main(args + ["--time-budget-min", "1"]) == 2  # nothing left for compress: an error, nothing written
    assert "1.50 min went to start-up" in capsys.readouterr().err
