"""Adapters: metric-learning heads trained on cached embeddings of a catalogue, served by the encoder
as ``<base>+<name>`` models (no gRPC server of their own)."""
