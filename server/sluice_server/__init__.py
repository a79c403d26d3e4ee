"""Sluice model shard: weights, KV cache memory, forward passes and sampling, served over gRPC."""
