"""Conversations and documents as tokens: the templates' exact text, labels on assistant turns
and document text only, truncation that never cuts an image, few-shot prompts."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm import ConfigError
from vlm.config import ProcessorConfig
from vlm.conversation import VICUNA_SYSTEM
from vlm.processor import Processor

# ChatML, as Qwen and many others write it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "user", "content": "<image>\nwhat is on the left?"},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": "what color is it?"},
    {"role": "assistant", "content": "red"},
]


def byte_tokenizer(chat_template=None):
    """A small byte-level BPE: decoding gives back the exact text, so the rendering can be read."""
    specials = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = [VICUNA_SYSTEM, "USER: ASSISTANT: what is on the left? a red circle what color is it? red"] * 4
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    backend.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def labelled_text(tok, encoded):
    return tok.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100])


def test_vicuna_v1_renders_llava_1_5_and_learns_the_assistant_turns_only():
    tok = byte_tokenizer()
    proc = Processor(tok, tokens_per_image=3, conversation="vicuna_v1")
    encoded = proc.encode_messages(CHAT)
    ids = encoded["input_ids"]
    image = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image) == 3 and encoded["num_images"] == 1
    expected = (
        f"<s>{VICUNA_SYSTEM} USER: <image><image><image>\nwhat is on the left? ASSISTANT:a red circle</s>"
        "USER: what color is it? ASSISTANT:red</s>"
    )
    assert tok.decode(ids) == expected
    assert labelled_text(tok, encoded) == "a red circle</s>red</s>"
    # Generation sees the same tokens training saw for the same history.
    prompt = proc.messages_prompt_ids(CHAT[:3])
    assert prompt == ids[: len(prompt)] and tok.decode(prompt).endswith("what color is it? ASSISTANT:")


def test_plain_keeps_only_the_images_and_the_caption():
    tok = byte_tokenizer()
    proc = Processor(tok, tokens_per_image=2, conversation="plain")
    pretrain = [
        {"role": "user", "content": "Render a clear and concise summary of the photo.\n<image>"},
        {"role": "assistant", "content": "a red circle"},
    ]
    encoded = proc.encode_messages(pretrain)
    assert tok.decode(encoded["input_ids"]) == "<s><image><image>a red circle</s>"
    assert labelled_text(tok, encoded) == "a red circle</s>"
    assert proc.messages_prompt_ids(pretrain[:1]) == encoded["input_ids"][:3]


def test_chat_template_turns_are_found_by_rendering_the_history():
    tok = byte_tokenizer(CHATML)
    proc = Processor(tok, tokens_per_image=1)  # "auto": the tokenizer has a template
    encoded = proc.encode_messages([{"role": "system", "content": "be brief"}, *CHAT])
    assert tok.decode(encoded["input_ids"]) == tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, *CHAT], tokenize=False
    )
    assert labelled_text(tok, encoded) == "a red circle<|im_end|>\nred<|im_end|>\n"
    prompt = proc.messages_prompt_ids(CHAT[:3])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert Processor(tok, tokens_per_image=1, conversation="vicuna_v1").conversation is not proc.conversation


def test_a_template_that_rewrites_history_or_is_missing_is_refused():
    rewriting = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ConfigError, match="processor.conversation"):
        Processor(byte_tokenizer(rewriting), tokens_per_image=1).encode_messages(CHAT)
    with pytest.raises(ConfigError, match="no chat template"):
        Processor(byte_tokenizer(), tokens_per_image=1, conversation="chat_template")
    with pytest.raises(ConfigError, match="processor.conversation"):
        ProcessorConfig(conversation="llama9")


def test_truncation_never_cuts_an_image_and_never_leaves_no_label():
    tok = byte_tokenizer()
    two_images = [
        {"role": "user", "content": "<image> and <image>"},
        {"role": "assistant", "content": "a red circle"},
    ]
    full = Processor(tok, tokens_per_image=4, conversation="plain").encode_messages(two_images)
    assert tok.decode(full["input_ids"]).startswith("<s>" + "<image>" * 8) and full["num_images"] == 2
    # A limit inside the second image's placeholders moves the cut to before it.
    proc = Processor(tok, tokens_per_image=4, conversation="plain", max_length=7)
    assert proc.encode_messages(two_images) is None  # nothing learnable is left
    assert proc.dropped["no_label"] == 1 and proc.truncated == 1
    doc = Processor(tok, tokens_per_image=4, max_length=10).encode_document(
        "red<image>a red circle<image>red"
    )
    assert doc["num_images"] == 1 and len(doc["input_ids"]) == 10
    image = tok.convert_tokens_to_ids("<image>")
    assert doc["input_ids"].count(image) == 4 and doc["input_ids"][-1] != image


def test_documents_learn_their_text_and_end_each_chunk():
    tok = byte_tokenizer()
    proc = Processor(tok, tokens_per_image=2)
    encoded = proc.encode_document("<image>red <image> a red circle\n")
    assert tok.decode(encoded["input_ids"]) == "<s><image><image>red</s><image><image>a red circle</s>"
    assert labelled_text(tok, encoded) == "red</s>a red circle</s>" and encoded["num_images"] == 2
    prompt = proc.document_prompt_ids("<image>red<image>")
    assert prompt == encoded["input_ids"][: len(prompt)]
    assert tok.decode(proc.document_prompt_ids("<image>red<image>a red")).endswith("<image>a red")


def test_few_shot_prompts_are_the_support_examples_as_trained_then_the_query():
    tok = byte_tokenizer()
    proc = Processor(tok, tokens_per_image=2, templates={"vqa": "{images}{question}"})
    support = [("what color is it?", "red"), ("what is on the left?", "a red circle")]
    prompt = proc.prompt_ids("vqa", question="what color is it?", support=support)
    shots = [proc.encode("vqa", question=q, answer=a)["input_ids"] for q, a in support]
    query = proc.prompt_ids("vqa", question="what color is it?")
    assert prompt == shots[0] + shots[1][1:] + query[1:]  # one BOS
    chat = Processor(byte_tokenizer(CHATML), tokens_per_image=2, templates={"vqa": "{images}{question}"})
    text = chat.tokenizer.decode(chat.prompt_ids("vqa", question="what color is it?", support=support[:1]))
    assert text == (
        "<|im_start|>user\n<image><image>\nwhat color is it?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\n<image><image>\nwhat color is it?<|im_end|>\n<|im_start|>assistant\n"
    )
