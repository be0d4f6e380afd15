"""Importers: records in each format's published schema become shards that read back as they
were meant; every record (and every question, every image) is written or skipped, and counted."""

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from vlm.cli import main
from vlm.data.importers import from_karpathy, from_llava, from_mmc4, from_obelics, from_vqav2
from vlm.data.loader import task_examples
from vlm.data.pipeline import ImageTextShards
from vlm.data.samples import placed_images
from vlm.data.writers import write_shards
from vlm.processor import IMAGE_TOKEN

RED, BLUE, GREEN, YELLOW, GREY = (220, 30, 30), (30, 70, 220), (30, 160, 50), (230, 200, 20), (128, 128, 128)


def draw(path, colour):
    """A small solid image at ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def near(pixel, colour, tolerance=6):
    """JPEG may move a solid colour by a little."""
    return max(abs(a - b) for a, b in zip(pixel, colour)) <= tolerance


def colours(sample):
    images = sample.get("images") or ([sample["image"]] if "image" in sample else [])
    return [image.getpixel((4, 4)) for image in images]


def read_back(summary):
    samples = list(ImageTextShards(summary.shards, shuffle_shards=False, shuffle_buffer=0))
    for sample in samples:  # a conversation or a document places each of its images
        placed = placed_images(sample["text"])
        assert placed is None or placed == len(colours(sample))
    return samples


def adds_up(summary, records_in):
    """Records in = written + skipped + left out; per part, read = written + skipped."""
    assert summary.written + summary.skipped.total() + summary.left_out.total() == records_in
    for counts in summary.parts.values():
        assert counts.read == counts.written + counts.skipped.total()


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --- LLaVA ------------------------------------------------------------------------------------

PRETRAIN = {
    "id": "004539375",
    "image": "00453/004539375.jpg",
    "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
    ],
}
MIX665K = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
        {"from": "human", "value": "Is the bus driving down the street or pulled off to the side?"},
        {
            "from": "gpt",
            "value": "The bus is driving down the street, which is crowded with people and other vehicles.",
        },
    ],
}
SHAREGPT = {  # text-only, as mix665k's ShareGPT part
    "id": "i6IyJda_0",
    "conversations": [
        {"from": "system", "value": "You are a helpful marketing assistant."},
        {
            "from": "human",
            "value": "How to tell if a customer segment is well segmented? In 3 bullet points.",
        },
        {"from": "gpt", "value": "1. Homogeneity\n2. Distinctiveness\n3. Reachability"},
    ],
}
NO_MARKER = {  # some mix665k records (OCR-VQA) carry an image but no marker
    "id": "140031996",
    "image": "ocr_vqa/images/140031996.jpg",
    "conversations": [
        {"from": "human", "value": "Who wrote this book?"},
        {"from": "gpt", "value": "Gabriel Garcia Marquez"},
    ],
}
TWO_IMAGES = {  # LLaVA-NeXT interleaved data: "image" as a list
    "id": "m4_spot_0",
    "image": ["spot/0_left.png", "spot/0_right.png"],
    "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich of the two pictures is brighter?"},
        {"from": "gpt", "value": "The second one."},
    ],
}


def bad_llava_records():
    """One per skip reason, with the reason the summary must give."""
    turn = [{"from": "human", "value": "<image>\nDescribe."}]
    return [
        (
            {
                "id": "gone",
                "image": "coco/train2017/000000999999.jpg",
                "conversations": turn + [{"from": "gpt", "value": "x"}],
            },
            "missing_image",
        ),
        (
            {
                "id": "bing",
                "image": PRETRAIN["image"],
                "conversations": turn + [{"from": "bing", "value": "x"}],
            },
            "bad_conversation",
        ),
        ({"id": "no_answer", "image": PRETRAIN["image"], "conversations": turn}, "bad_conversation"),
        (
            {
                "id": "null_value",
                "image": PRETRAIN["image"],
                "conversations": turn + [{"from": "gpt", "value": None}],
            },
            "bad_conversation",
        ),
        (
            {
                "id": "two_markers",
                "image": PRETRAIN["image"],
                "conversations": [
                    {"from": "human", "value": "<image> <image>"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            "image_count",
        ),
        (
            {"id": "odd_image", "image": 5, "conversations": turn + [{"from": "gpt", "value": "x"}]},
            "bad_record",
        ),
    ]


@pytest.fixture
def llava(tmp_path):
    images = tmp_path / "images"
    draw(images / PRETRAIN["image"], RED)
    draw(images / MIX665K["image"], GREEN)
    draw(images / NO_MARKER["image"], YELLOW)
    draw(images / TWO_IMAGES["image"][0], GREY)
    draw(images / TWO_IMAGES["image"][1], BLUE)
    rows = [PRETRAIN, MIX665K, SHAREGPT, NO_MARKER, TWO_IMAGES] + [row for row, _ in bad_llava_records()]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    return tmp_path / "llava.json", images, len(rows)


def test_llava_conversations_keep_their_markers_and_images(llava, tmp_path):
    path, images, records_in = llava
    summary = write_shards(from_llava(path, images), tmp_path / "out")
    expected_skips = {}
    for _, reason in bad_llava_records():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert summary.written == 5 and dict(summary.skipped) == expected_skips
    adds_up(summary, records_in)
    assert "bing (turn 1 is from 'bing'" in summary.report()

    read = {s["text"]["id"]: s for s in read_back(summary)}
    pretrain = read["004539375"]
    assert pretrain["text"]["messages"] == [
        {"role": "user", "content": "Render a clear and concise summary of the photo.\n<image>"},
        {"role": "assistant", "content": "select luxury furniture 3 - inch gel memory foam mattress topper"},
    ]
    assert near(colours(pretrain)[0], RED)
    mix = read["000000033471"]["text"]["messages"]
    assert [m["role"] for m in mix] == ["user", "assistant"] * 3 and mix[0]["content"].startswith("<image>\n")
    assert near(colours(read["000000033471"])[0], GREEN)
    text_only = read["i6IyJda_0"]
    assert "image" not in text_only and text_only["text"]["messages"][0]["role"] == "system"
    ocr = read["140031996"]["text"]["messages"][0]["content"]
    assert ocr == "<image>\nWho wrote this book?"
    assert colours(read["m4_spot_0"]) == [GREY, BLUE]  # KEY.0.png, KEY.1.png: in marker order


# --- VQAv2 ------------------------------------------------------------------------------------


def vqa_answers(*answers):
    """The 10 human answers of one annotation, as the official file writes them."""
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


VQA_QUESTIONS = {
    "info": {
        "description": "This is v2.0 of the VQA dataset.",
        "url": "http://visualqa.org",
        "version": "2.0",
        "year": 2017,
        "contributor": "VQA Team",
        "date_created": "2017-04-26 17:07:13",
    },
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "license": {
        "url": "http://creativecommons.org/licenses/by/4.0/",
        "name": "Creative Commons Attribution 4.0 International License",
    },
    "data_subtype": "val2014",
    "questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
        {
            "image_id": 262148,
            "question": "What are the people in the background doing?",
            "question_id": 262148001,
        },
        {"image_id": 262148, "question": "What is he on top of?", "question_id": 262148002},
        {"image_id": 393225, "question": "Is the bowl full?", "question_id": 393225000},
        {"image_id": 393225, "question": "How many spoons are there?", "question_id": 393225001},
        {"image_id": 524291, "question": "What is the man holding?", "question_id": 524291000},
        {"image_id": 57870, "question": "What color is the table?", "question_id": 57870000},
        {"image_id": 458752, "question": "What is this man doing?", "question_id": 458752000},
        {"image_id": 131074, "question": "Is the sky blue?", "question_id": 131074000},
        {"image_id": 131074, "question": "Is it raining?", "question_id": 131074001},
    ],
}
ANSWERED = {  # question_id -> its 10 answers; 262148002 and the two of 131074 have none
    262148000: ("down",) * 9 + ("at table",),
    262148001: ("watching",) * 6 + ("standing",) * 4,
    393225000: ("no",) * 10,
    393225001: ("2",) * 7 + ("1",) * 3,
    524291000: ("umbrella",) * 8 + ("kite",) * 2,
    57870000: ("brown",) * 10,
    458752000: ("skateboarding",) * 10,
}


def vqa_annotations():
    questions = {q["question_id"]: q for q in VQA_QUESTIONS["questions"]}
    annotations = [
        {
            "question_type": "where is the",
            "multiple_choice_answer": answers[0],
            "answers": vqa_answers(*answers),
            "image_id": questions[qid]["image_id"],
            "answer_type": "other",
            "question_id": qid,
        }
        for qid, answers in ANSWERED.items()
    ]
    meta = {k: v for k, v in VQA_QUESTIONS.items() if k not in ("questions", "task_type")}
    return meta | {"annotations": annotations}


VQA_COLOURS = {262148: RED, 393225: BLUE, 524291: GREEN, 57870: YELLOW}


@pytest.fixture
def vqav2(tmp_path):
    images = tmp_path / "coco"
    draw(images / "COCO_val2014_000000262148.jpg", RED)  # directly under --images
    draw(images / "COCO_val2014_000000393225.jpg", BLUE)
    draw(images / "val2014" / "COCO_val2014_000000524291.jpg", GREEN)  # in the subtype's folder
    draw(images / "misc" / "57870.jpg", YELLOW)  # found by its id alone
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    questions.write_text(json.dumps(VQA_QUESTIONS))
    annotations.write_text(json.dumps(vqa_annotations()))
    return questions, annotations, images


def test_vqav2_one_sample_per_image_and_every_question_counted(vqav2, tmp_path):
    questions, annotations, images = vqav2
    summary = write_shards(from_vqav2(questions, annotations, images), tmp_path / "out")
    images_in = len({q["image_id"] for q in VQA_QUESTIONS["questions"]})
    assert summary.written == 4 and dict(summary.skipped) == {"missing_image": 1, "missing_answers": 1}
    adds_up(summary, images_in)
    counts = summary.parts["questions"]
    assert counts.read == len(VQA_QUESTIONS["questions"])
    assert (counts.written, counts.samples) == (len(ANSWERED) - 1, 4)  # 458752's image is missing
    assert dict(counts.skipped) == {"missing_answers": 3, "missing_image": 1}
    assert (
        "questions: 10 read, 6 written in 4 sample(s), 4 skipped: missing_answers 3 "
        "(e.g. question_id 262148002, image_id 131074), missing_image 1 (e.g. COCO_val2014_000000458752.jpg)"
    ) in summary.report()

    read = {s["text"]["image_id"]: s for s in read_back(summary)}
    assert set(read) == set(VQA_COLOURS)
    for image_id, colour in VQA_COLOURS.items():
        assert near(colours(read[image_id])[0], colour)
    qa = read[262148]["text"]["qa"]
    assert [q["question_id"] for q in qa] == [262148000, 262148001]
    assert qa[0] == {
        "question": "Where is he looking?",
        "answers": list(ANSWERED[262148000]),
        "question_id": 262148000,
    }
    examples = list(task_examples(read[262148]["text"], tasks=("vqa",)))
    assert [e["answer"] for e in examples] == ["down", "watching"] and len(examples[0]["answers"]) == 10

    swapped = write_shards(from_vqav2(annotations, questions, images), tmp_path / "swapped")
    assert [s["text"] for s in read_back(swapped)] == [s["text"] for s in read_back(summary)]


# --- COCO Karpathy ----------------------------------------------------------------------------


def karpathy_image(split, filename, cocoid, *raws):
    sentences = [
        {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": i} for i, raw in enumerate(raws)
    ]
    return {
        "filepath": filename.split("_")[1],
        "sentids": list(range(len(raws))),
        "filename": filename,
        "imgid": 0,
        "split": split,
        "sentences": sentences,
        "cocoid": cocoid,
    }


KARPATHY = {
    "images": [
        karpathy_image(
            "train",
            "COCO_train2014_000000057870.jpg",
            57870,
            "A restaurant has modern wooden tables and chairs.",
            "A long restaurant table with rattan rounded back chairs.",
        ),
        karpathy_image(
            "val",
            "COCO_val2014_000000391895.jpg",
            391895,
            "A man with a red helmet on a small moped on a dirt road. ",
            "Man riding a motor bike on a dirt road on the countryside.",
        ),
        karpathy_image(
            "test",
            "COCO_val2014_000000522418.jpg",
            522418,
            "A woman wearing a net on her head cutting a cake. ",
        ),
        karpathy_image(
            "restval",
            "COCO_val2014_000000184613.jpg",
            184613,
            "A child holding a flowered umbrella and petting a yak.",
        ),
        karpathy_image("val", "COCO_val2014_000000318219.jpg", 318219, "   "),
        karpathy_image(
            "test", "COCO_val2014_000000554625.jpg", 554625, "A boy wearing headphones using one computer."
        ),
    ],
    "dataset": "coco",
}


@pytest.fixture
def karpathy(tmp_path):
    images = tmp_path / "coco"
    draw(images / "train2014" / "COCO_train2014_000000057870.jpg", RED)
    draw(images / "val2014" / "COCO_val2014_000000391895.jpg", BLUE)
    draw(images / "COCO_val2014_000000522418.jpg", GREEN)  # not in its filepath folder: found at the root
    draw(images / "val2014" / "COCO_val2014_000000184613.jpg", YELLOW)
    draw(images / "val2014" / "COCO_val2014_000000318219.jpg", GREY)  # no caption: skipped
    (tmp_path / "dataset_coco.json").write_text(json.dumps(KARPATHY))  # 554625's image is missing
    return tmp_path / "dataset_coco.json", images


def test_karpathy_splits_are_left_out_apart_from_skips(karpathy, tmp_path):
    path, images = karpathy
    skips = {"missing_text": 1, "missing_image": 1}
    everything = write_shards(from_karpathy(path, images), tmp_path / "all")
    assert everything.written == 4 and dict(everything.skipped) == skips and not everything.left_out
    adds_up(everything, len(KARPATHY["images"]))

    summary = write_shards(from_karpathy(path, images, splits=["val", "test"]), tmp_path / "out")
    assert summary.written == 2 and dict(summary.skipped) == skips
    assert dict(summary.left_out) == {"split train": 1, "split restval": 1}
    adds_up(summary, len(KARPATHY["images"]))
    assert "left out 1 (split train, not asked for), e.g. COCO_train2014_000000057870.jpg" in summary.report()
    read = {s["text"]["image_id"]: s for s in read_back(summary)}
    assert read[391895]["text"] == {
        "captions": [
            "A man with a red helmet on a small moped on a dirt road.",
            "Man riding a motor bike on a dirt road on the countryside.",
        ],
        "image_id": 391895,
        "split": "val",
    }
    assert near(colours(read[391895])[0], BLUE) and near(colours(read[522418])[0], GREEN)
    with pytest.raises(ValueError, match="restval"):
        list(from_karpathy(path, images, splits=["valid"]))


# --- OBELICS ----------------------------------------------------------------------------------

CAT = "https://www.example-pets.com/wp-content/uploads/2021/03/cat.jpg"
DOG = "https://cdn.example-pets.com/photos/dog.png?w=400"
GONE = "https://www.example-pets.com/img/gone.jpg"


def obelics_row(texts, images, url):
    metadata = [
        None
        if image is None
        else {
            "document_url": url,
            "unformatted_src": image,
            "src": image,
            "formatted_filename": "photo",
            "alt_text": "",
            "original_width": 640,
            "original_height": 480,
        }
        for image in images
    ]
    general = {
        "url": url,
        "warc_filename": "crawl-data/CC-MAIN-2022-49/segments/1669446710237.57/warc/"
        "CC-MAIN-20221127105736-20221127135736-00190.warc.gz",
        "warc_record_offset": 235339853,
        "warc_record_length": 14906,
    }
    return {
        "images": images,
        "metadata": json.dumps(metadata),
        "general_metadata": json.dumps(general),
        "texts": texts,
    }


OBELICS = [
    obelics_row(
        [
            None,
            "Cats sleep for 12 to 16 hours a day.",
            "Kittens sleep even more.",
            None,
            "Dogs need walks.",
            None,
        ],
        [CAT, None, None, DOG, None, GONE],
        "https://www.example-pets.com/sleep.html",
    ),
    obelics_row([None], [CAT], "https://www.example-pets.com/only-a-picture.html"),  # missing_text
    obelics_row(["Only text is left.", None], [None, GONE], "https://www.example-pets.com/text.html"),
    {"images": [CAT, None], "texts": ["Lists of two lengths."], "metadata": "[]", "general_metadata": "{}"},
    obelics_row(["Write <image> in your HTML.", None], [None, CAT], "https://www.example-pets.com/html.html"),
]


def img2dataset_files(images, urls_and_colours):
    """img2dataset's ``output_format=files`` layout (``00000/000000000.png``) and its parquet
    (one row per URL, failed downloads included); returns the parquet's path."""
    rows = []
    for i, (url, colour) in enumerate(urls_and_colours):
        key = f"{i:09d}"
        if colour is not None:
            draw(images / "00000" / f"{key}.png", colour)
        rows.append(
            {
                "url": url,
                "key": key,
                "status": "success" if colour else "failed_to_download",
                "error_message": None if colour else "HTTP Error 404: Not Found",
                "width": 8,
                "height": 8,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), images / "00000.parquet")
    return images / "00000.parquet"


