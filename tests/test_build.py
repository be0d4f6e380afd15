"""Every encoder x bridge x decoder combination builds, runs interleaved image-text batches and trains."""

import dataclasses
from pathlib import Path

import pytest
import tiny
import torch
import torch.nn.functional as F

from vlm import ConfigError, HFDecoderConfig, ModelConfig, build_model, registry

ENCODERS = tuple(tiny.ENCODERS)


def test_every_registered_part_has_a_tiny_config():
    """The shared tests below run over every registered part: a part registered without a tiny
    config here would go untested, so it fails this test instead."""
    assert set(registry.ENCODERS.names()) == set(tiny.ENCODERS)
    assert set(registry.BRIDGES.names()) == set(tiny.BRIDGES)
    tested_decoders = {HFDecoderConfig(hf_config=c).name for c in tiny.DECODERS.values()}
    assert set(registry.DECODERS.names()) == tested_decoders


@pytest.mark.parametrize("decoder", tiny.DECODERS)
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_forward_backward_every_combination(encoder, bridge, decoder):
    """Rows with one and two images interleaved with text give finite logits, loss and bridge grads."""
    model = build_model(tiny.model_config(encoder, bridge, decoder))
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    assert batch["pixel_values"].shape[0] == 3

    out = model(**batch)

    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, T, tiny.VOCAB + 1)  # + the appended <image> token
    assert torch.isfinite(out.logits).all()
    assert out.loss is not None and out.loss.ndim == 0 and torch.isfinite(out.loss)

    out.loss.backward()
    bridge_params = dict(model.bridge.named_parameters())
    assert bridge_params
    for name, p in bridge_params.items():
        assert p.grad is not None, f"bridge parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"bridge parameter {name} has a non-finite gradient"


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "perceiver"])
def test_answer_only_logits_give_the_same_loss_and_gradients(bridge, decoder):
    """``full_logits=False`` (what training uses) runs the LM head at labelled positions only and
    must not change the loss or any gradient."""
    model = build_model(tiny.model_config("vit", bridge, decoder))
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    losses, grads = [], []
    for full in (True, False):
        model.zero_grad()
        out = model(**batch, full_logits=full)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    kept = model(**batch, full_logits=False).logits.shape[1]
    assert kept < batch["input_ids"].shape[1]  # the image and prompt positions were skipped


