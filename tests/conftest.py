import pytest
import tiny
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def tiny_clip(tmp_path_factory):
    """A 2-layer CLIP architecture registered with open_clip for the whole session."""
    return tiny.register_tiny_clip(tmp_path_factory.mktemp("open_clip"))
