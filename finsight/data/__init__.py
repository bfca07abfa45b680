"""Data pipeline: sources, quality checks, chat formatting, batching, the data module."""
