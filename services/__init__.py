"""Image-retrieval platform: encoder, search and evaluator gRPC services."""
