"""Shared test setup.

"No tests collected" (pytest exit 5) is turned into a failure, so a broken collection can never
look like a green run.
"""
import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("TQDM_DISABLE", "1")

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
