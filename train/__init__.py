"""Training: trainer, recipes, checkpoints, distributed."""

from vlm.train.recipe import Recipe, load_recipe
from vlm.train.trainer import train

__all__ = ["Recipe", "load_recipe", "train"]