def test_obelics_documents_through_img2dataset_keys(tmp_path):
    images = tmp_path / "images"
    url_map = img2dataset_files(images, [(CAT, RED), (DOG, BLUE), (GONE, None)])
    pq.write_table(pa.Table.from_pylist(OBELICS), tmp_path / "obelics.parquet")
    summary = write_shards(
        from_obelics(tmp_path / "obelics.parquet", images, url_map=url_map), tmp_path / "out"
    )
    assert summary.written == 2 and dict(summary.skipped) == {
        "missing_text": 1,
        "bad_record": 1,
        "image_count": 1,
    }
    adds_up(summary, len(OBELICS))
    counts = summary.parts["images"]
    assert counts.read == sum(image is not None for row in OBELICS for image in row["images"])
    assert (counts.written, counts.samples) == (2, 1)  # the text-only document holds none
    assert dict(counts.skipped) == {"unresolved": 2, "missing_text": 1, "bad_record": 1, "image_count": 1}
    assert (
        "images: 7 read, 2 written in 1 sample(s), 5 skipped: bad_record 1 (e.g. row 3 (" in summary.report()
    )
    assert f"unresolved 2 (e.g. {GONE}, {GONE})" in summary.report()

    read = {s["text"]["url"]: s for s in read_back(summary)}
    sleep = read["https://www.example-pets.com/sleep.html"]
    assert sleep["text"]["document"] == (
        "<image>\n\nCats sleep for 12 to 16 hours a day.\n\nKittens sleep even more."
        "\n\n<image>\n\nDogs need walks."
    )
    assert colours(sleep) == [RED, BLUE]
    text_only = read["https://www.example-pets.com/text.html"]
    assert text_only["text"]["document"] == "Only text is left." and "image" not in text_only


