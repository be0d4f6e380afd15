"""Training: trainer, recipes, checkpoints, distributed."""
