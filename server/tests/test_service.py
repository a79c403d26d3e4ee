"""The gRPC service over a real unix socket: in-process, and through the `serve` command."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import sluice_server
from sluice_server.engine.step import StepExecutor
from sluice_server.models.loader import LoadedModel
from sluice_server.pb import generate_pb2 as pb
from sluice_server.pb import generate_pb2_grpc as pb_grpc
from sluice_server.service import TextGenerationServicer, create_server

SERVER_SOURCE_DIR = Path(sluice_server.__file__).resolve().parent.parent
WARMUP = pb.WarmupRequest(max_prefill_tokens=32, max_batch_size=4, max_total_tokens=64)


@asynccontextmanager
async def serving(
    servicer: TextGenerationServicer, socket_path: Path
) -> AsyncIterator[pb_grpc.TextGenerationServiceStub]:
    """The servicer on a real gRPC server at `socket_path`, and a client for it."""
    server = create_server(servicer, f"unix://{socket_path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            yield pb_grpc.TextGenerationServiceStub(channel)
    finally:
        await server.stop(grace=None)


def first_step(request_id: int) -> pb.StepRequest:
    return pb.StepRequest(
        new_requests=[
            pb.NewRequest(
                id=request_id,
                token_ids=[5, 17, 99, 42, 8],
                sampling=pb.SamplingParameters(),
            )
        ],
        scheduled=[pb.ScheduledRequest(id=request_id, num_tokens=5, new_blocks=[0, 1])],
    )


async def expect_error(call: "asyncio.Future[object]", code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code
    return error.value.details() or ""


def test_service_over_unix_socket(tmp_path: Path, tiny_loaded: LoadedModel) -> None:
    executor = StepExecutor(tiny_loaded, block_size=4, kv_cache_bytes=2**20)
    servicer = TextGenerationServicer(executor)
    socket_path = tmp_path / "shard.sock"

    async def scenario() -> None:
        async with serving(servicer, socket_path) as stub:
            info = await stub.Info(pb.InfoRequest())
            assert (info.model_type, info.dtype, info.device) == ("llama", "float32", "cpu")
            assert (info.vocab_size, list(info.eos_token_ids)) == (128, [2])
            assert info.max_position_embeddings == 256
            assert not (await stub.Health(pb.HealthRequest())).warmed_up

            await expect_error(stub.Step(first_step(0)), grpc.StatusCode.FAILED_PRECONDITION)
            await expect_error(
                stub.ClearCache(pb.ClearCacheRequest()), grpc.StatusCode.FAILED_PRECONDITION
            )
            warmup = await stub.Warmup(WARMUP)
            assert warmup.num_blocks > 0 and warmup.block_size == 4
            assert (await stub.Health(pb.HealthRequest())).warmed_up

            response = await stub.Step(first_step(0))
            assert [generation.id for generation in response.generations] == [0]
            assert response.total_ns >= response.forward_ns > 0

            bad = pb.StepRequest(
                scheduled=[pb.ScheduledRequest(id=0, num_tokens=1, new_blocks=[10**6])]
            )
            details = await expect_error(stub.Step(bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert "out of range" in details

            # Still serving, and the rejected step changed nothing.
            await stub.Health(pb.HealthRequest())
            response = await stub.Step(
                pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)])
            )
            assert len(response.generations) == 1

            await stub.ClearCache(pb.ClearCacheRequest())
            await expect_error(
                stub.Step(pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)])),
                grpc.StatusCode.INVALID_ARGUMENT,
            )

            def broken_step(request: pb.StepRequest, trace_context: object) -> pb.StepResponse:
                raise RuntimeError("device lost")

            working_step = executor.step
            executor.step = broken_step  # type: ignore[method-assign]
            details = await expect_error(stub.Step(pb.StepRequest()), grpc.StatusCode.INTERNAL)
            assert "device lost" in details
            # Unhealthy until a step succeeds again.
            details = await expect_error(
                stub.Health(pb.HealthRequest()), grpc.StatusCode.UNAVAILABLE
            )
            assert details == "the last step failed: RuntimeError: device lost"
            executor.step = working_step  # type: ignore[method-assign]
            await stub.Step(pb.StepRequest())
            await stub.Health(pb.HealthRequest())

    asyncio.run(scenario())


def test_steps_stream_answers_in_order_and_ends_with_a_failed_steps_status(
    tmp_path: Path, tiny_loaded: LoadedModel
) -> None:
    executor = StepExecutor(tiny_loaded, block_size=4, kv_cache_bytes=2**20)
    servicer = TextGenerationServicer(executor)
    decode = pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)])

    async def scenario() -> None:
        async with serving(servicer, tmp_path / "shard.sock") as stub:
            # Before Warmup the first step fails, and with it the stream.
            stream = stub.Steps()
            await stream.write(first_step(0))
            await expect_error(stream.read(), grpc.StatusCode.FAILED_PRECONDITION)

            await stub.Warmup(WARMUP)
            stream = stub.Steps()
            await stream.write(first_step(0))
            prompt = await stream.read()
            # Three steps sent before the first answer is read (as overlapped steps are): each
            # decodes the token the one before it sampled, and the answers come in order.
            for _ in range(3):
                await stream.write(decode)
            tokens = [(await stream.read()).generations[0].token_id for _ in range(3)]
            # The same tokens as one call per step, on a second request with the same prompt.
            second = first_step(1)
            second.scheduled[0].new_blocks[:] = [2, 3]
            await stream.write(second)
            assert (await stream.read()).generations[0].token_id == prompt.generations[0].token_id
            for token in tokens:
                one_step = pb.StepRequest(scheduled=[pb.ScheduledRequest(id=1, num_tokens=1)])
                assert (await stub.Step(one_step)).generations[0].token_id == token

            # A rejected step ends the stream with Step's status; the shard's state is unchanged
            # and a new stream goes on.
            await stream.write(pb.StepRequest(scheduled=[pb.ScheduledRequest(id=7, num_tokens=1)]))
            details = await expect_error(stream.read(), grpc.StatusCode.INVALID_ARGUMENT)
            assert details == "scheduled request 7: unknown id"
            stream = stub.Steps()
            # Request 0's ninth token starts its third block.
            await stream.write(
                pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1, new_blocks=[4])])
            )
            assert [g.id for g in (await stream.read()).generations] == [0]
            await stream.done_writing()
            assert await stream.read() == grpc.aio.EOF

    asyncio.run(scenario())


def run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sluice_server", *args],
        env={**os.environ, "PYTHONPATH": str(SERVER_SOURCE_DIR)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_healthy(
    process: subprocess.Popen[str], socket_path: Path, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if socket_path.exists():
            with grpc.insecure_channel(f"unix://{socket_path}") as channel:
                try:
                    pb_grpc.TextGenerationServiceStub(channel).Health(pb.HealthRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def test_serve_command_runs_until_sigterm(tmp_path: Path, tiny_llama) -> None:
    model_dir, _reference = tiny_llama
    socket_path = tmp_path / "shard.sock"
    # fmt: off
    process = run_cli(
        "serve", str(model_dir),
        "--uds-path", str(socket_path),
        "--kv-cache-memory", "1MB",
        "--dtype", "float32",
        "--log-format", "json",
    )
    # fmt: on
    try:
        wait_until_healthy(process, socket_path)
        with grpc.insecure_channel(f"unix://{socket_path}") as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            # Bytes per block: K and V, 2 layers, 16 tokens (the default block size), 2 KV heads,
            # head_dim 16, float32.
            assert stub.Warmup(WARMUP).num_blocks == 10**6 // (2 * 2 * 16 * 2 * 16 * 4)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    # Every line a JSON object, as the launcher reads them.
    logged = [json.loads(line) for line in stderr.splitlines()]
    assert {
        "level": "INFO",
        "logger": "sluice_server",
        "message": f"Server ready on unix://{socket_path}",
    } in logged
    assert not socket_path.exists()


def test_serve_command_fails_clearly_on_a_bad_model_dir(tmp_path: Path) -> None:
    process = run_cli(
        "serve", str(tmp_path / "missing"), "--uds-path", str(tmp_path / "shard.sock")
    )
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    missing_config = tmp_path / "missing" / "config.json"
    assert stderr.strip().splitlines()[-1] == (
        f"sluice-server: error: not a model directory: {missing_config} does not exist"
    )


def test_serve_command_refuses_an_unknown_max_cpu_isa(
    tmp_path: Path, tiny_llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_MAX_CPU_ISA", "avx512")
    process = run_cli(
        "serve", str(tiny_llama[0]), "--uds-path", str(tmp_path / "shard.sock"), "--device", "cpu"
    )
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "sluice-server: error: SLUICE_MAX_CPU_ISA must be one of avx2, portable, got 'avx512'"
    )
