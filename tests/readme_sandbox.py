"""Tiny stand-ins at the paths the README's commands name, for ``tests/test_readme.py``: images,
models (a tiny Llama with a tokenizer as ``models/vicuna-7b``, a tiny transformers LLaVA as
``path/to/llava-1.5-7b-hf``, ...), shards, and the published data files in their own schemas
(the record shapes of ``tests/test_importers.py``), every record clean, so that the commands
that read them exit 0."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import tiny
import torch
from saved import save_tiny_model
from test_importers import img2dataset_files, karpathy_image, obelics_row, vqa_answers
from transformers import AutoConfig, AutoModelForCausalLM

from vlm.convert import FORMATS
from vlm.data.shapes import generate
from vlm.data.shapes import tokenizer as shapes_tokenizer
from vlm.data.writers import Record, encode_png, write_shards
from vlm.eval import bench

ROOT = Path(__file__).resolve().parents[1]


def picture(path: Path, index: int) -> Path:
    """A shapes scene (the test split's sample ``index``) saved at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    generate("test", index).image.save(path)
    return path


def caption(index: int) -> str:
    return generate("test", index).captions[0]


def write_json(path: Path, data, *, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in data) if lines else json.dumps(data))


def tiny_llama(path: Path, tokenizer=None) -> Path:
    """A 2-layer Llama saved by transformers; with ``tokenizer``, over its vocabulary and saved with it."""
    settings = dict(tiny.DECODERS["llama"], max_position_embeddings=512)
    if tokenizer is not None:
        settings |= {
            "vocab_size": len(tokenizer),
            **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")},
        }
        tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).save_pretrained(path)
    return path


def shapes_shards(path: Path, split: str, count: int) -> None:
    """Shapes samples (captions and questions) as shards."""
    samples = [generate(split, i) for i in range(count)]
    write_shards(
        [Record(encode_png(s.image), s.text, f"{split}-{i}", ext="png") for i, s in enumerate(samples)], path
    )


def make_sandbox(root: Path) -> None:
    """Writes every stand-in the README's commands read (what they write, they make themselves)."""
    (root / "train").mkdir()
    (root / "train" / "recipes").symlink_to(ROOT / "train" / "recipes")
    images(root)
    models(root)
    llava_stage1(root)
    data_files(root)


def images(root: Path) -> None:
    """Images, shards and the small files the prediction and evaluation commands read."""
    for name, index in (("photo.jpg", 0), ("photo.png", 1), ("a.png", 2), ("b.png", 3)):
        picture(root / name, index)
    for i in range(2):
        picture(root / "more" / "photos" / f"{i}.png", 4 + i)
        picture(root / "photos" / f"{i}.png", 6 + i)
        picture(root / "shots" / f"{i}.png", 8 + i)
    shots = [
        {"image": f"shots/{i}.png", "question": "what color is it?", "answer": answer}
        for i, answer in enumerate(("red", "blue"))
    ]
    write_json(root / "shots.jsonl", shots, lines=True)
    shapes_shards(root / "shards", "test", 6)
    shapes_shards(root / "vqav2-val", "test", 3)
    shapes_shards(root / "vqav2-train", "train", 6)
    predictions = [
        {"prediction": "red", "answers": ["red"] * 9 + ["blue"]},
        {"prediction": "2", "answers": ["two"] * 10},
    ]
    write_json(root / "preds.jsonl", predictions, lines=True)


def models(root: Path) -> None:
    """``DIR`` (a tiny model with its tokenizer, one that exports to LLaVA), a local Llama, and a
    transformers LLaVA checkpoint."""
    save_tiny_model(root / "models" / "tiny")
    tiny_llama(root / "path" / "to" / "local" / "llama")
    FORMATS["llava"].save_reference(bench.SIZES["tiny"], root / "path" / "to" / "llava-1.5-7b-hf")


