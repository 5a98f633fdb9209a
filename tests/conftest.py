"""Shared test setup.

"No tests collected" (pytest exit 5) is turned into a failure, so a broken collection can never
look like a green run.
"""
import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("TQDM_DISABLE", "1")

# Under pytest-xdist (`-n 2`: one test process per core) each worker and the processes its tests start
# compute on one thread: two workers of two threads each would oversubscribe the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# CI replays the same generated architectures every run (a red CI must mean a regression, not a new
# random draw); `HYPOTHESIS_PROFILE=explore pytest` draws fresh ones on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def macs_clock(monkeypatch):
    """A device whose latency follows the MACs exactly: ``measure_latency`` reports 1 ms per 10 M MACs
    (fvcore's count of what really ran, sliced layers included) plus 0.05 ms per call. Tests of the
    decisions taken from timings (latency budgets, calibration) run on it, apart from this machine's
    noise; the real timer is tested in test_measure.py and by the real-timer tests beside them."""
    from ganslim import measure
    from ganslim._utils import as_input_tuple
    from ganslim.measure.latency import LatencyStats

    def fake_latency(model, example_inputs, *, warmup=3, repeats=10, threads=None, device=None, max_seconds=None):
        inputs = as_input_tuple(example_inputs)
        ms = measure.count_macs(model, inputs, "true") / 1e7 + 0.05
        return LatencyStats(ms, ms, ms, ms, repeats, threads or torch.get_num_threads(), "cpu",
                            int(inputs[0].shape[0]), tuple(inputs[0].shape))

    monkeypatch.setattr(measure, "measure_latency", fake_latency)
    return fake_latency
