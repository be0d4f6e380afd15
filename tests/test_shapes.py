"""The synthetic shapes dataset: deterministic samples, held-out pairs, text that matches the
pixels, a lossless word-level tokenizer and idempotent shard writing."""

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlm.data import shapes
from vlm.data.pipeline import ImageTextShards
from vlm.data.writers import encode_png
from vlm.tiling.split import marker_tokens

SPLITS = ("train", "val", "test")


def _samples(split, count, **kwargs):
    return [shapes.generate(split, i, **kwargs) for i in range(count)]


@pytest.fixture(scope="module")
def val_samples():
    return _samples("val", 300)


@pytest.fixture(scope="module")
def tok():
    return shapes.tokenizer()


def _pairs(sample):
    return {(o["color"], o["shape"]) for o in sample.objects}


def _answers(sample, question):
    return [p["answer"] for p in sample.qa if p["question"] == question]


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_same_arguments_give_identical_samples(split):
    a, b = shapes.generate(split, 7, seed=3), shapes.generate(split, 7, seed=3)
    assert encode_png(a.image) == encode_png(b.image)
    assert a.text == b.text


def test_different_seeds_and_splits_differ():
    base = [shapes.generate("val", i, seed=0) for i in range(10)]
    other_seed = [shapes.generate("val", i, seed=1) for i in range(10)]
    other_split = [shapes.generate("test", i, seed=0) for i in range(10)]
    for other in (other_seed, other_split):
        differing = sum(encode_png(x.image) != encode_png(y.image) for x, y in zip(base, other))
        assert differing >= 8  # a rare coincidence may repeat a layout, never most of them


def test_sample_does_not_depend_on_generation_order():
    sequence = _samples("train", 10)
    alone = shapes.generate("train", 5)
    assert encode_png(alone.image) == encode_png(sequence[5].image)
    assert alone.text == sequence[5].text


def test_image_format_and_size():
    for size in (32, 64):
        image = shapes.generate("train", 0, image_size=size).image
        assert image.mode == "RGB" and image.size == (size, size)
    with pytest.raises(ValueError):
        shapes.generate("dev", 0)


# ---------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------


