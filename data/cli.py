"""``vlm data check | write | shapes``."""

from __future__ import annotations

import argparse
import json

from vlm.data import commands
from vlm.data.shapes import write_shapes
from vlm.subcommand import add_subcommand


def add_commands(commands_: argparse._SubParsersAction) -> None:
    data = commands_.add_parser("data", help="check, write and generate webdataset shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    check = add_subcommand(
        data_commands, "check", help="read shards as training would and report what it gets"
    )
    check.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")
    check.set_defaults(func=_check)

    write = add_subcommand(data_commands, "write", help="write shards from images and their texts")
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
    write.add_argument("--prefix", default="shard")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--num-shards", type=int, default=None, help="spread samples over this many shards")
    write.set_defaults(func=_write)

    shapes = add_subcommand(data_commands, "shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--train", type=int, default=20000)
    shapes.add_argument("--val", type=int, default=500)
    shapes.add_argument("--test", type=int, default=500)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.set_defaults(func=_shapes)


def _check(args: argparse.Namespace) -> int:
    """Exit code 0 when every sample was read, 1 when some were skipped, 2 when none was."""
    report = commands.check(args.shards, as_json=args.json, max_pixels=args.max_pixels)
    skipped = sum(report["skipped"].values())
    return 2 if not report["ok"] else 1 if skipped else 0


def _write(args: argparse.Namespace) -> int:
    """Exit code 0 when everything was written, 1 when something was skipped (a record, or a
    question or image of one), 2 when nothing was written."""
    result = commands.write(
        out=args.out,
        images=args.images,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        num_shards=args.num_shards,
        splits=args.splits,
        url_map=args.url_map,
        **{name: getattr(args, name) for name in commands.SOURCES},
    )
    skipped = sum(result["skipped"].values()) + sum(
        sum(p["skipped"].values()) for p in result["parts"].values()
    )
    return 2 if not result["written"] else 1 if skipped else 0


def _shapes(args: argparse.Namespace) -> int:
    manifest = write_shapes(
        args.out, seed=args.seed, train=args.train, val=args.val, test=args.test, image_size=args.image_size
    )
    print(json.dumps({k: manifest[k] for k in ("counts", "held_out") if k in manifest}))
    return 0
