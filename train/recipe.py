"""Training recipes: TOML files with four tables, ``model``, ``data``, ``optim`` and ``run``.

Any key can be overridden from the command line with ``--set table.key=value`` (values are
parsed as TOML, so ``--set optim.lr=3e-4`` is a float and ``--set data.tasks=["vqa"]`` a list,
and checked against the key's field: see ``vlm.train.overrides``; ``null`` unsets an optional
key). Unknown keys fail fast, naming the key.
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from vlm.config import ModelConfig
from vlm.schema import ConfigError, parse_dataclass
from vlm.train.overrides import apply_overrides

#: The shipped recipes (``shapes.toml``, ``llava_stage1.toml``, ...), installed or not.
RECIPES = Path(str(files("vlm.train") / "recipes"))


#: Recipe keys that moved from [data] to [model.processor] (they travel with the saved model).
MOVED_TO_PROCESSOR = {"max_length", "resize", "templates"}


@dataclass
class DataConfig:
    """Where the examples come from.

    Args:
        train, val: shard specs (files, directories, globs, brace patterns, URLs), or a list
            of them: their shards are shuffled together.
        tokenizer: a local tokenizer directory (it must hold, or will be given, ``<image>``).
        shapes: generate the shapes dataset in this directory when its shards are missing.
        shapes_image_size: the side of the generated shapes images, in pixels.
        shapes_canvas: ``[width, height]``: generate the high-resolution shapes variant, every
            image that large with its objects as small as at ``shapes_image_size``.
        tasks: examples drawn from each sample, among ``caption``, ``vqa``, ``chat`` (its
            conversation) and ``document`` (its interleaved text); default: all it holds.
        split: ``"shard"`` deals shards to ranks (scales, each sample once per epoch);
            ``"example"`` deals examples round robin, so any number of ranks sees the same
            global batches as one process.
        pack_turns: one sequence per sample, its caption and questions as turns after one
            shared image prefix (each turn attends to the images and itself only), instead of
            one sequence per example.
        pack_length: several examples (or packed samples) per row, up to this many tokens,
            each attending to itself only: no padding to pay for. 0: one per row. Batches
            then hold ``run.batch_size`` rows of this length. Each rank packs its own examples,
            so with ``split = "example"`` the global batches are no longer one process's.
        max_bad_fraction: stop the run, naming the worst shards, when more than this share of
            the samples read is undecodable or lacks its text (a few bad samples are skipped
            and counted; mostly bad data is a wrong path or a broken download).
        draft_decode: decode JPEGs at least twice the encoder's size at 1/2, 1/4 or 1/8 scale
            in the JPEG decoder itself (Pillow's draft mode), never below the encoder's size:
            1.3x to 1.45x the images/s of one worker at 224 px from 640 x 480 photos
            (``eval/results/bench-*.md``), with pixels a little off full decoding's.
        shard_timeout_s: a remote (``http(s)://``) or ``pipe:`` shard that sends nothing for
            this long is given up (counted as ``stalled``), so a run never hangs on one.
        shard_retries: times a cut connection to a remote shard is reopened where it stopped.
    """

    train: str | list[str] = ""
    val: str | list[str] = ""
    tokenizer: str = ""
    shapes: str = ""
    shapes_image_size: int = 64
    shapes_canvas: list[int] | None = None
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa", "chat", "document"])
    shuffle_buffer: int = 1000
    num_workers: int = 0
    split: str = "shard"
    pack_turns: bool = False
    pack_length: int = 0
    max_bad_fraction: float = 0.5
    draft_decode: bool = False
    shard_timeout_s: float = 60.0
    shard_retries: int = 3


@dataclass
class OptimConfig:
    """AdamW (no weight decay on norms, biases and gates) with warmup and cosine decay."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    """How long, how, and where.

    Args:
        batch_size: global batch per optimizer step (split over ranks and accumulation).
        grad_accum: micro-batches per optimizer step on each rank.
        precision: ``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``.
        max_bad_steps: stop after this many non-finite losses in a row.
        init_from: a saved model (full or bridge-only) to start from, e.g. a stage-1 run.
    """

    out: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    cache_features: bool = False
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    max_bad_steps: int = 5
    init_from: str = ""
    device: str = "auto"


@dataclass
class Recipe:
    model: dict[str, Any]
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    path: str = ""

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": asdict(self.data),
            "optim": asdict(self.optim),
            "run": asdict(self.run),
        }


#: The recipe's tables and the dataclasses that type their keys (``model``: the model config).
TABLES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Reads a recipe TOML and applies ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no recipe at {str(path)!r}; recipes live in train/recipes/")
    tree = tomllib.loads(path.read_text())
    return recipe_from_dict(tree, overrides, source=str(path))


def recipe_from_dict(tree: dict[str, Any], overrides: list[str] = (), source: str = "") -> Recipe:
    tree = copy.deepcopy(tree)
    for table in ("model", "data", "optim", "run"):
        tree.setdefault(table, {})
    unknown = sorted(set(tree) - {"model", "data", "optim", "run"})
    if unknown:
        raise ConfigError(
            f"recipe: unknown table(s) {', '.join(map(repr, unknown))}; tables are model, data, optim, run"
        )
    apply_overrides(tree, overrides, TABLES)
    moved = sorted(set(tree["data"]) & MOVED_TO_PROCESSOR)
    if moved:
        raise ConfigError(
            f"data.{moved[0]} is a setting of the model's processor now, saved with the model: "
            f"write it as model.processor.{moved[0]} ([model.processor] in the recipe)"
        )
    recipe = Recipe(
        model=tree["model"],
        data=parse_dataclass(DataConfig, tree["data"], where="data"),
        optim=parse_dataclass(OptimConfig, tree["optim"], where="optim"),
        run=parse_dataclass(RunConfig, tree["run"], where="run"),
        path=source,
    )
    recipe.model_config()  # validate model keys now, not after data is ready
    if recipe.data.split not in ("shard", "example"):
        raise ConfigError("data.split must be 'shard' or 'example'")
    if recipe.run.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError("run.precision must be 'auto', 'bf16' or 'fp32'")
    return recipe


#: The keys a resumed run may change: where it writes, what runs it, how often it saves and logs,
#: when it stops, not which batches it sees or what a step computes. ``run.max_steps`` may change
#: too, down to the checkpoint's step (the learning-rate schedule then ends at the new value):
#: raising it is how a run is extended. ``run.cache_features`` feeds the same samples in the same
#: order, and ``data.val`` is not read in training. Every other key (the model, data.train,
#: tasks, packing, shuffle_buffer, num_workers, optim.*, batch_size, grad_accum, seed, precision,
#: init_from, ...) decides the batches or the steps, and must equal the run's ``recipe.json``.
RESUMABLE_CHANGES = frozenset(
    {
        "run.out",
        "run.max_steps",
        "run.save_every",
        "run.keep_last",
        "run.log_every",
        "run.max_bad_steps",
        "run.device",
        "run.compile",
        "run.gradient_checkpointing",
        "run.cache_features",
        "data.val",
        "data.max_bad_fraction",
        "data.shard_timeout_s",
        "data.shard_retries",
    }
)

#: The value of a key one recipe has and the other lacks.
ABSENT = "(not set)"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(tree: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict's settings with every default filled in, as JSON reads them back (tuples as
    lists), one dotted key each: a key written out at its default equals one left out."""
    try:
        recipe = recipe_from_dict(tree)
        tree = {**recipe.to_dict(), "model": recipe.model_config().to_dict()}
    except ConfigError:  # written by an older vlm: compared as written
        pass
    return _flat(json.loads(json.dumps(tree)))


def recipe_changes(saved: dict[str, Any], recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """The settings ``recipe`` changes from a run's saved ``recipe.json``: ``{key: (old, new)}``."""
    old, new = _settings(saved), _settings(recipe.to_dict())
    return {
        key: (old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, ABSENT) != new.get(key, ABSENT)
    }
