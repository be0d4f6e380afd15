"""A converted LLaVA whose tokenizer carries transformers' chat template (llava-hf's, which reads
each message's content as a list of parts): ``Predictor.predict`` and ``Predictor.chat`` prompt
exactly what transformers' ``LlavaProcessor.apply_chat_template`` does and answer what
``LlavaForConditionalGeneration.generate`` answers; a template over strings works as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from vlm import ConfigError
from vlm.conversation import content_parts, render_chat
from vlm.convert import FORMATS, IMAGE_TOKEN_ID
from vlm.eval import bench
from vlm.eval.predict import Predictor
from vlm.generate import generate
from vlm.processor import Processor

TINY = bench.SIZES["tiny"]
SIZE = TINY.image

#: llava-hf/llava-1.5-7b-hf's chat template, as its chat_template.json holds it.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: The same turns over string contents (a tokenizer template, as older checkpoints carry).
STRING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{{ message['content'] + ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}"
    "{% endif %}"
)
WORDS = (
    "USER ASSISTANT : . ? what color is it on the left Answer with a single word or phrase "
    "Describe image briefly"
)


def llama_like_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words split at spaces and punctuation, ``<image>`` at the checkpoint's image id, and BOS
    put in front of every text as Llama's tokenizer (llava-hf's) does."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    words = specials + WORDS.split(" ")
    words += [f"w{i}" for i in range(TINY.vocab - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tokenizer


CHAT = [
    {"role": "user", "content": "<image>\nwhat is on the left ?"},
    {"role": "assistant", "content": "w1 w2"},
    {"role": "user", "content": "what color is it ?"},
    {"role": "assistant", "content": "w3"},
]


def test_a_template_over_parts_gets_parts_and_one_over_strings_gets_strings():
    tokenizer = llama_like_tokenizer()
    tokenizer.chat_template = LLAVA_HF_TEMPLATE
    assert content_parts("compare <image>\nthis<image>", "<image>") == [
        {"type": "text", "text": "compare "},
        {"type": "image"},
        {"type": "text", "text": "this"},
        {"type": "image"},
    ]
    # BOS in front, as transformers' processor tokenizes the render with Llama's special tokens.
    assert render_chat(CHAT, "<image>", add_generation_prompt=False, tokenizer=tokenizer) == (
        "<s>USER: <image>\nwhat is on the left ? ASSISTANT: w1 w2 USER: what color is it ? ASSISTANT: w3 "
    )
    encoded = Processor(tokenizer, tokens_per_image=2).encode_messages(CHAT)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids.count(IMAGE_TOKEN_ID) == 2 and encoded["num_images"] == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != -100]) == "w1 w2 w3"
    tokenizer.chat_template = STRING_TEMPLATE  # strings as they are, and no BOS: as before
    assert render_chat(CHAT, "<image>", add_generation_prompt=True, tokenizer=tokenizer) == (
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    )


def test_a_parts_template_whose_image_marker_is_not_the_image_token_is_refused():
    tokenizer = llama_like_tokenizer()
    tokenizer.chat_template = LLAVA_HF_TEMPLATE.replace("<image>", "<img>")
    with pytest.raises(ConfigError, match="processor.chat = false"):
        Processor(tokenizer, tokens_per_image=2).prompt("caption")


def save_llava(directory, template: str):
    """transformers' tiny LLaVA saved with its ``LlavaProcessor`` (which writes the template to
    ``chat_template.jinja``, where the tokenizer loads it from); returns the model and processor."""
    torch.manual_seed(0)
    model = FORMATS["llava"].reference(TINY, IMAGE_TOKEN_ID).eval()
    model.save_pretrained(directory)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
        ),
        tokenizer=llama_like_tokenizer(),
        patch_size=TINY.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=template,
    )
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava-hf-template")
    model, processor = save_llava(directory, LLAVA_HF_TEMPLATE)
    assert (directory / "chat_template.jinja").is_file()
    return model, processor, Predictor(directory, device="cpu")


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE + 8, SIZE, 3), dtype=np.uint8))


def user(text: str, image: Image.Image | None = None) -> dict:
    parts = [{"type": "image", "image": image}] if image is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def transformers_reply(model, processor, messages) -> tuple[list[int], str]:
    """The prompt ids transformers' processor makes of ``messages`` and its greedy reply."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():  # vlm never generates the image placeholder: neither may transformers
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    return inputs["input_ids"][0].tolist(), processor.tokenizer.decode(
        out[0, prompt:], skip_special_tokens=True
    )


@pytest.mark.parametrize(
    "task, question, text",
    [
        ("vqa", "what color is it ?", "what color is it ? Answer with a single word or phrase."),
        ("caption", None, "Describe the image briefly."),
    ],
)
def test_predict_prompts_and_answers_as_transformers_llava(llava, task, question, text):
    model, processor, predictor = llava
    image = picture(0)
    ids, expected = transformers_reply(model, processor, [user(text, image)])
    assert predictor.processor.prompt_ids(task, question=question) == ids  # BOS, USER: <image>x16 ...
    assert processor.tokenizer.decode(ids[:3]) == "<s> USER :" and ids.count(IMAGE_TOKEN_ID) == 16
    answer = predictor.predict([image], task, [question])[0]
    assert answer and answer == expected.strip()
    assert answer != predictor.predict([picture(1)], task, [question])[0]  # the image is read


def test_chat_over_one_and_two_turns_answers_as_transformers_llava(llava):
    model, processor, predictor = llava
    image = picture(2)
    first = [user("what is on the left ?", image)]
    ids, expected = transformers_reply(model, processor, first)
    reply = predictor.chat(first)
    assert reply and reply == expected.strip()
    history = [*first, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
    history.append(user("what color is it ?"))
    ids, expected = transformers_reply(model, processor, history)
    assert processor.tokenizer.decode(ids).endswith(
        f"ASSISTANT : {reply} USER : what color is it ? ASSISTANT :"
    )
    second = predictor.chat(history)
    assert second == expected.strip()
    assert second != predictor.chat([user("what color is it ?", image)])  # the history matters


def test_a_template_over_string_contents_still_gets_strings(tmp_path):
    save_llava(tmp_path, STRING_TEMPLATE)
    predictor = Predictor(tmp_path, device="cpu")
    tokenizer = predictor.tokenizer
    image = picture(3)
    question = [user("what is on the left ?", image)]
    reply = predictor.chat(question)
    ids = predictor.processor.messages_prompt_ids(
        [{"role": "user", "content": "<image>\nwhat is on the left ?"}]
    )
    assert (
        tokenizer.decode(ids) == "USER : " + " ".join(["<image>"] * 16) + " what is on the left ? ASSISTANT :"
    )
    new = generate(
        predictor.model, torch.tensor([ids]), None, predictor.transform(image)[None], predictor.generation
    )
    assert reply == tokenizer.decode(new[0], skip_special_tokens=True).strip()
    vqa = predictor.processor.prompt_ids("vqa", question="what color is it ?")
    assert tokenizer.decode(vqa).startswith("USER : " + " ".join(["<image>"] * 16) + " what color is it ?")
    assert predictor.predict([image], "vqa", ["what color is it ?"])[0]
