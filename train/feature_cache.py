"""The frozen-feature cache: with a frozen encoder, compute image features once, train from them.

The cache mirrors the training shards one to one (same shard names, same samples in the same
order, ``KEY.npy`` holding the features in place of the image), so the same seed streams the
same examples in the same order, and the losses match training from pixels.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from vlm.data.loader import tile_pixels
from vlm.data.pipeline import SIZES, ImageTextShards, expand_shards
from vlm.data.transforms import encoder_transform
from vlm.model import VisionLanguageModel
from vlm.schema import ConfigError

MANIFEST = "cache.json"


@torch.no_grad()
def build_feature_cache(
    model: VisionLanguageModel,
    shards: str,
    out_dir: str | Path,
    *,
    resize: str,
    device: torch.device,
    batch_size: int = 64,
) -> str:
    """Writes the cache (unless an identical one exists) and returns its directory."""
    if not model.config.encoder.freeze:
        raise ConfigError("run.cache_features needs a frozen encoder: set model.encoder.freeze=true")
    out_dir = Path(out_dir)
    urls = expand_shards(shards)
    identity = {"encoder": model.config.to_dict()["encoder"], "shards": urls, "resize": resize}
    if model.tiling.splits:  # the features are the tiles'
        identity["tiling"] = model.config.to_dict()["processor"]["tiling"]
    manifest = out_dir / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == identity:
        return str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    transform = encoder_transform(model.encoder, mode=resize)
    model.encoder.eval()
    names = [Path(url.split("::")[0]).name for url in urls]
    if len(set(names)) != len(names):
        raise ConfigError("the feature cache needs distinct shard file names")
    for url, name in zip(urls, names):
        samples = ImageTextShards([url], shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1)
        tmp = out_dir / f"{name}.tmp"
        with wds.TarWriter(str(tmp)) as tar:
            for sample in tqdm(samples, desc=f"cache {name}", unit="sample"):
                text = json.dumps(sample["text"]).encode()
                images = sample.get("images", [sample["image"]] if "image" in sample else [])
                if not images:  # a text-only conversation: nothing to encode
                    tar.write({"__key__": sample["key"], "json": text})
                    continue
                pixels, sizes = tile_pixels(images, model.tiling, transform)
                features = model.encode_pixels(pixels.to(device)).float().cpu().numpy()
                buffer = io.BytesIO()
                np.save(buffer, features, allow_pickle=False)
                entry = {"__key__": sample["key"], "npy": buffer.getvalue(), "json": text}
                if model.tiling.splits:  # which tiles are whose: each image's (height, width)
                    entry[SIZES] = json.dumps(sizes).encode()
                tar.write(entry)
        os.replace(tmp, out_dir / name)
    manifest.write_text(json.dumps(identity))
    return str(out_dir)
