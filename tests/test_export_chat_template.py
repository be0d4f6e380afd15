"""An exported model's chat template takes transformers' structured messages: for every way vlm
renders a conversation (the tokenizer's own template over strings or over parts, ``plain``,
``vicuna_v1``), with a tokenizer that adds BOS and one that does not,
``processor.apply_chat_template`` then ``processor(images=..., text=...)`` gives the prompt ids
vlm's processor gives, and ``generate`` the reply ``Predictor.chat`` gives."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_chat_template import LLAVA_HF_TEMPLATE, STRING_TEMPLATE
from test_conversation import byte_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig, ProcessorConfig
from vlm.conversation import VICUNA_SYSTEM
from vlm.convert import IMAGE_TOKEN_ID, export_transformers
from vlm.convert.chat_template import chat_template, prompt_mismatch
from vlm.decoders.hf import HFDecoderConfig
from vlm.encoders.vit import ViTConfig
from vlm.eval.predict import Predictor, conversation_inputs
from vlm.generate import GenerationConfig
from vlm.model import build_model

VOCAB = 160
NEW = 12  # new tokens, greedy, on both sides
#: A Llama-2-like template over strings: BOS before every user turn (only the first is the
#: tokenizer's to add), the system message inside the first one.
LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = '<<SYS>> ' + messages[0]['content'] + "
    "' <</SYS>> ' -%}{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)
#: processor.conversation and the tokenizer's own template for each kind.
KINDS = {
    "tokenizer's template over strings": ("chat_template", LLAMA2_TEMPLATE),
    "tokenizer's template over parts": ("chat_template", LLAVA_HF_TEMPLATE),
    "plain": ("plain", LLAMA2_TEMPLATE),  # the model's conversation wins over the tokenizer's
    "vicuna_v1": ("vicuna_v1", LLAMA2_TEMPLATE),
}
WORDS = (
    f"{VICUNA_SYSTEM} USER ASSISTANT : ? [ ] [/ INST << >> <</ SYS what is on the left color it "
    "compare with a red circle you answer briefly"
)


def word_tokenizer(adds_bos: bool, template: str) -> transformers.PreTrainedTokenizerFast:
    """Words split at spaces and punctuation (tokenized whole or turn by turn, a text gives the
    same ids), ``<image>`` at the model's image id; BOS in front of every text if ``adds_bos``."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    words = list(
        dict.fromkeys(specials + [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(WORDS)])
    )
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.chat_template = template
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and len(tokenizer) == VOCAB
    return tokenizer


def tiny_model(conversation: str):
    """A LLaVA-shaped vlm model with random weights all round (greedy replies vary with the
    prompt and the images), trained as it were with ``conversation``."""
    torch.manual_seed(0)
    config = ModelConfig(
        encoder=ViTConfig(
            image_size=32,
            patch_size=8,
            width=32,
            depth=2,
            num_heads=2,
            feature_layer=-1,
            keep_class_token=True,
        ),
        bridge=ProjectorConfig(name="mlp2x_gelu"),
        decoder=HFDecoderConfig(
            hf_config={
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": VOCAB,
            },
            freeze=False,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        processor=ProcessorConfig(conversation=conversation),
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tokenizer adds BOS", "no BOS added"])
def adds_bos(request):
    return request.param


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, adds_bos, tmp_path_factory):
    """vlm's ``Predictor`` on the model saved with its tokenizer, and transformers' model and
    processor loaded from its export."""
    conversation, template = KINDS[request.param]
    directory = tmp_path_factory.mktemp("chat-export")
    tiny_model(conversation).save_pretrained(directory / "vlm", tokenizer=word_tokenizer(adds_bos, template))
    predictor = Predictor(directory / "vlm", device="cpu", generation=GenerationConfig(max_new_tokens=NEW))
    export_transformers(predictor.model, predictor.tokenizer, directory / "hf")
    assert (directory / "hf" / "chat_template.jinja").is_file()
    hf = transformers.AutoModelForImageTextToText.from_pretrained(directory / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(directory / "hf")
    return predictor, hf, processor, Predictor(directory / "hf", device="cpu")


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8))


