"""Evaluation: predictions, metrics, evaluation runs, benchmarks."""

from vlm.eval.evaluate import evaluate
from vlm.eval.predict import Predictor

__all__ = ["Predictor", "evaluate"]
