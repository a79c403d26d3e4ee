"""Turns logits into tokens: greedy or sampled, per request parameters, batched."""

from .sampler import SamplingParams, SamplingRow, sample

__all__ = ["SamplingParams", "SamplingRow", "sample"]
