"""Serving stage: the batching engine, KV-cached generation and the Ray Serve deployment."""
