"""Tests of the evaluator: datasets and metrics."""
