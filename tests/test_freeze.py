"""Freezing: training touches only what the config says is trainable (bridge, LoRA, unfrozen parts)."""

import dataclasses

import pytest
import tiny
import torch

from vlm import CLIPConfig, LoraSettings, build_model


def _train_step(model, batch, lr=1e-2):
    out = model(**batch)
    out.loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("encoder", ["vit", "clip"])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_frozen_base_only_bridge_learns(bridge, encoder):
    """With the default freeze, one AdamW step (with weight decay) changes the bridge and nothing else."""
    model = build_model(tiny.model_config(encoder, bridge, "llama"))
    batch = tiny.make_batch(model)
    before = _snapshot(model)

    out = model(**batch)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("bridge."):
            assert p.grad is not None, name
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
    nonzero_grad = {
        f"bridge.{n}" for n, p in model.bridge.named_parameters() if p.grad is not None and p.grad.any()
    }
    assert nonzero_grad  # the loss does reach the bridge

    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()

    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("bridge."):
            assert torch.equal(after[key], value), f"frozen tensor {key} changed"
    for key in nonzero_grad:
        assert not torch.equal(after[key], before[key]), f"bridge tensor {key} did not learn"


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize(("decoder", "targets"), [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"])])
def test_lora_trains_only_adapters_and_bridge(decoder, targets):
    """LoRA adds trainable lora_ weights; the LM's own weights stay frozen through a step."""
    config = tiny.model_config("vit", "mlp2x_gelu", decoder, lora=LoraSettings(r=4, target_modules=targets))
    model = build_model(config)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("bridge.") or "lora_" in n}
    assert trainable == expected
    lora_names = {n for n in trainable if "lora_" in n}
    assert lora_names
    assert all(any(t in n for t in targets) for n in lora_names)
    # two LM layers x len(targets) modules x (lora_A, lora_B)
    assert len(lora_names) == 2 * len(targets) * 2

    before = _snapshot(model)
    _train_step(model, tiny.make_batch(model))
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("bridge.") and "lora_" not in key:
            assert torch.equal(after[key], value), f"frozen tensor {key} changed"
    # lora_B starts at zero, so the first step's gradient on it is what moves the adapter
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)


def test_unfrozen_encoder_is_trainable():
    """encoder.freeze=False makes every encoder parameter that runs train (grads flow through the
    bridge); the final norm, skipped unless final_norm=True, stays fixed."""
    config = tiny.model_config("vit", "linear", "gpt2")
    encoder = dataclasses.replace(config.encoder, feature_layer=-1, freeze=False)
    config = dataclasses.replace(config, encoder=encoder)
    model = build_model(config)

    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.encoder.named_parameters() if not n.startswith("norm.")}
    assert not any(p.requires_grad for p in model.decoder.parameters())
    model(**tiny.make_batch(model)).loss.backward()
    for name, p in model.encoder.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.any(), name


def test_unfrozen_decoder_is_trainable():
    """decoder.freeze=False trains the whole LM; the encoder stays frozen."""
    model = build_model(tiny.model_config("vit", "linear", "gpt2", freeze=False))
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize(
    "call_train",
    [
        True,
        False,
    ],
    ids=["after-train()", "fresh-from-build_model"],
)
def test_frozen_batchnorm_encoder_stays_fixed(call_train):
    """A frozen ResNet tower's BatchNorm statistics do not drift in a training step (frozen = eval)."""
    config = tiny.model_config(CLIPConfig(model="RN50", image_size=64), "linear", "gpt2")
    model = build_model(config)
    if call_train:
        model.train()
    assert model.bridge.training
    assert not model.encoder.training and model.decoder.training  # a frozen LM still checkpoints
    before = _snapshot(model.encoder)
    _train_step(model, tiny.make_batch(model, images_per_row=(1,), image_size=64))
    after = model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen encoder tensors changed: {changed[:4]}"
