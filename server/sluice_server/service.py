"""The gRPC servicer: the router's TextGenerationService, served over a unix socket with grpc.aio.

Model work runs on the event loop's own thread, the process's main thread, one call at a time:
PyTorch's CPU thread pool ran decode steps at half speed when driven from a second thread
(measured: 28 ms against 14 ms per step), so a Health call waits for the step in progress.
Errors are reported per call and never stop the server:
INVALID_ARGUMENT for a request that breaks the contract (the shard's state is unchanged),
FAILED_PRECONDITION for a Step or ClearCache before Warmup (how the router learns that a shard
restarted), INTERNAL for anything else.

Health is real: it fails (UNAVAILABLE) while the last step failed with an internal error (a lost
device, a broken tensor-parallel group), until a step succeeds again, and on a GPU it checks that
the device still runs work. A wedged step shows as a Health call that does not return. Its
`warmed_up` stays false until the first Warmup.

The router sends its steps over one `Steps` stream (a call per step cost the shard about 0.7 ms
more of gRPC work, on the thread that runs the forward); `Step` runs one step per call, the same
way. Each step is traced as a span whose parent is the router's, from the
request's `trace_context` (Warmup: from the call's metadata; tracing.py); the executor's
`forward` and `sample` spans nest under it.
"""

import functools
import gc
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from .engine.contract import InvalidRequestError
from .engine.step import NotWarmedUpError, StepExecutor
from .pb import generate_pb2 as pb
from .pb import generate_pb2_grpc as pb_grpc
from .tracing import RANK_ATTRIBUTE, parent_context

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class TextGenerationServicer(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, executor: StepExecutor) -> None:
        self.executor = executor
        # The executor's: one tracer for the step and the spans under it.
        self.tracer = executor.tracer
        # Without an exporter the call's trace context is not even parsed.
        self.traced = not isinstance(self.tracer, trace.NoOpTracer)
        # Why the last step failed, when it failed with an internal error.
        self.step_failure: str | None = None

    async def _run(self, context: grpc.aio.ServicerContext, work: Callable[[], Result]) -> Result:
        try:
            # Blocking on purpose (see the module docstring): calls never overlap.
            return work()
        except InvalidRequestError as error:
            logger.warning("rejected: %s", error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except NotWarmedUpError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except Exception as error:
            logger.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        raise AssertionError("context.abort returned")

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        loaded = self.executor.loaded
        return pb.InfoResponse(
            model_type=loaded.config.model_type,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            vocab_size=loaded.config.vocab_size,
            eos_token_ids=list(loaded.eos_token_ids),
            max_position_embeddings=loaded.config.max_position_embeddings,
        )

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        if self.step_failure is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"the last step failed: {self.step_failure}"
            )
        await self._run(context, self.executor.check_device)
        return pb.HealthResponse(warmed_up=self.executor.warmed_up)

    async def Warmup(
        self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WarmupResponse:
        logger.info(
            "warmup: max_prefill_tokens=%d max_batch_size=%d max_total_tokens=%d",
            request.max_prefill_tokens,
            request.max_batch_size,
            request.max_total_tokens,
        )
        num_blocks = await self._run(context, lambda: self._warmup(request, self._parent(context)))
        # Everything allocated so far (the model, the cache, grpc and torch internals) lives for
        # the whole process: moved out of the collector's view, the periodic collections that
        # each step's short-lived objects trigger no longer walk it (a pause of milliseconds).
        gc.collect()
        gc.freeze()
        return pb.WarmupResponse(num_blocks=num_blocks, block_size=self.executor.block_size)

    async def Step(
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        return await self._run(context, lambda: self._step(request))

    async def Steps(
        self, requests: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        # A failed step aborts the call (in _run), which ends the stream with its status.
        async for request in requests:
            yield await self._run(context, functools.partial(self._step, request))

    def _parent(self, context: grpc.aio.ServicerContext) -> Context:
        """The router's span, from the call's metadata, when tracing."""
        return parent_context(context.invocation_metadata()) if self.traced else Context()

    def _warmup(self, request: pb.WarmupRequest, parent: Context) -> int:
        with self.tracer.start_as_current_span(
            "warmup", context=parent, kind=SpanKind.SERVER
        ) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        RANK_ATTRIBUTE: self.executor.loaded.shards.rank,
                        "sluice.max_prefill_tokens": request.max_prefill_tokens,
                        "sluice.max_batch_size": request.max_batch_size,
                        "sluice.max_total_tokens": request.max_total_tokens,
                    }
                )
            num_blocks = self.executor.warmup(
                request.max_prefill_tokens,
                request.max_batch_size,
                request.max_total_tokens,
                num_blocks=request.num_blocks or None,
            )
            span.set_attribute("sluice.num_blocks", num_blocks)
            return num_blocks

    def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        # The router's span, when tracing.
        parent = parent_context(request.trace_context.items()) if self.traced else Context()
        # Started here rather than in Step so that a failure is recorded as the executor's
        # exception, not as the abort that reports it.
        with self.tracer.start_as_current_span(
            "step", context=parent, kind=SpanKind.SERVER
        ) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        RANK_ATTRIBUTE: self.executor.loaded.shards.rank,
                        "sluice.new_requests": len(request.new_requests),
                        "sluice.scheduled_requests": len(request.scheduled),
                        "sluice.freed_requests": len(request.free_ids),
                        "sluice.tokens": sum(entry.num_tokens for entry in request.scheduled),
                    }
                )
            try:
                # Explicitly, so the executor's spans nest under this one whatever thread or
                # context it runs in.
                response = self.executor.step(request, trace.set_span_in_context(span))
            except (InvalidRequestError, NotWarmedUpError):
                raise  # The request's fault: the shard is as healthy as before.
            except Exception as error:
                self.step_failure = f"{type(error).__name__}: {error}"
                raise
            span.set_attribute("sluice.generations", len(response.generations))
        self.step_failure = None
        return response

    async def ClearCache(
        self, request: pb.ClearCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearCacheResponse:
        await self._run(context, self.executor.clear)
        return pb.ClearCacheResponse()


def create_server(servicer: TextGenerationServicer, address: str) -> grpc.aio.Server:
    """An unstarted server bound to `address`: `unix:///path`, or `host:port` (a rank that a
    router on another machine calls)."""
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    return server
