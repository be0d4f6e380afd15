"""GPU-only checks (skipped without CUDA): vlm's attention takes the fused flash / cuDNN kernels,
and the models run and train in bf16."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlm import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("bridge", ["mlp2x_gelu", "qformer", "perceiver"])
def test_unmasked_and_causal_attention_run_on_flash_or_cudnn_only(bridge):
    """With the math and memory-efficient kernels disallowed, any attention that needed a dense
    mask would raise: one image per row means no mask anywhere, the LM's causal mask included."""
    model = build_model(tiny.model_config("vit", bridge, "llama")).cuda().to(torch.bfloat16).eval()
    batch = tiny.make_batch(model, images_per_row=(1, 1))
    batch = {k: v.cuda() for k, v in batch.items() if k != "attention_mask"}  # no padding
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with sdpa_kernel(FUSED), torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits.float()).all()


def test_bf16_autocast_training_step_gives_finite_gradients():
    model = build_model(tiny.model_config("vit", "perceiver", "llama")).cuda()
    batch = {k: v.cuda() for k, v in tiny.make_batch(model, images_per_row=(1, 2)).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, full_logits=False).loss
    loss.backward()
    grads = [p.grad for p in model.bridge.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_packed_rows_train_through_flex_attention_block_masks():
    """On a GPU, FlexAttention trains: a packed row's loss and gradients through the LM's
    flex_attention (a BlockMask) equal those through sdpa's dense mask."""
    from test_packing import TURNS, tiny_model

    model, proc = tiny_model("mlp2x_gelu", "llama")
    model.cuda().train()
    row = proc.pack([proc.encode_turns(TURNS), proc.encode("caption", answer="a blue square")])
    batch = {k: v.cuda() for k, v in proc.pad([row]).items()}
    pixels = torch.randn(2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, device="cuda")
    results = []
    for implementation in ("sdpa", "flex_attention"):
        model.decoder.lm.set_attn_implementation(implementation)
        model.zero_grad()
        loss = model(**batch, pixel_values=pixels, full_logits=False).loss
        loss.backward()
        results.append((loss.detach(), model.bridge.linear_1.weight.grad.clone()))
    (dense_loss, dense_grad), (flex_loss, flex_grad) = results
    torch.testing.assert_close(flex_loss, dense_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex_grad, dense_grad, atol=1e-4, rtol=1e-3)
