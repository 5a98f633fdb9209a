"""torchrun / DDP: two CPU processes on gloo give the one-process result for the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "ddp_worker.py")


def _run(args: list, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("strategy", ["slim", "ofa"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, strategy):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r1 = _run([sys.executable, WORKER, str(one), strategy])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(two),
               strategy])
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["widths"] == b["widths"]  # the same channels were chosen on every rank and in one process
    # the same function: outputs on fresh inputs agree. (Weights are compared where they matter: a conv
    # bias right before an instance norm has a true gradient of 0, and Adam turns the float noise of
    # either run into full-size steps that change nothing downstream.)
    assert (a["output"] - b["output"]).abs().max() < 1e-4  # measured 3e-6 (slim), 2e-6 (ofa)
    for k, v in a["state"].items():
        if k.endswith(".weight"):
            assert (v.float() - b["state"][k].float()).abs().max() < 1e-4, k


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error():
    code = ("import torch, torch.distributed as d; from ganslim import distributed as g; g.init_from_env(); "
            "g.shard(torch.zeros(3, 2))")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
              sys.executable, "-c", code])
    assert r.returncode != 0 and "cannot be split evenly over 2 processes" in r.stderr