# --- MMC4 -------------------------------------------------------------------------------------

MMC4 = [
    {
        "image_info": [
            {
                "face_detections": None,
                "image_name": "b9040a0dbb22.jpg",
                "matched_sim": 0.27694183588027954,
                "matched_text_index": 2,
                "raw_url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.90.jpg",
            },
            {
                "face_detections": None,
                "image_name": "db1c21bc8474.jpg",
                "matched_sim": 0.3234919607639313,
                "matched_text_index": 1,
                "raw_url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.91.jpg",
            },
            {
                "face_detections": None,
                "image_name": "5f2e1a9c0b11.jpg",
                "matched_sim": 0.30112,
                "matched_text_index": 1,
                "raw_url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.92.jpg",
            },
            {
                "face_detections": None,
                "image_name": "0123456789ab.jpg",
                "matched_sim": 0.25,
                "matched_text_index": 0,
                "raw_url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.99.jpg",
            },
            {
                "face_detections": None,
                "image_name": "c0ffee000000.jpg",
                "matched_sim": 0.2,
                "matched_text_index": 7,
                "raw_url": "http://www.hfitinfo.com/honda_fit_pics/3/2/index.98.jpg",
            },
        ],
        "similarity_matrix": [
            [0.24363446235656738, 0.31758785247802734, 0.27694183588027954],
            [0.2233106791973114, 0.3234919607639313, 0.26118797063827515],
            [0.2, 0.30112, 0.21],
            [0.25, 0.2, 0.2],
            [0.1, 0.1, 0.2],
        ],
        "text_list": [
            "When you lock the door using the lock tab on the driver’s door, all of the other doors and "
            "tailgate lock at the same time.",
            "Press the master door lock switch in as shown to lock or unlock all doors and the tailgate.",
            "When you lock/unlock the driver’s door and tailgate using the master lock switch, all the "
            "other doors lock/ unlock at the same time.",
        ],
        "url": "http://www.hfitinfo.com/hofi-48.html",
        "could_have_url_duplicate": 0,
    },
    {  # its image_name was never downloaded, but its raw_url's file name is in the folder
        "image_info": [
            {
                "face_detections": None,
                "image_name": "aaaaaaaaaaaa.jpg",
                "matched_sim": 0.3,
                "matched_text_index": 0,
                "raw_url": "https://example.org/pics/index.42.png",
            }
        ],
        "similarity_matrix": [[0.3]],
        "text_list": ["A second document."],
        "url": "https://example.org/second.html",
        "could_have_url_duplicate": 0,
    },
    {
        "image_info": [
            {
                "face_detections": None,
                "image_name": "b9040a0dbb22.jpg",
                "matched_sim": 0.3,
                "matched_text_index": 0,
                "raw_url": "x",
            }
        ],
        "similarity_matrix": [[0.3]],
        "text_list": [" "],
        "url": "https://example.org/blank.html",
        "could_have_url_duplicate": 0,
    },
    {
        "image_info": [],
        "similarity_matrix": [],
        "text_list": None,
        "url": "https://example.org/broken.html",
        "could_have_url_duplicate": 0,
    },
]


