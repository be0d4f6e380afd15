"""Flamingo (perceiver) bridge: zero-gate init is the bare LM; text attends only to its latest image."""

import dataclasses

import pytest
import tiny
import torch

from vlm import HFDecoderConfig, ModelConfig, build_model


def _flamingo(decoder="gpt2", gates=None):
    model = build_model(tiny.model_config("vit", "perceiver", decoder)).eval()
    if gates is not None:
        for block in model.bridge.blocks.values():
            block.attn_gate.data.fill_(gates)
            block.mlp_gate.data.fill_(gates)
    return model


def _image_positions(model, row_ids):
    return (row_ids == model.image_token_id).nonzero().flatten().tolist()


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_zero_gates_equal_bare_lm(decoder):
    """A fresh Flamingo model computes exactly what the bare LM computes, images or not."""
    model = _flamingo(decoder)
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(ids, batch["pixel_values"], mask).logits
        bare = tiny.bare_lm(model)(input_ids=ids, attention_mask=mask).logits
        own_lm = model.decoder.lm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, bare)
    assert torch.equal(logits, own_lm)


@pytest.mark.parametrize("decoder", tiny.DECODERS)
def test_text_before_first_image_ignores_images(decoder):
    """With open gates, changing the images changes text from the first <image> on, not before it.

    Run for every decoder family: the gated blocks hook HF layers that take hidden states
    positionally or by keyword.
    """
    model = _flamingo(decoder, gates=1.0)
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    other = torch.randn_like(batch["pixel_values"])
    with torch.no_grad():
        a = model(ids, batch["pixel_values"], mask).logits
        b = model(ids, other, mask).logits
        bare = tiny.bare_lm(model)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, bare)  # the open mlp gates change every token
    for row in range(ids.shape[0]):
        first = _image_positions(model, ids[row])[0]
        real = int(mask[row].sum())
        assert torch.allclose(a[row, :first], b[row, :first], atol=1e-6)
        for t in range(first, real):  # every token from the image on sees it
            assert not torch.allclose(a[row, t], b[row, t], atol=1e-4), (row, t)


def _first_block_output(model, ids, pixels, mask):
    """The hidden states right after the gated block that runs before LM layer 0."""
    captured = {}
    block = model.bridge.blocks["0"]
    handle = block.register_forward_hook(lambda mod, args, out: captured.setdefault("h", out))
    try:
        with torch.no_grad():
            logits = model(ids, pixels, mask).logits
    finally:
        handle.remove()
    return captured["h"], logits


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_each_token_cross_attends_to_latest_image_only(decoder):
    """In a two-image row, text after image 2 cross-attends to image 2 only, text in between to image 1.

    The gated block before LM layer 0 sees the token embeddings, so its output isolates the
    cross-attention. (The final logits after image 2 still depend on image 1 *indirectly*,
    through the LM's own self-attention over the earlier text, as in Flamingo.)
    """
    model = _flamingo(decoder, gates=1.0)
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    img1, img2 = _image_positions(model, ids[1])
    end = int(mask[1].sum())

    new_first = pixels.clone()
    new_first[1] = torch.randn_like(pixels[1])  # row 1's first image (row 0 holds image 0)
    h, logits = _first_block_output(model, ids, pixels, mask)
    h1, logits1 = _first_block_output(model, ids, new_first, mask)

    assert torch.allclose(h1[1, :img1], h[1, :img1], atol=1e-6)
    assert not torch.allclose(h1[1, img1:img2], h[1, img1:img2], atol=1e-4)
    assert torch.allclose(h1[1, img2:end], h[1, img2:end], atol=1e-6)
    assert torch.equal(logits1[0], logits[0])  # another row's image never leaks into row 0

    new_second = pixels.clone()
    new_second[2] = torch.randn_like(pixels[2])
    h2, logits2 = _first_block_output(model, ids, new_second, mask)
    assert torch.allclose(h2[1, :img2], h[1, :img2], atol=1e-6)
    assert not torch.allclose(h2[1, img2:end], h[1, img2:end], atol=1e-4)
    # causal: text before image 2 cannot see it, also in the final logits
    assert torch.allclose(logits2[1, :img2], logits[1, :img2], atol=1e-6)
    assert not torch.allclose(logits2[1, img2:end], logits[1, img2:end], atol=1e-4)


