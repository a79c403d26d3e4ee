"""Executes the router's steps: keeps the shard's requests and runs one forward pass per step.

A step, in order: forget `free_ids`; register `new_requests`; append each scheduled request's
`new_blocks` to its block table; run its next `num_tokens` tokens through the model in one flat
batch; and for every scheduled request whose tokens are now all computed, sample one token and
report it (with its top alternatives when asked). A request that asked for prompt log-probabilities
also has each prompt token its chunk predicts scored. Whether a request is done is the router's
decision alone: the shard keeps every request until `free_ids` names it.

The whole StepRequest is validated first (engine/contract.py), so a rejected step leaves the
shard's state as it was.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opentelemetry import trace
from opentelemetry.context import Context

from ..layers.attention import LayerKVCache, SequenceChunk
from ..models.loader import LoadedModel
from ..pb import generate_pb2 as pb
from ..sampling import SamplingParams, SamplingRow, sample, token_logprobs
from .contract import InvalidRequestError, StepLimits, validate_step
from .kv_cache import KVCacheSpec, default_cache_bytes
from .request import Request

logger = logging.getLogger(__name__)


class NotWarmedUpError(RuntimeError):
    """A Step arrived before Warmup allocated the KV cache."""


@dataclass(frozen=True)
class ForwardChunk:
    """Tokens of one sequence to run through the model, and which of them need logits: the last
    one to sample from (`needs_logits`), and the first `scored` ones to score the prompt tokens
    after them. The first `prompt_tokens` are the prompt's (the rest were generated)."""

    token_ids: Sequence[int]
    cache_len: int
    block_table: Sequence[int]
    needs_logits: bool
    scored: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class ForwardResult:
    # [number of chunks that need logits, vocab], in chunk order.
    logits: torch.Tensor
    # Per chunk, in order: its rows of `scored` logits in `scoring_logits`.
    scoring_logits: torch.Tensor | None
    forward_ns: int


