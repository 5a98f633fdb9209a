"""Multi-process training with ``torchrun`` / ``torch.distributed`` (DistributedDataParallel semantics).

Run any ganslim training under ``torchrun --nproc_per_node N script.py``: when a process group is
initialised (or the ``torchrun`` environment variables are set, see :func:`init_from_env`) every
training loop of ganslim (gating, fine-tune, QAT, supernet)

* takes its share of each global batch: rank ``r`` of ``W`` uses rows ``r*B/W ... (r+1)*B/W`` of the
  batch the loader yields (so a run on W processes sees exactly the batches of a one-process run; a
  ``DataLoader`` with a ``DistributedSampler`` is taken as already sharded);
* averages the gradients of *every* trained tensor over the ranks after each backward pass: the
  student's weights and, unlike a plain ``DistributedDataParallel`` wrapper, the channel gates, the
  distillation mapping layers and the quantizers' parameters, which live outside the student;
* therefore takes identical optimizer steps on every rank, so deterministic decisions (the L1
  proximal step, progressive pruning, supernet sub-network sampling from a shared seed) agree;
* shows progress bars and writes files on rank 0 only.

BatchNorm uses each rank's local statistics (as DDP does without SyncBatchNorm, which needs CUDA).
"""
from __future__ import annotations

import atexit
import os
from typing import Any, Iterable, Optional

import torch

__all__ = ["is_distributed", "rank", "world_size", "is_main", "init_from_env", "shard", "average_tensors", "average_gradients",
           "barrier", "broadcast_object", "presharded", "collective_device"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that prints and writes files."""
    return rank() == 0


def init_from_env(backend: Optional[str] = None, device: "str | torch.device" = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) when present. ``backend`` defaults to what ``device`` (the device the run trains
    on, ``CompressConfig.device``) needs: nccl for a CUDA device (each process on GPU ``LOCAL_RANK``),
    gloo otherwise, whether or not the machine has CUDA. Returns whether a multi-process group is active.
    A group started here is destroyed at exit: left to interpreter shutdown, gloo's worker threads can
    abort the process ("terminate called without an active exception", pytorch/pytorch#190489)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
        torch.distributed.init_process_group(backend)
        atexit.register(_destroy_at_exit)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return is_distributed()


def _destroy_at_exit() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def collective_device(device: "str | torch.device") -> torch.device:
    """Where a collective's tensor must live for data now on ``device``: the current CUDA device under
    nccl (which rejects CPU tensors), ``device`` itself under gloo (CPU, and CUDA tensors too)."""
    device = torch.device(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def presharded(loader: Any) -> bool:
    """Whether ``loader`` already yields this rank's share (a DataLoader with a DistributedSampler)."""
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(loader, "sampler", None), DistributedSampler) or \
        isinstance(getattr(getattr(loader, "batch_sampler", None), "sampler", None), DistributedSampler)


def shard(t: Optional[torch.Tensor], presharded: bool = False) -> Optional[torch.Tensor]:
    """This rank's rows of a global batch tensor ``(B, ...)``; B must divide by the world size."""
    if t is None or presharded or not is_distributed():
        return t
    w, r = world_size(), rank()
    if t.shape[0] % w:
        raise ValueError(f"global batch of {t.shape[0]} cannot be split evenly over {w} processes; use a batch size "
                         f"divisible by {w} (or a DataLoader with a DistributedSampler)")
    n = t.shape[0] // w
    return t[r * n:(r + 1) * n]


def average_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """All-reduce (mean) ``tensors`` over the ranks, in place, one flat buffer per (device, dtype) (in
    the order each first appears, the same on every rank), each reduced on the backend's device. Every
    rank must pass the same list."""
    if not is_distributed():
        return
    buckets: dict[tuple, list] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), items in buckets.items():
        flat = torch.cat([t.reshape(-1) for t in items]).to(collective_device(device))
        torch.distributed.all_reduce(flat)
        flat /= world_size()
        flat = flat.to(device)
        i = 0
        for t in items:
            n = t.numel()
            t.copy_(flat[i:i + n].view_as(t))
            i += n


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` over the ranks (:func:`average_tensors`). A
    parameter without a gradient on this rank counts as zero (every rank must pass the same list)."""
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    average_tensors(grads)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (decisions taken from measurements, e.g. latency,
    that differ between processes must be made once)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()