@pytest.fixture
def mmc4(tmp_path):
    images = tmp_path / "images"
    draw(images / "b9040a0dbb22.jpg", RED)
    draw(images / "db1c21bc8474.jpg", BLUE)
    draw(images / "5f2e1a9c0b11.jpg", GREEN)
    draw(images / "pics" / "index.42.png", YELLOW)
    (tmp_path / "docs_no_face_shard_0_v2.jsonl").write_text("\n".join(json.dumps(row) for row in MMC4))
    return tmp_path / "docs_no_face_shard_0_v2.jsonl", images


def test_mmc4_images_stand_before_their_matched_sentence(mmc4, tmp_path):
    path, images = mmc4
    summary = write_shards(from_mmc4(path, images), tmp_path / "out")
    assert summary.written == 2 and dict(summary.skipped) == {"missing_text": 1, "bad_record": 1}
    adds_up(summary, len(MMC4))
    counts = summary.parts["images"]
    assert counts.read == sum(len(row["image_info"]) for row in MMC4)
    assert (counts.written, counts.samples) == (4, 2)
    assert dict(counts.skipped) == {"unresolved": 1, "unmatched": 1, "missing_text": 1}

    read = {s["text"]["url"]: s for s in read_back(summary)}
    first = read["http://www.hfitinfo.com/hofi-48.html"]
    sentences = MMC4[0]["text_list"]
    assert first["text"]["document"] == " ".join(
        [sentences[0], IMAGE_TOKEN, IMAGE_TOKEN, sentences[1], IMAGE_TOKEN, sentences[2]]
    )
    # db1c... and 5f2e... both match sentence 1: image_info order; b904... matches sentence 2
    assert all(near(c, want) for c, want in zip(colours(first), [BLUE, GREEN, RED], strict=True))
    second = read["https://example.org/second.html"]
    assert second["text"]["document"] == "<image> A second document." and colours(second) == [YELLOW]


