"""Shared test setup: fully offline, deterministic seeds."""

import os

# Set before anything imports transformers / huggingface_hub / datasets, which
# read these once at import time. Tests never reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is faster than several, and far
    faster on a busy 2-core machine (CI). Restored at the end of the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
