"""Metrics and evaluation sets, the held-out evaluator, training-time samples and prediction output."""