@pytest.mark.parametrize("gates", [None, 1.0])
def test_row_without_images_has_no_nan(gates):
    """A row with no image next to a row with two gives finite logits, loss and gradients."""
    model = _flamingo("llama", gates=gates).train()
    batch = tiny.make_batch(model, images_per_row=(0, 2))
    assert not (batch["input_ids"][0] == model.image_token_id).any()
    out = model(**batch)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.bridge.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_text_row_does_not_depend_on_batch_neighbours():
    """A text-only row gives the same logits alone as when batched next to a row with images."""
    model = _flamingo("llama", gates=1.0)
    batch = tiny.make_batch(model, images_per_row=(0, 2))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_len = int(mask[0].sum())
    with torch.no_grad():
        mixed = model(ids, batch["pixel_values"], mask).logits[0, :text_len]
        alone = model(ids[:1, :text_len], None, mask[:1, :text_len]).logits[0]
    assert torch.allclose(mixed, alone, atol=1e-5)


@pytest.mark.parametrize(("placement", "expected"), [("first", [0, 2]), ("last", [1, 3])])
def test_cross_attention_placement(placement, expected):
    """interval=2 on a 4-layer LM: 'first' puts blocks before layers 0, 2; 'last' before 1, 3."""
    bridge = dataclasses.replace(tiny.BRIDGES["perceiver"], cross_attention_interval=2, placement=placement)
    decoder = HFDecoderConfig(hf_config={**tiny.DECODERS["gpt2"], "n_layer": 4})
    model = build_model(ModelConfig(encoder=tiny.vit_config(), bridge=bridge, decoder=decoder))

    assert model.bridge.layer_ids == expected
    assert sorted(model.bridge.blocks.keys(), key=int) == [str(i) for i in expected]

    # each block runs once per forward, right before its layer
    order = []
    for i in expected:
        model.bridge.blocks[str(i)].register_forward_hook(lambda *_, i=i: order.append(f"block{i}"))
    for i, layer in enumerate(model.decoder.layers()):
        layer.register_forward_pre_hook(lambda *_, i=i: order.append(f"layer{i}"))
    model(**tiny.make_batch(model))
    layers = [f"layer{i}" for i in range(4)]
    for i in expected:
        assert order.index(f"block{i}") == order.index(f"layer{i}") - 1
    assert [o for o in order if o.startswith("layer")] == layers


def test_gradient_checkpointing_keeps_cross_attention_gradients():
    """Checkpointed LM layers re-run their gated blocks in backward with the same images."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny.model_config("vit", "perceiver", "llama"))
        for block in model.bridge.blocks.values():
            torch.nn.init.constant_(block.attn_gate, 0.5)
            torch.nn.init.constant_(block.mlp_gate, 0.5)
        if checkpointing:
            model.decoder.lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        model(**tiny.make_batch(model, images_per_row=(1, 2))).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.bridge.named_parameters()})
    plain, checkpointed = grads
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    assert any(plain[n].abs().sum() > 0 for n in plain if ".attn." in n)


def test_flex_attention_media_mask_equals_the_dense_mask(monkeypatch):
    """On GPUs the latest-image mask is a FlexAttention block mask: it must compute what the
    dense boolean mask computes (forced on CPU here, where FlexAttention runs unfused)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    import vlm.attention

    model = _flamingo("llama", gates=1.0).eval()
    batch = tiny.make_batch(model, images_per_row=(2, 3))
    with torch.no_grad():
        dense = model(**batch).logits
    calls = []

    def counted(q, k, v, **kwargs):
        calls.append(q.shape)
        return flex_attention(q, k, v, **kwargs)

    monkeypatch.setattr(vlm.attention, "FLEX_ON_CPU", True)
    monkeypatch.setattr(vlm.attention, "_flex_attention", lambda device_type: counted)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flex = model(**batch).logits
    assert len(calls) == len(model.bridge.blocks)  # every gated block took the block-mask path
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