def image(seed: int) -> dict:
    return {"type": "image", "image": picture(seed)}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": [image(0), text("what is on the left ?")]}],
    "two turns": [
        {"role": "user", "content": [image(1), text("what is on the left ?")]},
        {"role": "assistant", "content": [text("a red circle")]},
        {"role": "user", "content": [text("what color is it ?")]},
    ],
    "two images in a turn, a system message as a string": [
        {"role": "system", "content": "you answer briefly"},
        {"role": "user", "content": [text("compare"), image(2), text("with"), image(3)]},
    ],
}


def transformers_prompt_and_reply(hf, processor, messages) -> tuple[list[int], str]:
    """What a transformers user does: the template's text, then the processor, then greedy
    decoding (never the image placeholder, which vlm never generates either)."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]]
    images = [part["image"] for part in parts if part["type"] == "image"]
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=NEW, suppress_tokens=[IMAGE_TOKEN_ID])
    reply = processor.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip()
    return inputs["input_ids"][0].tolist(), reply


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_transformers_chat_on_the_export_prompts_and_answers_as_vlm(exported, name):
    predictor, hf, processor, _ = exported
    messages = CONVERSATIONS[name]
    ids, reply = transformers_prompt_and_reply(hf, processor, messages)
    ours = predictor.processor.messages_prompt_ids(conversation_inputs(messages)[0])
    assert ids == ours
    assert reply == predictor.chat(messages)
    # Tokenized by apply_chat_template itself (which drops the tokenizer's BOS before a render
    # that starts with one): the same ids.
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert inputs["input_ids"][0] == ours


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_export_comes_back_into_vlm_with_the_same_prompts(exported, name):
    predictor, _, _, back = exported  # back: vlm's Predictor on the exported directory
    texts = conversation_inputs(CONVERSATIONS[name])[0]
    assert back.processor.messages_prompt_ids(texts) == predictor.processor.messages_prompt_ids(texts)


def test_the_replies_compared_vary_with_the_conversation(exported):
    predictor, _, _, _ = exported
    replies = [predictor.chat(messages) for messages in CONVERSATIONS.values()]
    assert all(replies) and len(set(replies)) == len(replies)


def test_the_export_warns_when_the_tokenizer_adds_a_bos_vlms_prompts_lack(tmp_path, caplog):
    # A template over strings that writes no BOS, with a tokenizer that adds one: vlm's prompts
    # have none, and transformers' processor cannot be kept from adding it.
    tokenizer = word_tokenizer(True, STRING_TEMPLATE)
    config = ProcessorConfig(conversation="chat_template")
    template = chat_template(config, tokenizer, "<image>")
    assert "adds a BOS" in prompt_mismatch(template, config, tokenizer, "<image>")
    assert prompt_mismatch(template, config, word_tokenizer(False, STRING_TEMPLATE), "<image>") is None
    model = tiny_model("chat_template")
    with caplog.at_level(logging.WARNING, logger="vlm.convert.chat_template"):
        export_transformers(model, tokenizer, tmp_path)
    assert "does not give vlm's prompt ids" in caplog.text


def test_a_tokenizer_that_merges_across_a_turns_edge_is_named():
    # vlm tokenizes vicuna_v1's pieces one by one: the space that ends a user turn and the
    # "ASSISTANT:" after it are apart, where byte-level BPE on the whole text makes " ASSISTANT" one.
    tokenizer = byte_tokenizer()
    config = ProcessorConfig(conversation="vicuna_v1")
    why = prompt_mismatch(chat_template(config, tokenizer, "<image>"), config, tokenizer, "<image>")
    assert why.startswith("the same text, tokenized otherwise")
