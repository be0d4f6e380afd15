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
    commands.write(
        out=args.out,
        images=args.images,
        captions=args.captions,
        coco=args.coco,
        vqa=args.vqa,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        num_shards=args.num_shards,
    )
    return 0


def _shapes(args: argparse.Namespace) -> int:
    manifest = write_shapes(
        args.out, seed=args.seed, train=args.train, val=args.val, test=args.test, image_size=args.image_size
    )
    print(json.dumps({k: manifest[k] for k in ("counts", "held_out") if k in manifest}))
    return 0
