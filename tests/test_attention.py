"""One fused attention entry point: vlm.attention.attention, backed by torch's SDPA."""

import ast
import importlib
import math
import sys
from pathlib import Path

import pytest
import tiny
import torch
import torch.nn.functional as F

import vlm
from vlm import MultiHeadAttention, build_model
from vlm.attention import attention

VLM_DIR = Path(vlm.__file__).parent
ATTENTION_FILE = Path(importlib.import_module("vlm.attention").__file__).resolve()


def _reference(q, k, v, mask=None, is_causal=False, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _qkv(lq=5, lk=7, d=8):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 3, lq, d, generator=g),
        torch.randn(2, 3, lk, d, generator=g),
        torch.randn(2, 3, lk, d, generator=g),
    )


def test_attention_matches_reference():
    """Plain attention is softmax(QK^T / sqrt(d)) V."""
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v), _reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_custom_scale():
    q, k, v = _qkv()
    torch.testing.assert_close(
        attention(q, k, v, scale=0.3), _reference(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5
    )


def test_attention_boolean_mask():
    """A boolean mask (True = attend) broadcast over heads hides the masked keys."""
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, _reference(q, k, v, mask=mask), atol=1e-5, rtol=1e-5)
    # the masked-out values really do not matter
    v2 = v.clone()
    v2[0, :, ~mask[0, 0].any(0)] = 1e3
    torch.testing.assert_close(attention(q, k, v2, mask=mask)[0], out[0], atol=1e-5, rtol=1e-5)


def test_attention_causal():
    q, k, v = _qkv(lq=6, lk=6)
    out = attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, _reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-6)  # first token sees itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.long, torch.uint8])
def test_attention_rejects_non_boolean_mask(dtype):
    """Additive/float or integer masks are refused instead of being silently misread."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="boolean"):
        attention(q, k, v, mask=torch.ones(2, 1, 5, 7, dtype=dtype))


def test_multihead_attention_matches_reference():
    """MultiHeadAttention (self and cross) is per-head reference attention between its projections."""
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    self_attn = MultiHeadAttention(16, 4)
    q, k, v = self_attn.qkv(x).chunk(3, dim=-1)
    heads = lambda t: t.unflatten(-1, (4, 4)).transpose(1, 2)  # noqa: E731
    expected = self_attn.out(_reference(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(self_attn(x), expected, atol=1e-5, rtol=1e-5)

    cross = MultiHeadAttention(16, 2, head_dim=6, kv_dim=12)
    heads = lambda t: t.unflatten(-1, (2, 6)).transpose(1, 2)  # noqa: E731
    k, v = cross.kv(ctx).chunk(2, dim=-1)
    expected = cross.out(_reference(heads(cross.q(x)), heads(k), heads(v)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(cross(x, ctx), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        cross(x)


# --- every attention vlm owns goes through SDPA -------------------------------------------------

# MultiHeadAttention modules run by encode_images (one batched call each): ViT blocks up to
# the feature layer, Q-Former self + cross attentions, perceiver resampler layers.
ENCODER_CALLS = {"vit": 1, "clip": 0}
BRIDGE_CALLS = {"linear": 0, "mlp2x_gelu": 0, "qformer": 3, "perceiver": 1, "test_xattn": 0}
# Inside the LM: perceiver, one gated block before each of the 2 LM layers; test_xattn, one.
LM_CALLS = {"perceiver": 2, "test_xattn": 1}


class _SDPACounter:
    def __init__(self, original):
        self.original, self.total, self.from_vlm = original, 0, 0

    def __call__(self, *args, **kwargs):
        self.total += 1
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        self.from_vlm += caller == ATTENTION_FILE
        return self.original(*args, **kwargs)


def _count_mha_calls(model):
    counts = {"n": 0}

    def hook(*_):
        counts["n"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MultiHeadAttention)]
    return counts, handles


def _no_softmax(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("softmax was called outside the fused SDPA kernel")

    monkeypatch.setattr(torch, "softmax", forbidden)
    monkeypatch.setattr(torch.nn.functional, "softmax", forbidden)
    monkeypatch.setattr(torch.Tensor, "softmax", forbidden)


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
@pytest.mark.parametrize("encoder", ["vit", "clip"])
def test_every_vlm_attention_runs_through_sdpa(encoder, bridge, monkeypatch):
    """Each MultiHeadAttention call is one SDPA call; vlm's encoder+bridge never call softmax."""
    model = build_model(tiny.model_config(encoder, bridge, "llama")).eval()
    batch = tiny.make_batch(model, images_per_row=(1, 2))
    counter = _SDPACounter(F.scaled_dot_product_attention)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counter)
    mha, handles = _count_mha_calls(model)

    with monkeypatch.context() as m, torch.no_grad():
        if encoder == "vit":  # open_clip's tower and the HF LM are not vlm's code
            _no_softmax(m)
        model.encode_images(batch["pixel_values"])
    encode_calls = ENCODER_CALLS[encoder] + BRIDGE_CALLS[bridge]
    assert counter.from_vlm == mha["n"] == encode_calls
    if encoder == "vit":
        assert counter.total == counter.from_vlm > 0  # nothing else attends

    counter.total = counter.from_vlm = mha["n"] = 0
    with torch.no_grad():
        model(**batch)
    expected = encode_calls + LM_CALLS.get(bridge, 0)
    assert counter.from_vlm == mha["n"] == expected
    assert counter.total > counter.from_vlm  # the HF LM attends through SDPA as well
    for handle in handles:
        handle.remove()


# --- static scan -------------------------------------------------------------------------------

FORBIDDEN = {"scaled_dot_product_attention", "flex_attention", "MultiheadAttention", "softmax"}
# Sampling turns next-token logits into probabilities: a softmax, but no attention.
ALLOWED = {("generate.py", "softmax")}


def _names_used(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.alias):
            yield node.name.rsplit(".", 1)[-1], node.lineno
            if node.asname:
                yield node.asname, node.lineno


def test_attention_primitives_only_in_attention_module():
    """No file but vlm/attention.py names SDPA, flex attention, nn.MultiheadAttention or softmax
    (sampling's softmax over next-token logits in generate.py aside)."""
    files = sorted(VLM_DIR.rglob("*.py"))
    assert len(files) > 10
    offenders, in_attention = [], set()
    for path in files:
        for name, line in _names_used(ast.parse(path.read_text(), filename=str(path))):
            if name in FORBIDDEN and (path.name, name) not in ALLOWED:
                if path.resolve() == ATTENTION_FILE:
                    in_attention.add(name)
                else:
                    offenders.append(f"{path.relative_to(VLM_DIR.parent)}:{line}: {name}")
    assert not offenders, offenders
    assert "scaled_dot_product_attention" in in_attention  # the scan does see the real call
