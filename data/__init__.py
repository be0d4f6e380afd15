"""Data: webdataset pipelines, shard writers, the synthetic shapes dataset."""
