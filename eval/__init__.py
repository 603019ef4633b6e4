"""Baseline-vs-fine-tuned evaluation: generation, scoring, statistics and reports."""
