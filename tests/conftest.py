"""Shared test setup.

"No tests collected" (pytest exit 5) is turned into a failure, so a broken collection can never
look like a green run.
"""
import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
