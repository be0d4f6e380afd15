"""The interim demo: a tiny model learns to caption random tensors.

It exercises the whole model path (ViT -> MLP bridge -> GPT-2, answer-only loss, save and
reload) on synthetic tensors: each of a few "classes" is a fixed random image plus noise,
and its caption is a fixed token sequence. The real demo (the shapes dataset, training
recipe and evaluation) replaces this when those land.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import trange

from vlm import HFDecoderConfig, ModelConfig, ProjectorConfig, ViTConfig, build_model, from_pretrained
from vlm.model import IGNORE_INDEX

NUM_CLASSES, CAPTION_LEN, VOCAB, IMAGE_SIZE = 4, 4, 32, 32
BOS, SEP, EOS = 1, 3, 2


def demo_config() -> ModelConfig:
    return ModelConfig(
        encoder=ViTConfig(image_size=IMAGE_SIZE, patch_size=8, width=64, depth=2, num_heads=4),
        bridge=ProjectorConfig(name="mlp2x_gelu"),
        decoder=HFDecoderConfig(
            freeze=False,
            hf_config=dict(
                model_type="gpt2",
                n_layer=2,
                n_embd=64,
                n_head=4,
                n_positions=64,
                vocab_size=VOCAB,
                bos_token_id=BOS,
                eos_token_id=EOS,
            ),
        ),
    )


class RandomCaptions:
    """Samples of (image, caption); the class decides both, noise makes each image unique."""

    def __init__(self, model, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(NUM_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.captions = torch.randint(4, VOCAB, (NUM_CLASSES, CAPTION_LEN), generator=g)
        self.prompt = data_prompt(model)
        self.g = g

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        classes = torch.randint(0, NUM_CLASSES, (size,), generator=self.g)
        pixels = self.prototypes[classes] + torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=self.g)
        prompt = torch.tensor(self.prompt).expand(size, -1)
        answer = torch.cat([self.captions[classes], torch.full((size, 1), EOS)], dim=1)
        input_ids = torch.cat([prompt, answer], dim=1)
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer], dim=1)
        return dict(input_ids=input_ids, pixel_values=pixels, labels=labels)


@torch.no_grad()
def first_token_accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    """How often the argmax predicts a caption's first token, which only the image can tell
    (chance is 1 / NUM_CLASSES); later tokens follow from the first."""
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    first = len(data_prompt(model))  # position of the first caption token
    predicted = logits[:, first - 1].argmax(-1)
    return float((predicted == batch["input_ids"][:, first]).float().mean())


def data_prompt(model) -> list[int]:
    return [BOS] + [model.image_token_id] * model.tokens_per_image + [SEP]


def run(out_dir: str = "runs/demo", steps: int = 150, seed: int = 0, batch_size: int = 16) -> dict:
    torch.manual_seed(seed)
    print(
        "vlm demo: training a tiny ViT -> MLP -> GPT-2 model to caption RANDOM TENSORS "
        "(the shapes-dataset demo replaces this once data, training and eval land)."
    )
    model = build_model(demo_config())
    data = RandomCaptions(model, seed)
    held_out = data.batch(64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start, first_loss = time.perf_counter(), None
    bar = trange(steps, desc="train")
    for _ in bar:
        loss = model(**data.batch(batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start

    model.eval()
    accuracy = first_token_accuracy(model, held_out)
    out = Path(out_dir)
    model.save_pretrained(out / "model")
    reloaded = from_pretrained(out / "model").eval()
    same = torch.equal(
        model(input_ids=held_out["input_ids"], pixel_values=held_out["pixel_values"]).logits,
        reloaded(input_ids=held_out["input_ids"], pixel_values=held_out["pixel_values"]).logits,
    )
    result = dict(
        first_loss=first_loss,
        last_loss=loss.item(),
        first_token_accuracy=accuracy,
        train_seconds=round(seconds, 2),
        reload_identical=same,
    )
    print(
        f"loss {first_loss:.3f} -> {loss.item():.3f} in {steps} steps ({seconds:.1f} s); "
        f"held-out first-token accuracy {accuracy:.0%} (chance {1 / NUM_CLASSES:.0%}); "
        f"saved to {out / 'model'} "
        f"(reloaded logits identical: {same})"
    )
    return result
