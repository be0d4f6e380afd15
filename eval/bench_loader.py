"""``vlm bench`` loader rows: images per second from webdataset shards to batched pixel tensors.

One worker (``num_workers=0``: a DataLoader worker runs exactly this loop), each side doing the
same work: read the tar members, decode the JPEG to RGB, resize the short side to the encoder's
size (bicubic, antialiased), centre-crop, scale and normalise, stack a batch.

- vlm: ``ImageTextShards`` (robust decoding: EXIF orientation, every mode to RGB, bad samples
  skipped and counted) and ``encoder_transform``'s torchvision v2 transform; and the same with
  ``draft=True``, where the JPEG decoder itself scales by 1/2, 1/4 or 1/8 when the image is at
  least that much larger than the encoder needs (Pillow's draft mode).
- The baseline: the minimal webdataset + torchvision pipeline, ``WebDataset(...).decode("pil")``
  and torchvision's classic ``Resize / CenterCrop / ToTensor / Normalize``, written here.

The shards hold COCO-sized (640 x 480) synthetic photographs: smooth colour fields with edges,
which JPEG compresses as it does photographs (noise would not be).
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from torch._subclasses.fake_tensor import FakeTensorMode
from torchvision import transforms as T

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig
from vlm.convert import IMAGE_TOKEN_ID, Size
from vlm.convert.reference import llama_config
from vlm.data.pipeline import ImageTextShards
from vlm.data.transforms import image_transform
from vlm.decoders.hf import HFDecoderConfig
from vlm.encoders.base import CLIP_MEAN, CLIP_STD
from vlm.encoders.vit import ViTConfig
from vlm.eval.bench_common import PEAK_FLOPS, race_rounds, spread, step_flops
from vlm.model import build_model

SOURCE_SIZE = (640, 480)  # COCO's most common image size
PIXELS = (224, 336)  # CLIP ViT-L/14 and ViT-L/14-336 (LLaVA-1.5)


def photo(rng: np.random.Generator, size: tuple[int, int] = SOURCE_SIZE) -> Image.Image:
    """A photograph-like image: a smooth random colour field (bicubic-upsampled coarse noise)
    with a few sharp-edged shapes and fine grain."""
    width, height = size
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(20, 120))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def write_shards(directory: Path, images: int, *, per_shard: int = 100, seed: int = 0) -> list[str]:
    """``images`` JPEG (quality 90) + caption samples in shards of ``per_shard``; their paths."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, images, per_shard):
        path = directory / f"photos-{start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + per_shard, images)):
                buffer = _jpeg(photo(rng))
                sink.write({"__key__": f"{i:08d}", "jpg": buffer, "txt": f"photo {i}"})
        paths.append(str(path))
    return paths


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def vlm_batches(shards: list[str], pixels: int, batch: int, *, draft: bool = False) -> Iterator[torch.Tensor]:
    """vlm's path: ``ImageTextShards`` then the encoder transform, stacked ``batch`` at a time."""
    samples = ImageTextShards(
        shards, shuffle_shards=False, shuffle_buffer=0, draft_size=pixels if draft else None
    )
    transform = image_transform(pixels, CLIP_MEAN, CLIP_STD, mode="crop")
    pending = []
    for sample in samples:
        pending.append(transform(sample["image"]))
        if len(pending) == batch:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def baseline_batches(shards: list[str], pixels: int, batch: int) -> Iterator[torch.Tensor]:
    """The minimal webdataset + torchvision pipeline doing the same work."""
    transform = T.Compose(
        [
            T.Resize(pixels, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(pixels),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    dataset = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg")
        .map_tuple(transform)
        .batched(batch, collation_fn=lambda rows: torch.stack([r[0] for r in rows]), partial=True)
    )
    yield from dataset


def _count(batches: Iterator[torch.Tensor], pixels: int) -> int:
    seen = 0
    for tensor in batches:
        if tensor.shape[1:] != (3, pixels, pixels):
            raise AssertionError(f"a batch of shape {tuple(tensor.shape)}, not (B, 3, {pixels}, {pixels})")
        seen += len(tensor)
    return seen


def loader_rows(
    shards: list[str], images: int, *, batch: int = 16, iters: int = 5, pixels=PIXELS
) -> list[dict[str, Any]]:
    """One row per encoder size and vlm variant: images/s of one worker, against the baseline,
    in interleaved passes over all the shards."""
    rows = []
    cpu = torch.device("cpu")
    for size in pixels:
        calls = {
            "vlm": lambda size=size: _check(_count(vlm_batches(shards, size, batch), size), images),
            "vlm, draft": lambda size=size: _check(
                _count(vlm_batches(shards, size, batch, draft=True), size), images
            ),
            "baseline": lambda size=size: _check(_count(baseline_batches(shards, size, batch), size), images),
        }
        rounds = race_rounds(calls, cpu, warmup=1, iters=iters)
        base = images / statistics.median(rounds["baseline"])
        for variant in ("vlm", "vlm, draft"):
            ours = images / statistics.median(rounds[variant])
            measure = f"shards to pixels {size} px, one worker" + (
                ", draft decoding" if "draft" in variant else ""
            )
            rows.append(
                dict(
                    model="loader",
                    measure=measure,
                    unit="images/s",
                    vlm=ours,
                    transformers=base,  # the baseline's column: webdataset + torchvision here
                    ratio=ours / base,
                    ratio_spread=spread(rounds["baseline"], rounds[variant]),
                )
            )
    return rows


def _check(seen: int, images: int) -> None:
    if seen != images:
        raise AssertionError(f"a pass gave {seen} images, not the {images} in the shards")


def workers_needed(
    samples_per_s_needed: float, images_per_s_per_worker: float, images_per_sample: int = 1
) -> int:
    """DataLoader workers that keep a step fed: the images it eats per second over what one
    worker makes."""
    return math.ceil(samples_per_s_needed * images_per_sample / images_per_s_per_worker)


def stage1_config(size: Size) -> ModelConfig:
    """LLaVA-1.5's stage 1 at ``size``: a frozen ViT and LM, the MLP connector trainable."""
    return ModelConfig(
        encoder=ViTConfig(
            image_size=size.image,
            patch_size=size.patch,
            width=size.vision_width,
            depth=size.vision_depth,
            num_heads=size.vision_heads,
            feature_layer=-2,  # LLaVA's
            freeze=True,
        ),
        bridge=ProjectorConfig(name="mlp2x_gelu"),
        decoder=HFDecoderConfig(hf_config={"model_type": "llama", **llama_config(size)}, freeze=True),
        image_token_id=IMAGE_TOKEN_ID,
    )


def stage1_flops(size: Size) -> int:
    """FLOPs of one LLaVA-1.5 stage-1 training sample at ``size`` (``size.prompt`` tokens with
    one image after the first, then ``size.answer`` answer tokens, loss on the answer), counted
    by ``FlopCounterMode``.

    Under ``FakeTensorMode`` only shapes exist, so the count costs nothing even at the large
    size (a real bf16 step of that model takes many minutes on a CPU). The model's ``forward``
    checks placeholder counts from the token values, which fake tensors do not have, so the step
    runs in the pieces it is made of: encoder and connector, then the LM on the spliced
    embeddings with the head on the answer positions only. ``tests/test_bench_loader.py`` checks
    this equals the count of the real ``forward`` on CPU models of the tiny and small sizes."""
    dtype = getattr(torch, size.dtype)
    # Uninitialised weights: allocated lazily, never read, turned into fakes on first use.
    model = build_model(stage1_config(size), empty=True).to_empty(device="cpu").to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        pixels = torch.zeros(1, 3, size.image, size.image, dtype=dtype)
        before = torch.full((1, 1), 5)  # the prompt's first token, then the image, then the rest
        after = torch.full((1, size.prompt + size.answer - 1), 5)
        targets = torch.full((size.answer,), 5)
        length = 1 + model.tokens_per_image + after.shape[1]
        answer_positions = torch.arange(length - size.answer - 1, length - 1)

        def step() -> None:
            visual = model.encode_images(pixels)
            embeds = torch.cat([model.decoder.embed(before), visual, model.decoder.embed(after)], 1)
            logits = model.decoder(embeds, use_cache=False, logits_to_keep=answer_positions).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets).backward()

        return step_flops(step)


def feeding(
    flops_per_sample: int, rows: list[dict[str, Any]], *, pixels: int, mfu: float = 0.5
) -> dict[str, Any]:
    """How many loader workers keep the step fed on an H100 / H200 at ``mfu``: the samples per
    second that step eats (one image each) over one worker's images/s at ``pixels``."""
    peak = PEAK_FLOPS["H100"]  # the H200 has the H100's compute (more memory, not more FLOP/s)
    samples_per_s = mfu * peak / flops_per_sample
    per_worker = {
        "with draft decoding" if "draft" in r["measure"] else "with full decoding": r["vlm"]
        for r in rows
        if r["measure"].startswith(f"shards to pixels {pixels} px, one worker")
    }
    return {
        "gpu": "H100 / H200",
        "mfu": mfu,
        "flops_per_sample": flops_per_sample,
        "samples_per_s": samples_per_s,
        "pixels": pixels,
        "images_per_s_per_worker": per_worker,
        "workers": {variant: workers_needed(samples_per_s, rate) for variant, rate in per_worker.items()},
    }
