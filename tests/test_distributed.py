"""torchrun / DDP: two CPU processes on gloo give the one-process result for the same global batch."""
import json
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


# separable: trained in channels-last; separable+reconstruct: every rank starts from rank 0's refit
@pytest.mark.parametrize("strategy", ["slim", "ofa", "separable", "separable+reconstruct"])
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
    # Tolerance relative to the output's scale: max |diff| measured 3e-6 (slim) and 2e-6 (ofa) on one
    # machine, 2.6e-5 and 6e-4 in two runs of slim on an AVX2 EPYC (gloo's reduction order and the
    # kernels round differently; Adam amplifies it). Without the all-reduce (one rank alone on its
    # half of each batch, the control below) the outputs differ by 0.6 to 1.4.
    scale = float(a["output"].abs().max())
    diff = float((a["output"] - b["output"]).abs().max())
    assert diff < 1e-2 * scale, (diff, scale)
    for k, v in a["state"].items():
        if k.endswith(".weight"):
            assert (v.float() - b["state"][k].float()).abs().max() < 5e-2 * v.float().abs().max(), k
    half = tmp_path / "half.pt"
    r3 = _run([sys.executable, WORKER, str(half), strategy, "half"])
    assert r3.returncode == 0, r3.stderr[-2000:]
    control = float((a["output"] - torch.load(half)["output"]).abs().max())
    assert control > 10 * 1e-2 * scale, control  # the check above can fail: a rank left alone is caught


def test_batchnorm_recalibration_agrees_across_ranks(tmp_path):
    """Each rank estimates from its own batches; afterwards both hold the average of the two
    estimates (what each would have found alone), not their own."""
    worker = os.path.join(HERE, "ddp_bn_worker.py")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
              str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    alone = []
    for rank in (0, 1):
        r = _run([sys.executable, worker, str(tmp_path / "one"), str(rank)])
        assert r.returncode == 0, r.stderr[-2000:]
        alone.append(torch.load(tmp_path / f"one.{rank}"))
    two = [torch.load(tmp_path / f"two.{rank}") for rank in (0, 1)]
    assert float((alone[0]["var"] - alone[1]["var"]).abs().min()) > 0.5  # the ranks' data differ
    for key in ("mean", "var"):
        assert torch.equal(two[0][key], two[1][key])
        torch.testing.assert_close(two[0][key], (alone[0][key] + alone[1][key]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["uniform-latency", "halp"])
def test_widths_chosen_from_timings_are_the_same_on_every_rank(tmp_path, variant):
    """Each rank's device favours other widths (the worker's timers differ by rank on purpose): alone,
    the two ranks choose differently; under torchrun both train rank 0's choice."""
    worker = os.path.join(HERE, "ddp_widths_worker.py")
    alone = []
    for rank in (0, 1):
        r = _run([sys.executable, worker, str(tmp_path / "alone"), variant, str(rank)])
        assert r.returncode == 0, r.stderr[-2000:]
        alone.append(json.load(open(tmp_path / f"alone.{rank}")))
    assert alone[0] != alone[1]  # the check below can fail: the ranks' timings do disagree
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
              str(tmp_path / "two"), variant])
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.load(open(tmp_path / f"two.{rank}")) for rank in (0, 1)]
    assert two[0] == two[1] == alone[0]


def test_ranks_that_fit_different_step_counts_into_a_time_budget_all_run_the_fewest(tmp_path):
    worker = os.path.join(HERE, "ddp_budget_worker.py")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
              str(tmp_path / "budget")])
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"budget.{rank}")) for rank in (0, 1)]
    alone = [rk["alone"][0] for rk in ranks]
    assert alone[0] > alone[1] > 0  # 1 s vs 3 s per step claimed: each fitted its own number
    for rk in ranks:  # every rank ran the fewest, so none waited alone in an all-reduce
        assert rk["ran"] == rk["reported"] == alone[1]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # and they trained the same weights


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error():
    code = ("import torch, torch.distributed as d; from ganslim import distributed as g; g.init_from_env(); "
            "g.shard(torch.zeros(3, 2))")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
              sys.executable, "-c", code])
    assert r.returncode != 0 and "cannot be split evenly over 2 processes" in r.stderr


