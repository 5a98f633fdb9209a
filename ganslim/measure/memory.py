"""Model size (parameters, bytes) and measured peak memory of one forward pass.

Units: MB = 10**6 bytes throughout.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .latency import _as_tuple, _eval_on, _model_device

__all__ = ["count_params", "model_size_mb", "peak_memory_mb", "available_memory_bytes"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def available_memory_bytes(device: Union[str, torch.device, None] = None, meminfo: str = "/proc/meminfo") -> Optional[int]:
    """Bytes that new tensors on ``device`` can take now without swapping: on CUDA the driver's free
    memory, on the CPU the kernel's ``MemAvailable`` (free memory plus the page cache it can drop;
    ``meminfo`` is the file read), else the free pages (``sysconf``). None when the platform does not
    say (then no limit is derived from it)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    if dev.type != "cpu":
        return None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (``numel``) of ``model``, trainable or not; buffers such as
    BatchNorm running statistics are not parameters. A parameter shared by several modules is
    counted once. ResNet-9 (ngf 64, instance norm) has 11,378,179."""
    return int(sum(p.numel() for p in model.parameters()))


def _tensor_bytes(value, seen: set) -> int:
    if isinstance(value, torch.Tensor):
        nbytes = value.numel() * value.element_size()
        key = (value.device, value.data_ptr(), nbytes, tuple(value.shape), value.dtype)
        if value.data_ptr() != 0 and key in seen:  # the same tensor stored under two keys
            return 0
        seen.add(key)
        return nbytes
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    return 0


def model_size_mb(model_or_path: Union[nn.Module, str, os.PathLike]) -> float:
    """Size in MB (10**6 bytes).

    * a path (``str`` / ``os.PathLike``): the file's size on disk, ``os.path.getsize(path) / 1e6``;
    * a module: bytes of the tensors of its ``state_dict`` (parameters **and** persistent
      buffers, at their current dtype: ``numel * element_size``), a tensor tied under two keys
      counted once. This is the payload of a saved checkpoint without container overhead.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return os.path.getsize(model_or_path) / 1e6
    if not isinstance(model_or_path, nn.Module):
        raise TypeError(f"expected an nn.Module or a path, got {type(model_or_path).__name__}")
    seen: set = set()
    return _tensor_bytes(dict(model_or_path.state_dict()), seen) / 1e6


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Point file descriptor 2 at /dev/null for the duration (C++ log lines bypass sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to silence
        saved = None
    if saved is None:
        yield
        return
    try:
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(model: nn.Module, inputs: tuple) -> int:
    """Replay the CPU allocator events recorded by the PyTorch profiler during one forward pass
    and return the peak of (bytes allocated - bytes freed) since the pass started."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _quiet_stderr_fd():  # kineto prints "USDT: ... profiler_start/stop" lines to fd 2
        prof.start()
    try:
        out = model(*inputs)
        del out
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    from torch.autograd import DeviceType

    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: simultaneous events keep record order
    live = peak = 0
    for e in events:
        live += int(e.nbytes())
        peak = max(peak, live)
    return peak


def peak_memory_mb(model: nn.Module, example_inputs: Inputs,
                   device: Union[str, torch.device, None] = None) -> float:
    """Measured peak memory of one forward pass, in MB (10**6 bytes).

    The figure is the peak of memory allocated *during* the pass on top of what was allocated
    before it: activations, workspaces and the output, but not the weights or the inputs, which
    already exist. The model runs in ``eval()`` mode under ``torch.inference_mode()`` (so no
    autograd graph keeps activations alive), after one un-measured warm-up pass.

    * CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the
      pass, after ``torch.cuda.reset_peak_memory_stats()`` (caching-allocator blocks, so sizes are
      rounded up to the allocator's 512-byte granularity).
    * CPU: the pass runs under ``torch.profiler.profile(profile_memory=True)``; every allocation
      and free of the CPU allocator is an event with its byte count and timestamp, and the events
      are replayed in time order to find the peak of live bytes. Memory that does not go through
      PyTorch's allocator (e.g. oneDNN's private scratch buffers, Python objects) is not seen.

    Args:
        model: the network (moved to ``device`` for the measurement and back afterwards).
        example_inputs: tensor ``(N, C, H, W)`` or tuple of tensors, copied to ``device``.
        device: ``None`` = where the model's parameters are.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in _as_tuple(example_inputs))
    with _eval_on(model, dev), torch.inference_mode():
        model(*inputs)  # warm-up: lazy initialisation, algorithm selection
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            out = model(*inputs)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
            del out
        elif dev.type == "cpu":
            peak = _cpu_peak_bytes(model, inputs)
        else:
            raise NotImplementedError(f"peak memory on {dev.type!r} is not supported (cpu, cuda)")
    return max(int(peak), 0) / 1e6
