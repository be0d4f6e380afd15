"""Text side and batches: prompts masked, placeholders expanded, truncation counted, padding sides."""

import dataclasses
import io
import json

import pytest
import tiny
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm import ConfigError, build_model
from vlm.data.loader import make_loader, task_examples
from vlm.data.transforms import image_transform
from vlm.processor import Processor

WORDS = (
    "Describe the image briefly . Answer with a single word or phrase what color is it ? red blue square"
).split(" ")


def word_tokenizer(image_token=True, chat_template=None):
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"] + (["<image>"] if image_token else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if image_token:
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def red_square_shard(path, samples):
    """A shard of ``samples`` red-square images, each with a caption and one question."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    with wds.TarWriter(str(path)) as tar:
        for i in range(samples):
            text = {"caption": "a red square", "qa": [{"question": "what color is it ?", "answer": "red"}]}
            tar.write({"__key__": f"{i:03d}", "png": buffer.getvalue(), "json": json.dumps(text).encode()})


def test_prompt_is_masked_and_images_expanded():
    tok = word_tokenizer()
    proc = Processor(tok, tokens_per_image=3)
    out = proc.encode("vqa", question="what color is it ?", answer="red")
    ids, labels = out["input_ids"], out["labels"]
    image = tok.convert_tokens_to_ids("<image>")
    assert ids[0] == tok.bos_token_id and ids[1:4] == [image] * 3 and image not in ids[4:]
    answer = [tok.convert_tokens_to_ids("red"), tok.eos_token_id]
    assert ids[-2:] == answer
    assert labels == [-100] * (len(ids) - 2) + answer
    assert tok.decode(ids[4:-2]) == "what color is it ? Answer with a single word or phrase ."


def test_truncation_is_counted_and_never_cuts_the_prompt():
    proc = Processor(word_tokenizer(), tokens_per_image=4, max_length=12)
    prompt_len = len(proc.prompt_ids("caption"))
    long = proc.encode("caption", answer=" ".join(["red"] * 20))
    assert len(long["input_ids"]) == 12 and long["labels"][:prompt_len] == [-100] * prompt_len
    assert proc.truncated == 1
    proc.max_length = prompt_len - 1
    assert proc.encode("caption", answer="red") is None and proc.truncated == 2


def test_padding_sides():
    proc = Processor(word_tokenizer(), tokens_per_image=1)
    short, long = proc.encode("caption", answer="red"), proc.encode("caption", answer="a red square")
    right = proc.pad([short, long], side="right")
    left = proc.pad([short, long], side="left")
    n = len(short["input_ids"])
    assert right["attention_mask"][0].tolist() == [1] * n + [0, 0]
    assert left["attention_mask"][0].tolist() == [0, 0] + [1] * n
    assert left["input_ids"][0, 2:].tolist() == short["input_ids"]
    assert (right["labels"][0, n:] == -100).all()


def test_chat_template_is_used_when_the_tokenizer_has_one():
    template = (
        "{% for m in messages %}<bos> {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} answer{% endif %}"
    )
    proc = Processor(word_tokenizer(chat_template=template), tokens_per_image=1)
    assert proc.chat and proc.prompt("caption").endswith(" answer")
    assert Processor(word_tokenizer(chat_template=template), tokens_per_image=1, chat=False).chat is False


def test_tokenizer_without_image_token_names_the_fix():
    with pytest.raises(ConfigError, match="add_special_tokens"):
        Processor(word_tokenizer(image_token=False), tokens_per_image=1)


def test_task_examples():
    text = {"captions": ["a red square", "red"], "qa": [{"question": "what color is it ?", "answer": "red"}]}
    examples = list(task_examples(text))
    assert [e["task"] for e in examples] == ["caption", "vqa"]
    assert examples[0]["answer"] == "a red square" and examples[0]["references"] == text["captions"]
    vqa = list(task_examples({"question": "q", "answers": ["blue", "red", "blue"]}, ["vqa"]))
    assert vqa[0]["answer"] == "blue" and len(vqa[0]["answers"]) == 3
    with pytest.raises(ValueError, match="unknown task"):
        list(task_examples(text, ["translate"]))


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_image_transform(mode):
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.2, 0.2)
    out = image_transform(16, mean, std, mode=mode)(Image.new("RGB", (40, 20), (255, 255, 255)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(out[:, 8, 8], white, atol=1e-4)
    if mode == "pad":  # the padding is the mean colour, which normalises to about 0
        assert out[:, 0, 8].abs().max() < 0.02
    else:
        assert torch.allclose(out[:, 0, 8], white, atol=1e-4)


@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "perceiver"])
def test_batches_from_shards_train_a_model(tmp_path, bridge):
    red_square_shard(tmp_path / "s.tar", 5)
    tok = word_tokenizer()
    config = tiny.model_config("vit", bridge, "gpt2")
    config = dataclasses.replace(config, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = build_model(config)
    proc = Processor(tok, tokens_per_image=model.tokens_per_image)
    transform = image_transform(tiny.IMAGE_SIZE, model.encoder.mean, model.encoder.std, mode="pad")
    loader = make_loader(str(tmp_path / "s.tar"), proc, transform, batch_size=4, shuffle_buffer=0)
    batches = list(loader)
    assert [len(b["task"]) for b in batches] == [4, 4, 2]  # 5 samples x (caption + question)
    batch = batches[0]
    # two samples, two examples each: each image is encoded once and indexed per example
    assert batch["pixel_values"].shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    assert batch["task"] == ["caption", "vqa", "caption", "vqa"]
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels", "image_index")}
    loss = model(**inputs).loss
    expanded = {**inputs, "pixel_values": batch["pixel_values"][batch["image_index"]], "image_index": None}
    assert torch.isfinite(loss) and torch.allclose(loss, model(**expanded).loss, atol=1e-6)


def test_turns_share_one_image_and_every_answer_is_labelled():
    tok = word_tokenizer()
    proc = Processor(tok, tokens_per_image=2)
    turns = [
        {"task": "caption", "answer": "a red square"},
        {"task": "vqa", "question": "what color is it ?", "answer": "red"},
    ]
    out = proc.encode_turns(turns)
    ids, labels = out["input_ids"], out["labels"]
    image = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image) == 2 and ids[:3] == [tok.bos_token_id, image, image]
    labelled = [t for t in labels if t != -100]
    assert tok.decode(labelled) == "a red square <eos> red <eos>"
    assert tok.decode(ids[ids.index(tok.eos_token_id) + 1 :]).startswith("what color is it ?")
    proc.max_length = len(ids) - 1  # the second turn no longer fits: dropped and counted
    assert proc.encode_turns(turns)["input_ids"] == proc.encode("caption", answer="a red square")["input_ids"]
    assert proc.truncated == 1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "perceiver"])
@pytest.mark.parametrize("decoder", ["gpt2", "llama", "opt"])
def test_packed_turns_compute_exactly_what_separate_examples_compute(bridge, decoder, attention):
    """Each turn of a packed row sees the images and itself only: its loss and its logits equal
    those of the turn encoded alone, so no answer can be read off an earlier turn's text."""
    from vlm import build_model

    tok = word_tokenizer()
    config = tiny.model_config("vit", bridge, decoder, attn_implementation=attention)
    config.decoder.hf_config = {**config.decoder.hf_config, "vocab_size": len(tok)}
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model = build_model(config).eval()
    proc = Processor(tok, tokens_per_image=model.tokens_per_image)
    turns = [
        {"task": "caption", "answer": "a red square"},
        {"task": "vqa", "question": "what color is it ?", "answer": "red"},
        {"task": "vqa", "question": "what is it ?", "answer": "a square"},
    ]
    packed = proc.encode_turns(turns)
    assert sorted(set(packed["segment_ids"])) == [0, 1, 2, 3]
    pixels = torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    batch = proc.pad([packed, proc.encode("caption", answer="a blue circle")])  # a padded plain row too
    out = model(**batch, pixel_values=pixels.repeat(2, 1, 1, 1), loss_reduction="sum")

    alone_sum = torch.zeros(())
    for k, turn in enumerate(turns, start=1):
        single = proc.encode(turn["task"], question=turn.get("question"), answer=turn["answer"])
        single = proc.pad([single])
        alone = model(**single, pixel_values=pixels, loss_reduction="sum")
        alone_sum += alone.loss
        where = torch.tensor(packed["segment_ids"]) == k
        prefix = len(single["input_ids"][0]) - int(where.sum())
        torch.testing.assert_close(out.logits[0, where], alone.logits[0, prefix:], atol=1e-5, rtol=1e-5)
    plain = proc.pad([proc.encode("caption", answer="a blue circle")])
    alone_sum += model(**plain, pixel_values=pixels, loss_reduction="sum").loss
    torch.testing.assert_close(out.loss, alone_sum, atol=1e-4, rtol=1e-5)