# ------------------------------------------------------------------ collectives on the configured device
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of two spawned processes: joins through init_from_env(device="cpu") on a machine that claims
    CUDA, then runs the gradient averaging, the NaN agreement and the distillation normaliser."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cuda.is_available = lambda: True  # a CUDA machine: a CPU run must still get gloo, not nccl
    from ganslim.core import distributed as dist
    from ganslim.core.distill import _variance
    from ganslim.core.train import _finite_everywhere

    assert dist.init_from_env(device="cpu")
    out = {"backend": torch.distributed.get_backend()}
    calls = []
    real = torch.distributed.all_reduce

    def spy(t, *a, **k):
        calls.append((str(t.device), t.dtype, t.numel()))
        return real(t, *a, **k)

    torch.distributed.all_reduce = spy
    p32 = torch.nn.Parameter(torch.zeros(3, 2))
    p64 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p16 = torch.nn.Parameter(torch.zeros(5, dtype=torch.float16))
    q32 = torch.nn.Parameter(torch.zeros(2))  # no gradient on rank 1: counts as zero there
    frozen = torch.nn.Parameter(torch.zeros(7), requires_grad=False)
    base = {"p32": torch.arange(6.0).view(3, 2) - 2.5, "p64": torch.tensor([1e-12, 1.0, -3.0, 1e12], dtype=torch.float64),
            "p16": torch.tensor([0.5, 1.0, -2.0, 4.0, 8.0], dtype=torch.float16), "q32": torch.tensor([4.0, -6.0])}
    params = {"p32": p32, "p64": p64, "p16": p16, "q32": q32}
    for name, p in params.items():
        if not (name == "q32" and rank == 1):
            p.grad = base[name] * (rank + 1)  # rank 0: base, rank 1: 2 * base; mean 1.5 * base
    dist.average_gradients([p32, p64, frozen, p16, q32])
    out["grads"] = {k: p.grad.clone() for k, p in params.items()}
    out["frozen_grad"] = frozen.grad
    out["grad_calls"] = list(calls)
    calls.clear()
    out["finite_both"] = _finite_everywhere(torch.tensor(2.0))
    out["finite_one_nan"] = _finite_everywhere(torch.tensor(float("nan") if rank == 1 else 1.0))
    out["finite_one_inf"] = _finite_everywhere(torch.tensor(float("inf") if rank == 0 else 1.0, dtype=torch.float64))
    out["flag_calls"] = list(calls)
    calls.clear()
    feats = torch.arange(8.0).view(1, 2, 2, 2) + 8 * rank  # the global batch is 0..15 over both ranks
    out["variance"] = float(_variance(feats))
    torch.distributed.all_reduce = real
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_collectives_run_on_the_configured_device_with_one_bucket_per_dtype(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for out in outs:
        assert out["backend"] == "gloo"  # device="cpu" on a machine with CUDA: gloo
        g = out["grads"]
        assert torch.equal(g["p32"], 1.5 * (torch.arange(6.0).view(3, 2) - 2.5)) and g["p32"].dtype == torch.float32
        assert g["p64"].dtype == torch.float64
        assert torch.equal(g["p64"], torch.tensor([1.5e-12, 1.5, -4.5, 1.5e12], dtype=torch.float64))  # float64 kept
        assert g["p16"].dtype == torch.float16
        assert torch.equal(g["p16"], torch.tensor([0.75, 1.5, -3.0, 6.0, 12.0], dtype=torch.float16))
        assert torch.equal(g["q32"], torch.tensor([2.0, -3.0]))  # rank 1 had no gradient: averaged with zero
        assert out["frozen_grad"] is None
        # one all-reduce per dtype (in first-appearance order), each over every tensor of that dtype, on the CPU
        assert out["grad_calls"] == [("cpu", torch.float32, 8), ("cpu", torch.float64, 4), ("cpu", torch.float16, 5)]
        assert out["finite_both"] is True
        assert out["finite_one_nan"] is False and out["finite_one_inf"] is False  # every rank agrees
        assert [c[0] for c in out["flag_calls"]] == ["cpu"] * 3  # the flag lives where the loss lives
        assert out["variance"] == pytest.approx(float(torch.arange(16.0).var()), rel=1e-6)  # global variance


def test_init_from_env_takes_the_backend_from_the_configured_device(monkeypatch):
    from ganslim.core import distributed as dist

    chosen, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, *a, **k: chosen.append(backend))
    dist.init_from_env(device="cpu")
    dist.init_from_env(device=torch.device("cpu"))
    assert chosen == ["gloo", "gloo"] and devices == []  # CUDA present, but the run is on the CPU
    dist.init_from_env(device="cuda")
    assert chosen[-1] == "nccl" and devices == [1]  # NCCL: each process on its local GPU
    dist.init_from_env()  # no device named: ganslim's default device, the CPU
    assert chosen[-1] == "gloo"
    dist.init_from_env(backend="gloo", device="cuda")  # an explicit backend wins
    assert chosen[-1] == "gloo"


def test_collective_tensors_go_to_the_backends_device(monkeypatch):
    from ganslim.core import distributed as dist

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dist.collective_device(torch.device("cpu")) == torch.device("cuda", 1)  # NCCL takes CUDA tensors only
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert dist.collective_device(torch.device("cpu")) == torch.device("cpu")
    assert dist.collective_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
