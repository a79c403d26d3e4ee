"""Turns logits into tokens: greedy or sampled, per request parameters, batched."""

from .sampler import Sampled, SamplingParams, SamplingRow, sample, token_logprobs

__all__ = ["Sampled", "SamplingParams", "SamplingRow", "sample", "token_logprobs"]
