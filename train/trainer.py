"""The training loop: a recipe in, a trained model, checkpoints and logs out.

One process on CPU or GPU, or many under ``torchrun`` (DDP). The
loss of an optimizer step is the answer-token cross-entropy averaged over every token of the
global batch (all micro-batches, all ranks), so gradient accumulation and the number of
processes change nothing but speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlm.config import ModelConfig
from vlm.data.loader import make_loader
from vlm.data.pipeline import BadDataError
from vlm.data.shapes import write_shapes
from vlm.data.transforms import encoder_transform
from vlm.model import IGNORE_INDEX, VisionLanguageModel, build_model
from vlm.processor import IMAGE_TOKEN, Processor
from vlm.schema import ConfigError
from vlm.train.checkpoint import (
    PREFIX,
    CheckpointSpaceError,
    checkpoints,
    gather_model_state,
    is_sharded,
    load_checkpoint,
    save_checkpoint,
)
from vlm.train.distributed import Dist, all_reduce_sum, cleanup, init_distributed, wrap_model
from vlm.train.feature_cache import build_feature_cache
from vlm.train.logs import LOG_FILE, RunLog, plot_loss
from vlm.train.optim import make_optimizer, make_scheduler
from vlm.train.recipe import RESUMABLE_CHANGES, Recipe, recipe_changes
from vlm.weights import bridge_only_problems, load_tokenizer, load_weights, save_pretrained

log = logging.getLogger(__name__)

MODEL_INPUTS = (
    "input_ids",
    "pixel_values",
    "attention_mask",
    "labels",
    "image_features",
    "image_index",
    "image_sizes",
    "segment_ids",
    "sample_ids",
)


#: What a run writes into its directory besides its checkpoints. The feature cache is not a
#: run's: the next run in the directory reuses it when the encoder and shards are the same.
RECIPE_FILE = "recipe.json"
RUN_FILES = (RECIPE_FILE, LOG_FILE, "tensorboard", "model", "loss.png", "summary.json")
PREVIOUS = "previous-"


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was saved."""