# --- img2dataset webdataset output --------------------------------------------------------------


def test_img2dataset_shards_are_read_as_they_are(tmp_path, capsys):
    """img2dataset's own tar (KEY.jpg, KEY.txt, KEY.json) needs no importer."""
    out = tmp_path / "laion"
    out.mkdir()
    captions = ["A red square on a plain background", "Blue tile, 8 by 8"]
    with wds.TarWriter(str(out / "00000.tar")) as tar:
        for i, (caption, colour) in enumerate(zip(captions, [RED, BLUE])):
            key = f"{i:09d}"
            meta = {
                "url": f"https://images.example.com/{i}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 8,
                "height": 8,
                "original_width": 640,
                "original_height": 480,
                "exif": "{}",
                "sha256": "2b0ed1f6e2d0f1d5e0e39a1b6e7b8c3a6a3f7b1c9d1e2f3a4b5c6d7e8f9a0b1c",
            }
            jpg = draw(tmp_path / f"{key}.jpg", colour).read_bytes()
            tar.write({"__key__": key, "jpg": jpg, "txt": caption, "json": meta})
    pq.write_table(
        pa.Table.from_pylist([{"url": "https://images.example.com/0.jpg", "key": "000000000"}]),
        out / "00000.parquet",
    )
    (out / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1}))

    samples = list(ImageTextShards(str(out), shuffle_shards=False, shuffle_buffer=0))
    assert [s["text"]["caption"] for s in samples] == captions
    assert [next(task_examples(s["text"], tasks=("caption",)))["answer"] for s in samples] == captions
    assert near(colours(samples[1])[0], BLUE)
    code, report, _ = run(["data", "check", str(out), "--json"], capsys)
    assert code == 0 and json.loads(report.splitlines()[-1])["ok"] == 2


