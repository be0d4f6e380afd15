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


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes dataset (32 px): 48 train, 8 val and 8 test samples, 16 per shard."""
    from vlm.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, train=48, val=8, test=8, image_size=32, samples_per_shard=16)
    return root