def recipe_tokenizer(path: str):
    """The recipe's tokenizer, given an ``<image>`` token and a pad token when it lacks them."""
    if not path or not Path(path).is_dir():
        raise ConfigError(f"data.tokenizer={path!r} is not a local tokenizer directory")
    tokenizer = load_tokenizer(path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bind_tokenizer(config: ModelConfig, tokenizer) -> ModelConfig:
    """The model config for this tokenizer: its ``<image>`` id, and for an LM built from a
    config, the vocabulary size and special ids the recipe left unset."""
    decoder = config.decoder
    if decoder.pretrained is None and decoder.hf_config is not None:
        hf = dict(decoder.hf_config)
        hf.setdefault("vocab_size", len(tokenizer))
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            if token_id is not None:
                hf.setdefault(f"{name}_token_id", token_id)
        decoder = dataclasses.replace(decoder, hf_config=hf)
    return dataclasses.replace(
        config, decoder=decoder, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )


class EpochStream:
    """Batches forever, epoch after epoch, with the position needed for an exact resume."""

    def __init__(self, loader, *, epoch: int = 0, position: int = 0):
        self.loader, self.epoch, self.position = loader, epoch, 0
        self._it = None
        for _ in range(position):  # fast-forward to where the checkpoint stopped
            self.next()

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self.loader.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
                self.position = 0
            try:
                batch = next(self._it)
                self.position += 1
                return batch
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
        raise TrainingError("the training data yielded no batch in a whole epoch; run `vlm data check` on it")


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def numerics(device: torch.device) -> dict[str, Any]:
    """What a run's losses depend on besides the recipe, the data and the code: the same seed
    repeats a run bit for bit only where these are the same too. The intra-op thread count
    splits reductions (sums over tokens, weight gradients) into a different number of partial
    sums, and the CPU's instruction set (AVX2, AVX-512) picks other kernels; a difference in
    the last bit at one step grows over a run's steps until the scores move."""
    found: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cpu":
        found["threads"] = torch.get_num_threads()
        found["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    else:
        found["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(recipe: Recipe, env: Dist) -> None:
    """Makes the shapes shards on first use (main process; the others wait)."""
    if not recipe.data.shapes:
        return
    if env.is_main:
        write_shapes(
            recipe.data.shapes,
            seed=recipe.run.seed,
            image_size=recipe.data.shapes_image_size,
            canvas=recipe.data.shapes_canvas,
        )
    if env.enabled:
        torch.distributed.barrier()


def build_training_model(recipe: Recipe, tokenizer) -> VisionLanguageModel:
    seed_everything(recipe.run.seed)  # frozen random parts are rebuilt identically on resume
    model = build_model(bind_tokenizer(recipe.model_config(), tokenizer))
    if recipe.run.init_from:
        load_weights(model, recipe.run.init_from)
    if recipe.run.gradient_checkpointing:
        model.decoder.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_train_loader(
    recipe: Recipe, model: VisionLanguageModel, processor: Processor, env: Dist, micro_batch: int, shards: str
):
    data = recipe.data
    by_example = data.split == "example"
    shard_rank = dict(rank=0, world_size=1) if by_example else dict(rank=env.rank, world_size=env.world_size)
    return make_loader(
        shards,
        processor,
        encoder_transform(model.encoder, mode=model.config.processor.resize),
        batch_size=micro_batch,
        tasks=data.tasks,
        num_workers=data.num_workers,
        example_split=(env.rank, env.world_size) if by_example else (0, 1),
        pack_turns=data.pack_turns,
        pack_length=data.pack_length,
        shuffle_buffer=data.shuffle_buffer,
        max_bad_fraction=data.max_bad_fraction,
        shard_timeout_s=data.shard_timeout_s,
        shard_retries=data.shard_retries,
        # Tiles see more of an image than one view: decode it in full.
        draft_size=model.encoder.image_size if data.draft_decode and not model.tiling.splits else None,
        seed=recipe.run.seed,
        **shard_rank,
    )


def set_aside_earlier_run(out: Path) -> Path | None:
    """Moves the run in ``out`` (checkpoints, model, logs, recipe) to ``out/previous-N``, N one
    past the last such folder, and says so; returns that folder, or None when ``out`` holds no run.

    A new run in a directory must not leave another run's checkpoints where pruning deletes its
    own (they sort by step) and ``--resume`` picks the other run's last one. Down there, neither
    does: they look at ``out/ckpt-*`` only. ``--out out/previous-N --resume`` continues that run.
    """
    found = checkpoints(out)
    # Checkpoints first, newest first (with any a kill left half written or half deleted).
    earlier = sorted((p for p in out.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)
    earlier += [out / name for name in RUN_FILES if (out / name).exists()]
    if not earlier:
        return None
    numbers = [p.name.removeprefix(PREVIOUS) for p in out.glob(f"{PREVIOUS}*")]
    aside = out / f"{PREVIOUS}{max((int(n) for n in numbers if n.isdigit()), default=0) + 1}"
    aside.mkdir()
    for path in earlier:
        path.rename(aside / path.name)
    last = f"last checkpoint {found[-1].name}" if found else "no checkpoint"
    log.warning(
        "%s holds an earlier run (%s): moved it to %s to start a new one; continue that one with "
        "--out %s --resume",
        out,
        last,
        aside,
        aside,
    )
    return aside


def check_resumable(out: Path, recipe: Recipe, step: int) -> None:
    """Refuses to resume the run in ``out`` (at checkpoint ``step``) with settings that change
    its batches or steps (``RESUMABLE_CHANGES`` lists those that may differ), naming each key
    with the run's value and the new one."""
    saved = out / RECIPE_FILE
    if not saved.is_file():
        log.warning("%s has no %s: --resume cannot check that the settings are the run's", out, RECIPE_FILE)
        return
    changes = recipe_changes(json.loads(saved.read_text()), recipe)
    refused = [
        f"{key}: {old!r} in the run, {new!r} now"
        for key, (old, new) in changes.items()
        if key not in RESUMABLE_CHANGES
    ]
    old_steps, max_steps = changes.get("run.max_steps", (None, None))
    if max_steps is not None and max_steps < step:
        refused.append(f"run.max_steps: {old_steps!r} in the run, {max_steps!r} now, below its step {step}")
    if refused:
        raise ConfigError(
            f"--resume would continue the run in {out} (step {step}) with settings other than its "
            f"own: {'; '.join(refused)}. Resume with the run's settings (in {saved}), or train "
            "without --resume to start a new run (the earlier one is moved aside)"
        )
    if max_steps is not None:
        log.warning(
            "run.max_steps is %s, the run's was %s: the learning-rate schedule now ends at step %s",
            max_steps,
            old_steps,
            max_steps,
        )


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs a recipe; returns a summary (final loss, steps, seconds, where the model is)."""
    env = init_distributed(recipe.run.device)
    finished = False
    try:
        summary = _train(recipe, env, resume=resume, progress=progress)
        finished = True
        return summary
    finally:  # after _train has returned, its model is garbage the cleanup can collect
        cleanup(env, finished=finished)


def _train(recipe: Recipe, env: Dist, *, resume: bool, progress: bool) -> dict[str, Any]:
    run, out = recipe.run, Path(recipe.run.out)
    per_step = env.world_size * run.grad_accum
    if run.batch_size % per_step:
        raise ConfigError(
            f"run.batch_size={run.batch_size} must be a multiple of world size x grad_accum = {per_step}"
        )
    micro_batch = run.batch_size // per_step
    # Before anything is written to out (the feature cache): a resumed run must be the one its
    # checkpoints come from, and a new one starts in a directory without another's.
    found = checkpoints(out) if resume else []
    if found:
        check_resumable(out, recipe, step=int(found[-1].name.removeprefix(PREFIX)))
    elif env.is_main and not resume and out.is_dir():  # the other ranks never read out's checkpoints
        set_aside_earlier_run(out)
    prepare_data(recipe, env)
    tokenizer = recipe_tokenizer(recipe.data.tokenizer)
    model = build_training_model(recipe, tokenizer).to(env.device)
    processor = Processor(
        tokenizer, tokens_per_image=model.tokens_per_image, config=model.config.processor, tiling=model.tiling
    )
    shards = recipe.data.train
    if not shards:
        raise ConfigError("data.train names no shards; set it in the recipe or with --set data.train=...")
    if run.cache_features:  # before wrapping: it runs the encoder on its own
        if env.is_main:
            build_feature_cache(
                model, shards, out / "feature-cache", resize=model.config.processor.resize, device=env.device
            )
        if env.enabled:
            torch.distributed.barrier()
        shards = str(out / "feature-cache")
    decoder = recipe.model_config().decoder
    wrapped = wrap_model(model, env, shard=not decoder.freeze and decoder.lora is None)
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    optimizer = make_optimizer(model, recipe.optim)
    scheduler = make_scheduler(optimizer, recipe.optim, run.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = {"step": 0, "epoch": 0, "position": 0, "skipped_steps": 0}
    if found:
        state.update(load_checkpoint(found[-1], model=model, optimizer=optimizer, scheduler=scheduler))
        if env.is_main:
            print(f"resuming from {found[-1]} (step {state['step']})")

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    run_log = RunLog(out, enabled=env.is_main, resume_step=state["step"] if found else None)
    if env.is_main:
        log.info("numerics (a run repeats bit for bit where these are the same): %s", numerics(env.device))
    loader = make_train_loader(recipe, model, processor, env, micro_batch, shards)
    stream = EpochStream(loader, epoch=state["epoch"], position=state["position"])
    if run.compile:
        wrapped = torch.compile(wrapped)
    model.train()

    def checkpoint() -> Path | None:  # every rank calls it: FSDP2 gathers the shards
        position = {
            "epoch": stream.epoch,
            "position": stream.position,
            "skipped_steps": state["skipped_steps"],
        }
        try:
            return save_checkpoint(
                out,
                state["step"],
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                state=position,
                keep=run.keep_last,
                write=env.is_main,
            )
        except CheckpointSpaceError as err:  # the earlier checkpoints are intact
            raise TrainingError(f"stopped at step {state['step']}: {err}") from None

    bar = tqdm(
        total=run.max_steps, initial=state["step"], desc="train", disable=not (progress and env.is_main)
    )
    bad_in_row, start, last_loss = 0, time.perf_counter(), float("nan")
    while state["step"] < run.max_steps:
        step_start = time.perf_counter()
        try:
            batches = [stream.next() for _ in range(run.grad_accum)]
        except BadDataError as err:
            raise TrainingError(f"stopped before step {state['step'] + 1}: {err}") from None
        tokens = all_reduce_sum(
            torch.tensor(
                sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), dtype=torch.float64
            ),
            env,
        ).item()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            inputs = {k: batch[k].to(env.device) for k in MODEL_INPUTS if k in batch}
            sync = (
                nullcontext()
                if i == len(batches) - 1 or not hasattr(wrapped, "no_sync")
                else wrapped.no_sync()
            )
            with sync, _autocast(run.precision, env.device):
                summed = wrapped(**inputs, loss_reduction="sum", full_logits=False).loss
            # DDP averages gradients over ranks, hence the world size factor.
            (summed * (env.world_size / max(tokens, 1))).backward()
            loss_sum += summed.detach().double().cpu()
        loss = all_reduce_sum(loss_sum, env).item() / max(tokens, 1)

        if not np.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] += 1
            bad_in_row += 1
            log.warning("non-finite loss (%s) at step %d: step skipped", loss, state["step"] + 1)
            if bad_in_row >= run.max_bad_steps:
                saved = checkpoint()
                raise TrainingError(
                    f"{bad_in_row} non-finite losses in a row at step {state['step'] + 1}; stopped. "
                    f"The last good state is saved in {saved}. Lower optim.lr, check the data with "
                    "`vlm data check`, or resume with --resume."
                )
            continue
        bad_in_row = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.optim.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        last_loss = loss

        seconds = time.perf_counter() - step_start
        record = {
            "step": state["step"],
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens),
            # Real tokens over row slots on this rank: what padding wastes (packing raises it).
            "fill": sum(int(b["attention_mask"].sum()) for b in batches)
            / sum(b["attention_mask"].numel() for b in batches),
            "samples_per_s": run.batch_size / seconds,
            "epoch": stream.epoch,
            "skipped_steps": state["skipped_steps"],
        }
        run_log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{record['samples_per_s']:.0f}")
        if state["step"] % run.save_every == 0 or state["step"] == run.max_steps:
            checkpoint()
    bar.close()
    run_log.close()

    summary = {
        "steps": state["step"],
        "final_loss": last_loss,
        "skipped_steps": state["skipped_steps"],
        "train_seconds": time.perf_counter() - start,
        "run_dir": str(out),
        "numerics": numerics(env.device),
    }
    full_state = gather_model_state(model) if is_sharded(model) else None  # a collective
    if env.is_main:
        summary["model"] = str(export(model, tokenizer, out / "model", state_dict=full_state))
        plot_loss(out / "log.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export(model: VisionLanguageModel, tokenizer, path: Path, state_dict: dict | None = None) -> Path:
    """The trained model for captioning and evaluation: bridge-only when the base can be
    rebuilt from its own files, otherwise full; the tokenizer goes with it.

    Args:
        state_dict: the gathered full weights of a sharded (FSDP2) model.
    """
    bridge_only = not bridge_only_problems(model.config)
    save_pretrained(model, path, bridge_only=bridge_only, tokenizer=tokenizer, state_dict=state_dict)
    return path
