"""Test-wide settings.

huggingface_hub reads its environment at import time, so the switches that keep it away from the
real Hub (no Xet uploads, no telemetry) are set here, before any test imports it.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
from hub_fixtures import *  # noqa: E402,F401,F403
from skips import *  # noqa: E402,F401,F403  (a broken import of med3d_hub fails, never skips)

import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, as the training tests' small runs are fastest and deterministic so."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
