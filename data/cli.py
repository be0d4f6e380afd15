"""``vlm data check | write | shapes``: the parsers (``vlm.data.commands`` runs them)."""

from __future__ import annotations

import argparse

from vlm.subcommand import add_subcommand


def add_commands(commands_: argparse._SubParsersAction) -> None:
    data = commands_.add_parser("data", help="check, write and generate webdataset shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    check = add_subcommand(
        data_commands,
        "check",
        handler="vlm.data.commands:check_command",
        help="read shards as training would and report what it gets",
    )
    check.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="images with more pixels are skipped as too_large (default: 64 million)",
    )

    write = add_subcommand(
        data_commands,
        "write",
        handler="vlm.data.commands:write_command",
        help="write shards from images and their texts",
    )
    write.add_argument("--out", required=True, help="output directory")
    write.add_argument("--images", required=True, help="image folder the texts refer to")
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="JSONL / CSV / JSON list of {image, caption(s)}")
    source.add_argument("--coco", help="COCO captions annotation JSON")
    source.add_argument("--vqa", help="JSON / JSONL of {image, question, answers}")
    source.add_argument(
        "--llava",
        metavar="FILE",
        help="LLaVA JSON list of {id, image, conversations} (Pretrain, mix665k, ...)",
    )
    source.add_argument(
        "--vqav2",
        nargs="+",
        metavar="FILE",
        help="VQAv2 QUESTIONS.json ANNOTATIONS.json (v2_OpenEnded_mscoco_*_questions.json, "
        "v2_mscoco_*_annotations.json); test-dev questions have no answers to write",
    )
    source.add_argument(
        "--coco-karpathy", metavar="FILE", help="Karpathy split file (dataset_coco.json); see --split"
    )
    source.add_argument(
        "--obelics", metavar="FILE", help="OBELICS documents (parquet or JSONL); see --url-map"
    )
    source.add_argument("--mmc4", metavar="FILE", help="MMC4 documents (JSONL, or .jsonl.zip); see --url-map")
    write.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="SPLIT",
        help="with --coco-karpathy: train, val, test or restval (repeat or comma-separate; default all)",
    )
    write.add_argument(
        "--url-map",
        metavar="FILE",
        help="with --obelics / --mmc4: table (parquet, CSV, JSONL; or a folder of img2dataset parquets) "
        "of url and key (the image file {key}.jpg under --images) or path",
    )
    write.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ...")
    write.add_argument("--samples-per-shard", type=int, default=1000, help="samples in each shard, at most")
    write.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="spread the samples evenly over this many shards (default: --samples-per-shard each)",
    )

    shapes = add_subcommand(
        data_commands,
        "shapes",
        handler="vlm.data.commands:shapes_command",
        help="generate the synthetic shapes dataset (skipped when --out holds it already)",
    )
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--seed", type=int, default=0, help="the dataset's seed")
    shapes.add_argument("--train", type=int, default=20000, help="caption / QA samples in the train split")
    shapes.add_argument("--val", type=int, default=500, help="samples in the val split")
    shapes.add_argument("--test", type=int, default=500, help="samples in each test split")
    shapes.add_argument("--image-size", type=int, default=64, help="image width and height, in pixels")
    shapes.add_argument(
        "--canvas",
        type=int,
        nargs=2,
        metavar=("WIDTH", "HEIGHT"),
        help="high resolution: images this large, their objects as small as at --image-size",
    )
