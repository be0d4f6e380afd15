"""Data: webdataset pipelines, shard writers, the synthetic shapes dataset."""

from vlm.data.loader import make_loader
from vlm.data.pipeline import ImageTextShards
from vlm.data.shapes import write_shapes
from vlm.data.writers import write_shards

__all__ = ["ImageTextShards", "make_loader", "write_shapes", "write_shards"]
