"""Evaluation: metrics, evaluation runs, benchmarks."""
