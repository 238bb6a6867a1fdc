"""The encoder service: images and texts to L2-normalised embeddings."""
