"""The evaluator: datasets, retrieval protocols and metrics, reports."""