# --- the command line, once per flag ----------------------------------------------------------


def test_cli_llava_and_vqav2(llava, vqav2, tmp_path, capsys):
    path, images, _ = llava
    code, out, _ = run(
        ["data", "write", "--images", str(images), "--llava", str(path), "--out", str(tmp_path / "l")], capsys
    )
    assert (
        code == 1
        and "wrote 5 samples in 1 shard(s) from 11 records" in out
        and "skipped 3 (bad_conversation)" in out
    )
    code, out, _ = run(["data", "check", str(tmp_path / "l"), "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["ok"] == 5

    questions, annotations, coco = vqav2
    args = ["data", "write", "--images", str(coco), "--out", str(tmp_path / "v"), "--vqav2"]
    code, out, _ = run([*args, str(questions), str(annotations)], capsys)
    assert code == 1 and "questions: 10 read, 6 written in 4 sample(s)" in out
    code, _, err = run([*args, str(questions)], capsys)  # test-dev: questions alone
    assert code == 2 and "give the annotations file too" in err
    code, _, err = run([*args, str(questions), str(annotations), "--split", "val"], capsys)
    assert code == 2 and "--split does not go with --vqav2" in err


def test_cli_karpathy_obelics_and_mmc4(karpathy, mmc4, tmp_path, capsys):
    path, coco = karpathy
    args = [
        "data",
        "write",
        "--images",
        str(coco),
        "--coco-karpathy",
        str(path),
        "--out",
        str(tmp_path / "k"),
    ]
    code, out, _ = run([*args, "--split", "val,test", "--split", "restval"], capsys)
    assert (
        code == 1
        and "wrote 3 samples in 1 shard(s) from 6 records" in out
        and "left out 1 (split train" in out
    )

    images = tmp_path / "web"
    draw(images / "cat.jpg", RED)  # no url map: found by the URL's file name
    draw(images / "photos" / "dog.png", BLUE)
    (tmp_path / "obelics.jsonl").write_text("\n".join(json.dumps(row) for row in OBELICS))
    code, out, _ = run(
        [
            "data",
            "write",
            "--images",
            str(images),
            "--obelics",
            str(tmp_path / "obelics.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 1 and "wrote 2 samples" in out and "images: 7 read, 2 written in 1 sample(s)" in out
    (sleep,) = [
        s for s in ImageTextShards(str(tmp_path / "o"), shuffle_buffer=0) if "sleep" in s["text"]["url"]
    ]
    assert near(colours(sleep)[0], RED) and colours(sleep)[1] == BLUE

    docs, web = mmc4
    with zipfile.ZipFile(tmp_path / "docs_no_face_shard_0_v2.jsonl.zip", "w") as archive:  # as MMC4 ships
        archive.write(docs, docs.name)
    code, out, _ = run(
        [
            "data",
            "write",
            "--images",
            str(web),
            "--mmc4",
            str(tmp_path / "docs_no_face_shard_0_v2.jsonl.zip"),
            "--out",
            str(tmp_path / "m"),
        ],
        capsys,
    )
    assert code == 1 and "images: 7 read, 4 written in 2 sample(s), 3 skipped" in out
    code, out, _ = run(["data", "check", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["ok"] == 2
