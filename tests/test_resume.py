"""Resume after a crash: a compress() subprocess killed with SIGKILL mid-gating and again mid-fine-tune
ends, when run again, with the weights of an uninterrupted run; no checkpoint is ever half-written."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ganslim
from ganslim.zoo import create_model

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "resume_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))


def _run_until(ckpt_dir, out, wait_for: str, min_step: int) -> None:
    """Start the worker, SIGKILL it once ``wait_for`` holds a checkpoint at step >= ``min_step``."""
    proc = subprocess.Popen([sys.executable, WORKER, str(ckpt_dir), str(out), "0.25"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = os.path.join(ckpt_dir, wait_for)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            if os.path.exists(path):
                try:
                    step = torch.load(path, weights_only=False)["step"]
                except Exception:  # noqa: BLE001 - being replaced this instant; atomic rename: retry
                    step = -1
                if step >= min_step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
            time.sleep(0.05)
        pytest.fail("the worker never reached the checkpoint")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_twice_then_resumed_matches_an_uninterrupted_run(tmp_path):
    whole = subprocess.run([sys.executable, WORKER, str(tmp_path / "a"), str(tmp_path / "a.pt"), "0"], env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    ckpt = tmp_path / "b"
    _run_until(ckpt, tmp_path / "b.pt", "gating.pt", 4)  # killed in the gated stage
    assert not (tmp_path / "b.pt").exists()
    assert torch.load(ckpt / "gating.pt", weights_only=False)["step"] >= 4  # the last complete checkpoint loads
    _run_until(ckpt, tmp_path / "b.pt", "finetune.pt", 4)  # resumed, then killed in the fine-tune
    assert (ckpt / "stage.pt").exists()
    done = subprocess.run([sys.executable, WORKER, str(ckpt), str(tmp_path / "b.pt"), "0"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert any("resumed" in n for n in b["notes"])
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k  # bit-identical: same batches, same optimizer and random states


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    teacher = create_model("resnet_6blocks", ngf=4).eval()
    loader = [(torch.rand(2, 3, 16, 16) * 2 - 1,)]
    (tmp_path / "gating.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable ganslim training checkpoint"):
        ganslim.compress(teacher, teacher, loader, strategy="slim", steps=2, finetune_steps=0, progress=False, measure_latency=False,
                         checkpoint_dir=str(tmp_path))