def llava_stage1(root: Path) -> None:
    """Vicuna (a tiny Llama with a tokenizer), the CLIP checkpoint the recipe names (the tiny
    CLIP's weights), and LLaVA-Pretrain's JSON and images."""
    tiny_llama(root / "models" / "vicuna-7b", shapes_tokenizer())
    (root / "models" / "clip").mkdir(parents=True)
    torch.save(open_clip.create_model(tiny.TINY_CLIP).state_dict(), root / "models/clip/ViT-L-14-336.pt")
    rows = []
    for i in range(4):
        image = f"00453/00453937{i}.jpg"
        picture(root / "llava-pretrain" / image, i)
        prompt = {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"}
        rows.append(
            {
                "id": f"00453937{i}",
                "image": image,
                "conversations": [prompt, {"from": "gpt", "value": caption(i)}],
            }
        )
    write_json(root / "blip_laion_cc_sbu_558k.json", rows)


def data_files(root: Path) -> None:
    """What ``vlm data write`` reads: an image folder with captions or questions, COCO captions,
    LLaVA-Instruct, VQAv2, Karpathy's split, OBELICS with img2dataset's files, MMC4."""
    for i in range(4):
        picture(root / "imgs" / f"{i}.png", i)
        picture(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    write_json(
        root / "questions.json", [{"image": f"{i}.png", **generate("test", i).qa[0]} for i in range(4)]
    )
    coco = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(4)],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": caption(i)} for i in range(4)],
    }
    write_json(root / "captions_val2014.json", coco)

    picture(root / "llava-images" / "coco/train2017/000000033471.jpg", 0)
    conversation = [("human", "<image>\nWhat is on the left?"), ("gpt", "A red circle.")]
    text_only = [("human", "How to tell if a customer segment is well segmented?"), ("gpt", "Homogeneity.")]
    mix665k = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": conversation},
        {"id": "i6IyJda_0", "conversations": text_only},  # text-only, as ShareGPT's part
    ]
    for row in mix665k:
        row["conversations"] = [{"from": who, "value": value} for who, value in row["conversations"]]
    write_json(root / "llava_v1_5_mix665k.json", mix665k)

    vqav2 = {262148: ("Where is he looking?", ("down",) * 10), 393225: ("Is the bowl full?", ("no",) * 10)}
    meta = {"data_type": "mscoco", "data_subtype": "val2014"}
    questions = [{"image_id": k, "question": q, "question_id": k * 1000} for k, (q, _) in vqav2.items()]
    annotations = [
        {
            "question_type": "what",
            "multiple_choice_answer": a[0],
            "answers": vqa_answers(*a),
            "image_id": k,
            "answer_type": "other",
            "question_id": k * 1000,
        }
        for k, (_, a) in vqav2.items()
    ]
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        meta | {"task_type": "Open-Ended", "questions": questions},
    )
    write_json(root / "v2_mscoco_val2014_annotations.json", meta | {"annotations": annotations})
    for i, image_id in enumerate(vqav2):
        picture(root / "coco" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", i)
    karpathy = [
        karpathy_image("test", "COCO_val2014_000000522418.jpg", 522418, caption(2)),
        karpathy_image("train", "COCO_train2014_000000057870.jpg", 57870, caption(3)),  # another split
    ]
    picture(root / "coco" / "val2014" / "COCO_val2014_000000522418.jpg", 2)
    write_json(root / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})

    cat, dog = "https://www.example-pets.com/cat.jpg", "https://cdn.example-pets.com/dog.png"
    img2dataset_files(root / "downloaded", [(cat, (220, 30, 30)), (dog, (30, 70, 220))])
    document = obelics_row(
        [None, "Cats sleep all day.", None, "Dogs need walks."],
        [cat, None, dog, None],
        "https://www.example-pets.com/sleep.html",
    )
    pq.write_table(pa.Table.from_pylist([document]), root / "obelics-000.parquet")

    image_info = []
    for i in range(2):
        picture(root / "mmc4-images" / f"{i:012x}.jpg", i)
        image_info.append(
            {
                "image_name": f"{i:012x}.jpg",
                "matched_sim": 0.3,
                "matched_text_index": i,
                "raw_url": f"http://example.org/{i}.jpg",
                "face_detections": None,
            }
        )
    mmc4 = {
        "image_info": image_info,
        "similarity_matrix": [[0.3, 0.2], [0.2, 0.3]],
        "text_list": [caption(0), caption(1)],
        "url": "https://example.org/shapes.html",
        "could_have_url_duplicate": 0,
    }
    write_json(root / "docs_shard_0_v2.jsonl", [mmc4], lines=True)
