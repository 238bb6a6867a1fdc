"""Shared server plumbing: gRPC server factory, errors, metrics, settings."""