def test_a_turn_answering_right_after_the_images_goes_first():
    """With a "{images}" caption template the caption's first word is predicted from the last
    image placeholder: packing puts that turn first so it keeps the label; a second such turn
    loses only its first label."""
    tok = word_tokenizer()
    proc = Processor(tok, tokens_per_image=2, templates={"caption": "{images}"})
    turns = [
        {"task": "vqa", "question": "what color is it ?", "answer": "red"},
        {"task": "caption", "answer": "a red square"},
        {"task": "caption", "answer": "a square"},
    ]
    out = proc.encode_turns(turns)
    segments, labels = out["segment_ids"], out["labels"]
    first_turn = [t for t, s in zip(out["input_ids"], segments) if s == 1]
    assert tok.decode(first_turn) == "a red square <eos>"
    assert labels[segments.index(1)] != -100  # "a" keeps its label: predicted from the last image token
    second_caption = segments.index(2)
    assert (
        labels[second_caption] == -100
        and tok.decode(out["input_ids"][second_caption:][:3]) == "a square <eos>"
    )


def test_packed_turns_are_refused_without_a_4d_mask_attention():
    """FlashAttention-2 takes no 4-D mask: packed turns must be refused, not silently unmasked."""
    from vlm import build_model

    tok = word_tokenizer()
    config = tiny.model_config("vit", "linear", "llama")
    config.decoder.hf_config = {**config.decoder.hf_config, "vocab_size": len(tok)}
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model = build_model(config)
    model.decoder.lm.config._attn_implementation = "flash_attention_2"  # as if flash-attn were installed
    proc = Processor(tok, tokens_per_image=model.tokens_per_image)
    batch = proc.pad([proc.encode_turns([{"task": "caption", "answer": "a red square"}])])
    with pytest.raises(ValueError, match="pack_turns"):
        model(**batch, pixel_values=torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE))
