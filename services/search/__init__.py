"""The search service: one Qdrant collection per (dataset, model), k-NN queries with payload filters."""