def test_palette_and_held_out_pairs_are_well_formed():
    assert list(shapes.COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert shapes.SHAPES == ("circle", "square", "triangle")
    rgb = list(shapes.COLORS.values())
    # Colours far apart from each other and from the background, so a tiny model can tell them.
    for i, a in enumerate(rgb + [shapes.BACKGROUND]):
        for b in rgb[i + 1 :]:
            assert sum(abs(x - y) for x, y in zip(a, b)) > 100, (a, b)
    colors = [c for c, _ in shapes.HELD_OUT]
    kinds = [s for _, s in shapes.HELD_OUT]
    assert len(shapes.HELD_OUT) == 3
    assert len(set(colors)) == 3 and len(set(kinds)) == 3
    assert set(colors) <= set(shapes.COLORS) and set(kinds) <= set(shapes.SHAPES)


def test_held_out_pairs_never_in_train_but_in_val_and_test(val_samples):
    held_out = set(shapes.HELD_OUT)
    train_pairs = set().union(*(_pairs(s) for s in _samples("train", 3000)))
    assert not train_pairs & held_out
    assert len(train_pairs) == len(shapes.COLORS) * len(shapes.SHAPES) - len(held_out)
    for samples in (val_samples, _samples("test", 300)):
        assert held_out <= set().union(*(_pairs(s) for s in samples))


def test_layout_one_object_per_column_without_overlap(val_samples):
    counts = Counter()
    for sample in val_samples:
        objects = sample.objects
        counts[len(objects)] += 1
        assert 1 <= len(objects) <= 3
        columns = [shapes.COLUMNS.index(o["column"]) for o in objects]
        assert columns == sorted(set(columns))  # distinct, left to right
        assert len(_pairs(sample)) == len(objects)  # no two identical objects
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for left, right in zip(objects, objects[1:]):
            assert left["box"][2] <= right["box"][0]  # boxes never touch across columns
    assert set(counts) == {1, 2, 3}


def test_exact_text_templates():
    objects = [
        {"color": "red", "shape": "circle", "column": "left"},
        {"color": "orange", "shape": "square", "column": "center"},
        {"color": "red", "shape": "triangle", "column": "right"},
    ]
    assert shapes.captions_for(objects) == [
        "a red circle on the left, an orange square in the center and a red triangle on the right",
        "there are 3 shapes: a red circle, an orange square and a red triangle",
        "an orange square between a red circle and a red triangle",
    ]
    assert shapes.captions_for(objects[:1]) == [
        "a red circle on the left",
        "there is 1 shape: a red circle",
        "a single red circle on the left",
    ]
    assert shapes.captions_for(objects[1:])[2] == "an orange square to the left of a red triangle"
    qa = {p["question"]: p["answer"] for p in shapes.qa_for(objects)}
    assert qa == {
        "how many shapes are there?": "3",
        "what color is the circle?": "red",
        "what color is the square?": "orange",
        "what color is the triangle?": "red",
        "what shape is the orange object?": "square",  # red is not unique: no red question
        "where is the red circle?": "left",
        "where is the orange square?": "center",
        "where is the red triangle?": "right",
        "what is on the left?": "red circle",
        "what is in the center?": "orange square",
        "what is on the right?": "red triangle",
    }


def test_text_is_consistent_with_objects(val_samples):
    for sample in val_samples:
        objects = sample.objects
        assert _answers(sample, "how many shapes are there?") == [str(len(objects))]
        shape_counts = Counter(o["shape"] for o in objects)
        color_counts = Counter(o["color"] for o in objects)
        for o in objects:
            name = f"{o['color']} {o['shape']}"
            assert _answers(sample, f"where is the {name}?") == [o["column"]]
            where = "in the center" if o["column"] == "center" else f"on the {o['column']}"
            assert _answers(sample, f"what is {where}?") == [name]
            color_answers = _answers(sample, f"what color is the {o['shape']}?")
            assert color_answers == ([o["color"]] if shape_counts[o["shape"]] == 1 else [])
            shape_answers = _answers(sample, f"what shape is the {o['color']} object?")
            assert shape_answers == ([o["shape"]] if color_counts[o["color"]] == 1 else [])
        # The canonical caption names every object, in left-to-right order.
        canonical = sample.captions[0]
        positions = [canonical.find(f"{o['color']} {o['shape']} ") for o in objects]
        assert -1 not in positions and positions == sorted(positions)


def test_text_is_lowercase_and_minimally_punctuated(val_samples):
    for sample in val_samples:
        assert len(sample.captions) == 3 and len(set(sample.captions)) == 3
        texts = sample.captions + [p["question"] for p in sample.qa] + [p["answer"] for p in sample.qa]
        for text in texts:
            assert text == text.strip().lower() and "  " not in text and not text.endswith(".")
            assert set(text) <= set("abcdefghijklmnopqrstuvwxyz0123456789 ,:?")
        assert all(p["question"].endswith("?") for p in sample.qa)
        assert all(len(p["answer"].split()) <= 2 for p in sample.qa)


def test_pixels_show_the_described_objects(val_samples):
    """The pixel at each object's centre has the object's colour (read back from the PNG), and the
    corners are background: the image shows what the text says."""
    for sample in val_samples[:100]:
        image = Image.open(io.BytesIO(encode_png(sample.image))).convert("RGB")
        for o in sample.objects:
            x0, y0, x1, y1 = o["box"]
            pixel = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            expected = shapes.COLORS[o["color"]]
            assert max(abs(a - b) for a, b in zip(pixel, expected)) <= 8, (o, pixel)
        for corner in ((0, 0), (63, 0), (0, 63), (63, 63)):
            assert image.getpixel(corner) == shapes.BACKGROUND


def test_a_canvas_draws_the_same_objects_small_on_a_large_image():
    for index in range(50):
        small, large = shapes.generate("val", index), shapes.generate("val", index, canvas=(144, 96))
        assert large.image.size == (144, 96)
        assert (large.captions, large.qa) == (small.captions, small.qa)
        for a, b in zip(small.objects, large.objects):
            assert {k: v for k, v in a.items() if k != "box"} == {k: v for k, v in b.items() if k != "box"}
            x0, y0, x1, y1 = b["box"]
            assert 12 <= x1 - x0 == y1 - y0 <= 17  # as on a 64 px image: a ninth of the canvas width
            third = shapes.COLUMNS.index(b["column"])
            assert 48 * third < x0 and x1 < 48 * (third + 1) and y0 > 0 and y1 < 96
            pixel = large.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert max(abs(c - d) for c, d in zip(pixel, shapes.COLORS[b["color"]])) <= 8
    with pytest.raises(ValueError, match="canvas must be"):
        shapes.generate("val", 0, canvas=(48, 96))
    strip = shapes.generate("val", 0, canvas=(144, 32))  # a strip: every object inside it
    assert all(o["box"][1] > 0 and o["box"][3] < 32 for o in strip.objects)


def test_write_shapes_on_a_canvas_writes_large_images(tmp_path):
    manifest = shapes.write_shapes(tmp_path, train=4, val=2, test=2, canvas=[144, 96], samples_per_shard=4)
    assert manifest["canvas"] == [144, 96]
    for set_dir in ("train", "documents/test", "conversations/test"):
        sample = next(iter(ImageTextShards(str(tmp_path / set_dir))))
        images = sample.get("images") or [sample["image"]]
        assert {image.size for image in images} == {(144, 96)}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_vocabulary_covers_every_text(val_samples):
    vocab = shapes.vocabulary()
    assert vocab == sorted(set(vocab))
    assert {",", ":", "?", "an", "between"} | set(shapes.COLORS) | set(shapes.SHAPES) <= set(vocab)
    used = set()
    for sample in val_samples:
        for text in sample.captions + [t for p in sample.qa for t in p.values()]:
            used.update(shapes.words(text))
    assert used <= set(vocab)


def test_tokenizer_round_trips_every_text(val_samples, tok):
    assert tok.unk_token_id not in (None, *tok.convert_tokens_to_ids(shapes.vocabulary()))
    for sample in val_samples:
        for text in sample.captions + [t for p in sample.qa for t in p.values()]:
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids, text
            assert len(ids) == len(shapes.words(text))  # one id per word or punctuation mark
            assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tok):
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == [
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    ]
    assert "<image>" in tok.all_special_tokens
    ids = tok.convert_tokens_to_ids(shapes.SPECIAL_TOKENS)
    assert ids == [0, 1, 2, 3, 4]
    markers = marker_tokens(4)  # split tiling's, after the words: their ids did not move
    assert len(tok) == len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary()) + len(markers)
    assert tok.convert_tokens_to_ids(markers) == list(range(len(tok) - len(markers), len(tok)))
    marked = tok("<fake_token_around_image><row_2_col_3><image><fake_token_around_image><global-img>")
    assert len(marked["input_ids"]) == 5

    text = "what is on the left?"
    ids = tok(f"<image> {text}")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>") and ids[1:] == tok(text)["input_ids"]
    wrapped = [tok.bos_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(wrapped, skip_special_tokens=True) == text
    assert tok.unk_token_id in tok("a pink hexagon")["input_ids"]


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def _read_tar(path):
    """``{key: {ext: bytes}}`` of a webdataset tar."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_write_shapes_writes_shards_manifest_and_tokenizer(tmp_path, tok):
    sizes = {"train": 40, "val": 10, "test": 10}
    manifest = shapes.write_shapes(tmp_path, seed=2, image_size=32, samples_per_shard=16, **sizes)

    extra = {"documents/train": 8, "documents/test": 10, "conversations/train": 13, "pretrain": 13}
    assert manifest["counts"] == sizes | extra | {"conversations/test": 10}
    assert {k: v for k, v in manifest["shards"].items() if k in sizes} == {
        "train": [f"train/shapes-train-00000{i}.tar" for i in range(3)],
        "val": ["val/shapes-val-000000.tar"],
        "test": ["test/shapes-test-000000.tar"],
    }
    on_disk = json.loads((tmp_path / "shapes.json").read_text())
    assert on_disk == manifest
    assert manifest["held_out"] == [list(pair) for pair in shapes.HELD_OUT]
    assert manifest["seed"] == 2 and manifest["image_size"] == 32
    assert {k: manifest["sizes"][k] for k in sizes} == sizes

    for split in sizes:
        paths = manifest["shards"][split]
        read = {}
        for path in paths:
            read.update(_read_tar(tmp_path / path))
        assert len(read) == sizes[split]
        for key, files in read.items():
            sample = shapes.generate(split, int(key), seed=2, image_size=32)
            assert files["png"] == encode_png(sample.image)
            assert json.loads(files["json"]) == sample.text

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    text = "there are 2 shapes: a red circle and an orange square"
    assert saved(text)["input_ids"] == tok(text)["input_ids"]
    assert saved.decode(saved(text)["input_ids"]) == text


def test_write_shapes_is_idempotent_and_rebuilds_on_new_arguments(tmp_path):
    kwargs = {"train": 40, "val": 10, "test": 10, "samples_per_shard": 16, "image_size": 32}
    first = shapes.write_shapes(tmp_path, **kwargs)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    assert shapes.write_shapes(tmp_path, **kwargs) == first
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # Other arguments rebuild, and shards of the old configuration do not linger.
    second = shapes.write_shapes(tmp_path, **{**kwargs, "train": 20})
    assert second["counts"]["train"] == 20
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "shapes-train-000000.tar",
        "shapes-train-000001.tar",
    ]


def test_evaluation_groups_name_held_out_pairs():
    from vlm.data.shapes import combination

    held = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "triangle"}]}
    seen = {"objects": [{"color": "red", "shape": "circle"}]}
    assert combination(held) == "held-out combination" and combination(seen) == "seen combinations"


# ---------------------------------------------------------------------------------------------
# Conversations (LLaVA JSON, through the importer) and few-shot documents
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-more")
    return root, shapes.write_shapes(root, train=40, val=4, test=12, image_size=32, samples_per_shard=16)


def test_llava_files_follow_llavas_schema_and_their_images_exist(written):
    root, manifest = written
    for name in manifest["llava"].values():
        rows = json.loads((root / name).read_text())
        for row in rows:
            assert set(row) == {"id", "image", "conversations"}
            assert (root / "llava" / "images" / row["image"]).is_file()
            turns = row["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert "<image>" not in "".join(t["value"] for t in turns[1:])


def test_every_conversation_answer_is_true_of_the_image_it_is_about(written, tok):
    """Each opening question singles out one object of the image and is answered right; each
    follow-up ("what color is it?") is answered for the object the opening was about."""
    root, _ = written
    follow_ups = {question: attribute for attribute, question in shapes.FOLLOW_UPS.items()}
    checked = 0
    for split in ("train", "test"):
        for sample in ImageTextShards(str(root / "conversations" / split), shuffle_buffer=0):
            index = int(sample["text"]["id"].split("-")[1])
            objects = shapes.generate(split, index, seed=0, image_size=32).objects
            messages = sample["text"]["messages"]
            target = None
            for question, answer in zip(messages[::2], messages[1::2]):
                q, a = question["content"].removeprefix("<image>\n"), answer["content"]
                if q in follow_ups:
                    assert a == target[follow_ups[q]]
                    checked += 1
                    continue
                (target,) = [o for o in objects if _opening_answer(q, o, objects) == a]
            assert tok.unk_token_id not in tok(" ".join(m["content"] for m in messages))["input_ids"]
    assert checked >= 20


def _opening_answer(question, obj, objects):
    """What ``question`` asks of ``obj``, when it singles ``obj`` out."""
    where = {"left": "on the left", "center": "in the center", "right": "on the right"}[obj["column"]]
    unique_shape = sum(o["shape"] == obj["shape"] for o in objects) == 1
    unique_color = sum(o["color"] == obj["color"] for o in objects) == 1
    answers = {f"what is {where}?": f"{obj['color']} {obj['shape']}"}
    if unique_shape:
        answers |= {
            f"where is the {obj['shape']}?": obj["column"],
            f"what color is the {obj['shape']}?": obj["color"],
        }
    if unique_color:
        answers |= {
            f"where is the {obj['color']} object?": obj["column"],
            f"what shape is the {obj['color']} object?": obj["shape"],
        }
    return answers.get(question)


def test_documents_answer_one_attribute_they_never_name(written):
    root, manifest = written
    attributes = Counter()
    for sample in ImageTextShards(str(root / "documents" / "test"), shuffle_buffer=0):
        text, images = sample["text"], sample["images"]
        attribute = text["attribute"]
        attributes[attribute] += 1
        assert text["document"] == "".join(f"<image>{a}" for a in text["answers"])
        assert not {"color", "shape", "where", "column"} & set(
            text["document"].replace("<image>", " ").split()
        )
        index = int(sample["key"])
        document = shapes.fewshot_document("test", index, seed=0, image_size=32)
        assert [list(im.getdata()) for im in images] == [list(im.getdata()) for im in document.images]
        values = {"color": shapes.COLORS, "shape": shapes.SHAPES, "column": shapes.COLUMNS}[attribute]
        assert all(a in values for a in text["answers"]) and len(images) == shapes.DOCUMENT_ITEMS
    assert len(attributes) == 3  # all three kinds occur