@pytest.mark.parametrize("decoder", tiny.DECODERS)
def test_decoder_uses_sdpa(decoder):
    """The HF decoder runs with the fused SDPA attention by default."""
    model = build_model(tiny.model_config("vit", "linear", decoder))
    assert model.decoder.lm.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_loss_counts_only_text_labels(bridge):
    """The loss is next-token CE over labelled text: image placeholders and padding never count."""
    model = build_model(tiny.model_config("vit", bridge, "llama"))
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    out = model(**batch)

    labels = batch["labels"].clone()
    labels[batch["input_ids"] == model.image_token_id] = -100
    labels[batch["attention_mask"] == 0] = -100
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_text_only_forward(bridge):
    """With no images and no placeholders a fresh model is exactly the bare LM (any bridge)."""
    model = build_model(tiny.model_config("vit", bridge, "llama")).eval()
    batch = tiny.make_batch(model, images_per_row=(0, 0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not (ids == model.image_token_id).any()

    with torch.no_grad():
        out = model(ids, pixel_values=None, attention_mask=mask, labels=batch["labels"])
        bare = tiny.bare_lm(model)(input_ids=ids, attention_mask=mask).logits

    assert out.logits.shape == (*ids.shape, tiny.VOCAB + 1)
    assert torch.isfinite(out.loss)
    assert torch.equal(out.logits, bare)


def _drop_one_placeholder(model, batch):
    ids = batch["input_ids"].clone()
    row, col = (ids == model.image_token_id).nonzero()[-1]
    ids[row, col] = 5  # an ordinary text token
    return ids


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_placeholder_count_mismatch_raises(bridge):
    """One placeholder too few (or images without placeholders) is a clear ValueError."""
    model = build_model(tiny.model_config("vit", bridge, "gpt2"))
    batch = tiny.make_batch(model, images_per_row=(1, 2))

    with pytest.raises(ValueError, match="placeholder"):
        model(_drop_one_placeholder(model, batch), batch["pixel_values"], batch["attention_mask"])

    with pytest.raises(ValueError, match="placeholder"):  # placeholders but no images
        model(batch["input_ids"], None, batch["attention_mask"])

    with pytest.raises(ValueError, match="placeholder"):  # one image too many
        extra = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
        model(batch["input_ids"], extra, batch["attention_mask"])


def test_explicit_image_token_id():
    """An existing vocabulary id can serve as <image>: no row is added to the embeddings."""
    # eos (2): make_batch draws text from 3.. and pads with 0, so only placeholders carry it
    config = dataclasses.replace(tiny.model_config("vit", "linear", "gpt2"), image_token_id=2)
    assert isinstance(config, ModelConfig)
    model = build_model(config)
    assert model.image_token_id == 2
    assert model.decoder.lm.get_input_embeddings().num_embeddings == tiny.VOCAB
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    out = model(**batch)
    assert out.logits.shape[-1] == tiny.VOCAB
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_image_token_id_past_the_vocabulary_grows_it(decoder):
    """An id past the end (a token just added to the tokenizer) grows the embeddings to fit it.

    The new rows are the mean embedding, so a base rebuilt from the same files matches.
    """
    new_id = tiny.VOCAB + 3
    config = dataclasses.replace(tiny.model_config("vit", "linear", decoder), image_token_id=new_id)
    model = build_model(config)
    lm = model.decoder.lm
    assert model.image_token_id == new_id
    for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        assert emb.weight.shape[0] == new_id + 1
        mean = emb.weight[: tiny.VOCAB].mean(0)
        assert all(torch.equal(emb.weight[i], mean) for i in range(tiny.VOCAB, new_id + 1))
    out = model(**tiny.make_batch(model))
    assert out.logits.shape[-1] == new_id + 1
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("bridge", ["linear", "mlp2x_gelu", "qformer"])
def test_prefix_tokens_fill_placeholders_in_reading_order(bridge):
    """Visual tokens replace the placeholders image by image, row by row; text embeddings stay."""
    model = build_model(tiny.model_config("vit", bridge, "gpt2")).eval()
    batch = tiny.make_batch(model, images_per_row=(2, 1, 0, 2))
    captured = {}
    model.decoder.register_forward_pre_hook(lambda mod, args: captured.setdefault("embeds", args[0]))
    with torch.no_grad():
        model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        visual = model.encode_images(batch["pixel_values"])
        text = model.decoder.embed(batch["input_ids"])

    embeds, is_image = captured["embeds"], batch["input_ids"] == model.image_token_id
    assert visual.shape[0] == 5
    assert torch.equal(embeds[is_image], visual.flatten(0, 1))
    assert torch.equal(embeds[~is_image], text[~is_image])


@pytest.mark.parametrize("bridge", list(tiny.BRIDGES))
def test_bfloat16_decoder(bridge):
    """decoder.dtype='bfloat16' (documented) trains with every bridge; the bridge stays float32."""
    model = build_model(tiny.model_config("vit", bridge, "llama", dtype="bfloat16"))
    assert model.decoder.lm.dtype == torch.bfloat16
    out = model(**tiny.make_batch(model))
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.bridge.named_parameters():
        assert p.dtype == torch.float32
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_cached_image_features_match_pixels(bridge):
    """forward(image_features=encoder output) gives the same logits and loss as forward(pixel_values)."""
    model = build_model(tiny.model_config("vit", bridge, "gpt2")).eval()
    batch = tiny.make_batch(model)
    with torch.no_grad():
        from_pixels = model(**batch)
        features = model.encoder(batch["pixel_values"])
        cached = model(
            batch["input_ids"], None, batch["attention_mask"], batch["labels"], image_features=features
        )
    assert torch.equal(cached.logits, from_pixels.logits)
    assert torch.equal(cached.loss, from_pixels.loss)


def test_sum_loss_reduction():
    """loss_reduction='sum' is the mean loss times the number of counted (text, non-pad) labels."""
    model = build_model(tiny.model_config("vit", "qformer", "llama")).eval()
    batch = tiny.make_batch(model)
    with torch.no_grad():
        mean = model(**batch).loss
        total = model(**batch, loss_reduction="sum").loss
    labels = batch["labels"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    counted = int((labels[:, 1:] != -100).sum())
    assert counted > 0
    torch.testing.assert_close(total, mean * counted)


def test_projector_merge_hands_the_lm_fewer_tokens():
    """merge=2 concatenates 2x2 neighbouring patches: 16 patch tokens become 4 LM tokens."""
    config = tiny.model_config("vit", "mlp2x_gelu", "gpt2")
    config = dataclasses.replace(config, bridge=dataclasses.replace(config.bridge, merge=2))
    model = build_model(config)
    assert model.encoder.num_tokens == 16 and model.tokens_per_image == 4
    features = torch.arange(16.0)[None, :, None].expand(1, 16, 32)  # token i holds the value i
    merged = model.bridge._merge(features)
    assert merged.shape == (1, 4, 128)
    assert merged[0, :, ::32].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    out = model(**tiny.make_batch(model))
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="square grid"):
        cls = dataclasses.replace(config.encoder, keep_class_token=True)  # 17 tokens
        build_model(dataclasses.replace(config, encoder=cls))


def test_model_and_generation_never_ask_which_kind_of_bridge():
    """model.py and generate.py talk to every bridge through vlm.bridges.base.Bridge only: no
    test of a kind flag, a bridge class or a bridge name (the test-only bridge relies on it)."""
    import re

    import vlm.generate
    import vlm.model

    asks = re.compile(
        r"cross_attention\b|isinstance\([^)]*bridge|PrefixBridge|CrossAttentionBridge|Perceiver|bridge\.name"
    )
    for module in (vlm.model, vlm.generate):
        source = Path(module.__file__).read_text()
        assert not asks.findall(source), f"{module.__name__} branches on the bridge kind"
