"""Generated gRPC stubs of the retrieval API; rebuilt by scripts/gen_protos.py."""