def run_forward(
    loaded: LoadedModel,
    kv_cache: Sequence[LayerKVCache],
    chunks: Sequence[ForwardChunk],
) -> ForwardResult:
    """Flattens the chunks into one batch and runs the model once."""
    block_size = kv_cache[0].block_size
    device = loaded.device
    input_ids: list[int] = []
    positions: list[int] = []
    logits_rows: list[int] = []
    scoring_rows: list[int] = []
    prompt_rows: list[int] = []
    for chunk in chunks:
        scoring_rows.extend(range(len(input_ids), len(input_ids) + chunk.scored))
        prompt_rows.extend(range(len(input_ids), len(input_ids) + chunk.prompt_tokens))
        input_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.cache_len, chunk.cache_len + len(chunk.token_ids)))
        if chunk.needs_logits:
            logits_rows.append(len(input_ids) - 1)
    metadata = loaded.kernels.attention.build_metadata(
        [
            SequenceChunk(chunk.cache_len, len(chunk.token_ids), chunk.block_table)
            for chunk in chunks
        ],
        block_size,
        device,
    )
    start = time.perf_counter_ns()
    with torch.inference_mode():
        logits = loaded.model(
            torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            metadata,
            kv_cache,
            torch.tensor(logits_rows + scoring_rows, dtype=torch.long, device=device),
            torch.tensor(prompt_rows, dtype=torch.long, device=device) if prompt_rows else None,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # Kernels run asynchronously; time them to completion.
    # One LM head pass for both kinds of rows; the scoring ones come after the sampling ones.
    return ForwardResult(
        logits=logits[: len(logits_rows)],
        scoring_logits=logits[len(logits_rows) :] if scoring_rows else None,
        forward_ns=time.perf_counter_ns() - start,
    )


class StepExecutor:
    """The shard's engine: request state, KV cache, and the execution of Warmup and Step."""

    def __init__(
        self,
        loaded: LoadedModel,
        block_size: int,
        kv_cache_bytes: int | None,
        tracer: trace.Tracer | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.loaded = loaded
        # Spans around the forward pass and the sampling of each step (no-op by default).
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()
        self.block_size = block_size
        # None: size the cache from the memory available at warmup.
        self.kv_cache_bytes = kv_cache_bytes
        # None: the model's dtype.
        self.cache_spec = KVCacheSpec.for_model(loaded, block_size, kv_cache_dtype)
        self.requests: dict[int, Request] = {}
        self.kv_cache: list[LayerKVCache] | None = None
        # What a step is checked against; fixed by each warmup.
        self.step_limits: StepLimits | None = None

    @property
    def num_blocks(self) -> int:
        return 0 if self.kv_cache is None else self.kv_cache[0].key.shape[1]

    @property
    def warmed_up(self) -> bool:
        return self.kv_cache is not None

    def clear(self) -> None:
        """Forgets every request; before warmup it raises, so that a router that had warmed this
        shard up learns it restarted."""
        if not self.warmed_up:
            raise NotWarmedUpError("ClearCache before Warmup: this shard has not been warmed up")
        self.requests.clear()

    def check_device(self) -> None:
        """Raises if the device can no longer run work (a GPU lost or in an error state)."""
        device = self.loaded.device
        if device.type == "cuda":
            torch.ones(1, device=device).add_(1).cpu()
            torch.cuda.synchronize(device)

    def warmup(
        self,
        max_prefill_tokens: int,
        max_batch_size: int,
        max_total_tokens: int,
        num_blocks: int | None = None,
    ) -> int:
        """Runs a prefill of max_prefill_tokens tokens, then allocates the KV cache: `num_blocks`
        blocks when given (a restarted shard keeps the size the router settled on), otherwise on
        a GPU what memory allows, on a CPU no more than max_batch_size sequences of
        max_total_tokens can use.

        Returns the number of blocks allocated.
        """
        if max_prefill_tokens == 0 or max_batch_size == 0 or max_total_tokens == 0:
            raise InvalidRequestError(
                "max_prefill_tokens, max_batch_size and max_total_tokens must all be > 0"
            )
        self.requests.clear()
        self.kv_cache = None  # A second warmup resizes the cache; free the old one first.
        device = self.loaded.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        # The largest step the router may send, on temporary blocks, so that its activation memory
        # is known (CUDA) and any one-time setup happens now rather than on the first request.
        temporary_cache = self.cache_spec.allocate(self.cache_spec.blocks_for(max_prefill_tokens))
        vocab_size = self.loaded.config.vocab_size
        chunk = ForwardChunk(
            token_ids=[token % vocab_size for token in range(max_prefill_tokens)],
            cache_len=0,
            block_table=range(temporary_cache[0].key.shape[1]),
            needs_logits=True,
            # Every position scored too: a prompt_logprobs request's LM head covers its whole
            # chunk, the most logits one step can produce.
            scored=max_prefill_tokens - 1,
            prompt_tokens=max_prefill_tokens,
        )
        result = run_forward(self.loaded, temporary_cache, [chunk])
        # Every sampling feature on, so that the sampled path is exercised too.
        warmup_sampling = SamplingParams(
            do_sample=True,
            top_k=50,
            top_p=0.9,
            repetition_penalty=1.1,
            typical_p=0.95,
            min_p=0.05,
            frequency_penalty=0.1,
            presence_penalty=0.1,
        )
        # Half of the tokens as output, for the output penalties to count.
        prompt_len = len(chunk.token_ids) // 2
        sample(
            result.logits,
            [SamplingRow(warmup_sampling, chunk.token_ids, prompt_len, top_n=5)],
            self.loaded.kernels.ops,
        )
        del temporary_cache, result

        warmup_peak_bytes = 0
        if device.type == "cuda":
            warmup_peak_bytes = torch.cuda.max_memory_allocated(device) - allocated_before
            torch.cuda.empty_cache()
        if num_blocks is not None:
            cache_bytes = num_blocks * self.cache_spec.bytes_per_block
        elif self.kv_cache_bytes is not None:
            cache_bytes = self.kv_cache_bytes
        else:
            cache_bytes = default_cache_bytes(
                device, warmup_peak_bytes, self.loaded.shards.world_size
            )
            if device.type == "cpu":
                # Host memory is shared with everything else: take no more than a full batch of
                # the longest sequences could use.
                most_useful = max_batch_size * self.cache_spec.blocks_for(max_total_tokens)
                cache_bytes = min(cache_bytes, most_useful * self.cache_spec.bytes_per_block)
        num_blocks = max(cache_bytes, 0) // self.cache_spec.bytes_per_block
        # Whether a sequence of max_total_tokens fits is the router's to check: it settles its
        # limits from the size returned here.
        if num_blocks == 0:
            raise InvalidRequestError(
                f"the memory for the KV cache ({max(cache_bytes, 0)} bytes) holds no block of "
                f"{self.block_size} tokens ({self.cache_spec.bytes_per_block} bytes); give the "
                f"cache more memory (--kv-cache-memory)"
            )
        self.kv_cache = self.cache_spec.allocate(num_blocks)
        self.step_limits = StepLimits(
            vocab_size=self.loaded.config.vocab_size,
            max_position_embeddings=self.loaded.config.max_position_embeddings,
            num_blocks=num_blocks,
            block_size=self.block_size,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
            num_blocks,
            self.block_size,
            num_blocks * self.cache_spec.bytes_per_block / 2**30,
            str(self.cache_spec.dtype).removeprefix("torch."),
        )
        if any(scales != (1.0, 1.0) for scales in self.loaded.model.kv_cache_scales()):
            if self.cache_spec.scales:  # An 8-bit cache's.
                logger.info("KV cache: keys and values stored divided by the checkpoint's scales")
            else:
                logger.info(
                    "the checkpoint has KV cache scales, which apply with --kv-cache-dtype "
                    "fp8_e4m3fn"
                )
        return num_blocks

    def step(
        self, step_request: pb.StepRequest, trace_context: Context | None = None
    ) -> pb.StepResponse:
        """Runs one step, as the module docstring describes; its `forward` and `sample` spans
        are children of the span in `trace_context` (default: the current context)."""
        start = time.perf_counter_ns()
        if self.kv_cache is None or self.step_limits is None:
            raise NotWarmedUpError("Step before Warmup: the KV cache is not allocated yet")
        new_requests = validate_step(step_request, self.requests, self.step_limits)

        for request_id in step_request.free_ids:
            del self.requests[request_id]
        for request in new_requests:
            self.requests[request.id] = request
        scheduled: list[tuple[Request, int]] = []
        for entry in step_request.scheduled:
            request = self.requests[entry.id]
            request.block_table.extend(entry.new_blocks)
            scheduled.append((request, entry.num_tokens))
        if not scheduled:
            return pb.StepResponse(total_ns=time.perf_counter_ns() - start)

        chunks = [
            ForwardChunk(
                token_ids=request.token_ids[
                    request.num_computed : request.num_computed + num_tokens
                ],
                cache_len=request.num_computed,
                block_table=request.block_table,
                needs_logits=request.num_computed + num_tokens == len(request.token_ids),
                scored=request.prompt_tokens_scored_by(num_tokens),
                prompt_tokens=request.prompt_tokens_in(num_tokens),
            )
            for request, num_tokens in scheduled
        ]
        with self.tracer.start_as_current_span("forward", context=trace_context) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        "sluice.sequences": len(chunks),
                        "sluice.tokens": sum(len(chunk.token_ids) for chunk in chunks),
                    }
                )
            result = run_forward(self.loaded, self.kv_cache, chunks)
        prompt_logprobs = _score_prompts(scheduled, chunks, result.scoring_logits)
        for request, num_tokens in scheduled:
            request.num_computed += num_tokens

        sampling_requests = [
            request
            for (request, _), chunk in zip(scheduled, chunks, strict=True)
            if chunk.needs_logits
        ]
        with self.tracer.start_as_current_span("sample", context=trace_context) as span:
            if span.is_recording():
                span.set_attribute("sluice.sequences", len(sampling_requests))
            sampled = sample(
                result.logits,
                [
                    SamplingRow(
                        request.sampling,
                        request.token_ids,
                        request.prompt_len,
                        request.top_n_tokens,
                    )
                    for request in sampling_requests
                ],
                self.loaded.kernels.ops,
            )
        # Every rank continues each sequence with rank 0's token (the one the router is told).
        token_ids = self.loaded.shards.broadcast_from_first(sampled.token_ids, self.loaded.device)
        generations = []
        for request, token_id, logprob, top_tokens in zip(
            sampling_requests, token_ids, sampled.logprobs, sampled.top_tokens, strict=True
        ):
            request.token_ids.append(token_id)
            generations.append(
                pb.Generation(
                    id=request.id,
                    token_id=token_id,
                    logprob=logprob,
                    top_tokens=[
                        pb.TokenLogprob(token_id=top_id, logprob=top_logprob)
                        for top_id, top_logprob in top_tokens
                    ],
                )
            )
        return pb.StepResponse(
            generations=generations,
            prompt_logprobs=prompt_logprobs,
            forward_ns=result.forward_ns,
            total_ns=time.perf_counter_ns() - start,
        )


def _score_prompts(
    scheduled: Sequence[tuple[Request, int]],
    chunks: Sequence[ForwardChunk],
    scoring_logits: torch.Tensor | None,
) -> list[pb.PromptLogprobs]:
    """The prompt tokens each chunk predicts, scored by the logits of the positions before them
    (called before the chunk's tokens count as computed)."""
    if scoring_logits is None:
        return []
    scores = []
    row = 0
    for (request, _), chunk in zip(scheduled, chunks, strict=True):
        if chunk.scored == 0:
            continue
        first = request.num_computed + 1
        targets = request.token_ids[first : first + chunk.scored]
        logprobs = token_logprobs(scoring_logits[row : row + chunk.scored], targets)
        scores.append(pb.PromptLogprobs(id=request.id, start=first, logprobs=logprobs))
        row += chunk.scored
    return scores
