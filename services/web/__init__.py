"""The web gateway: an HTTP API and one search page over the encoder, search and evaluator services."""
