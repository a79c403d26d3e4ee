"""What the way steps reach a shard costs: a real shard's steps sent one Step call after another,
two calls in flight (the next call sent while the shard runs the current one), one after another
over a `Steps` stream, and two in flight over the stream (as the router sends overlapped steps).

Starts `sluice-server serve` on a unix socket (or, with `--server-source`, another checkout's),
admits `--batch` sequences of `--prompt-tokens` tokens, then times decode steps of all of them,
the ways taking turns round after round in one run. Reports per way the wall time per step, the
shard's own time per step (`total_ns`, from the step's answer) and the gap between them; and the
round trip of an empty step, by call and over a stream: the fixed cost of a step. Every way sends
the same decode step, so the order the shard runs them in does not change the work.

    python benchmark/step_pipelining.py --batch 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from profile_step import BLOCK_SIZE, admission_step, decode_step
from run_all import DEFAULT_MODEL
from servers import venv_bin
from sluice_server.pb import generate_pb2 as pb
from sluice_server.pb import generate_pb2_grpc as pb_grpc


async def admit(
    stub: pb_grpc.TextGenerationServiceStub, batch: int, args: argparse.Namespace
) -> None:
    """`batch` sequences with blocks for every step the run will take."""
    max_new = len(WAYS) * args.rounds * args.steps + 8
    await stub.Warmup(
        pb.WarmupRequest(
            max_prefill_tokens=max(args.prompt_tokens, 64),
            max_batch_size=batch,
            max_total_tokens=args.prompt_tokens + max_new,
            num_blocks=batch * -(-(args.prompt_tokens + max_new) // BLOCK_SIZE),
        )
    )
    await stub.Step(admission_step(batch, args.prompt_tokens, max_new))


async def one_at_a_time(
    stub: pb_grpc.TextGenerationServiceStub, step: pb.StepRequest, steps: int
) -> tuple[float, float]:
    """Wall ms per step and the shard's ms per step, each call awaited before the next."""
    shard_ns = 0
    start = time.perf_counter()
    for _ in range(steps):
        shard_ns += (await stub.Step(step)).total_ns
    return (time.perf_counter() - start) / steps * 1e3, shard_ns / steps / 1e6


async def two_in_flight(
    stub: pb_grpc.TextGenerationServiceStub, step: pb.StepRequest, steps: int
) -> tuple[float, float]:
    """The same, with the next call sent before the current one's answer is awaited."""
    shard_ns = 0
    start = time.perf_counter()
    current = asyncio.ensure_future(stub.Step(step))
    for _ in range(steps - 1):
        await asyncio.sleep(0)  # Lets the current call go out first.
        following = asyncio.ensure_future(stub.Step(step))
        shard_ns += (await current).total_ns
        current = following
    shard_ns += (await current).total_ns
    return (time.perf_counter() - start) / steps * 1e3, shard_ns / steps / 1e6


async def over_a_stream(
    stub: pb_grpc.TextGenerationServiceStub, step: pb.StepRequest, steps: int
) -> tuple[float, float]:
    """The same, one step at a time over one `Steps` stream."""
    stream = stub.Steps()
    shard_ns = 0
    start = time.perf_counter()
    for _ in range(steps):
        await stream.write(step)
        shard_ns += (await stream.read()).total_ns
    elapsed = time.perf_counter() - start
    await stream.done_writing()
    return elapsed / steps * 1e3, shard_ns / steps / 1e6


async def two_in_flight_over_a_stream(
    stub: pb_grpc.TextGenerationServiceStub, step: pb.StepRequest, steps: int
) -> tuple[float, float]:
    """Over one `Steps` stream, the next step written before the current one's answer is read,
    as the router sends overlapped steps."""
    stream = stub.Steps()
    shard_ns = 0
    start = time.perf_counter()
    await stream.write(step)
    for _ in range(steps - 1):
        await stream.write(step)
        shard_ns += (await stream.read()).total_ns
    shard_ns += (await stream.read()).total_ns
    elapsed = time.perf_counter() - start
    await stream.done_writing()
    return elapsed / steps * 1e3, shard_ns / steps / 1e6


async def empty_round_trip_ms(stub: pb_grpc.TextGenerationServiceStub, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await stub.Step(pb.StepRequest())
    return (time.perf_counter() - start) / calls * 1e3


async def empty_stream_round_trip_ms(stub: pb_grpc.TextGenerationServiceStub, steps: int) -> float:
    return (await over_a_stream(stub, pb.StepRequest(), steps))[0]


WAYS = {
    "one at a time": one_at_a_time,
    "two in flight": two_in_flight,
    "over a stream": over_a_stream,
    "two in flight over a stream": two_in_flight_over_a_stream,
}


async def measure(socket: Path, batch: int, args: argparse.Namespace) -> dict[str, object]:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)
        await admit(stub, batch, args)
        decode = decode_step(batch)
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
        for round_index in range(args.rounds):
            order = list(WAYS.items())[:: -1 if round_index % 2 else 1]
            for name, way in order:
                timings[name].append(await way(stub, decode, args.steps))
        result: dict[str, object] = {"batch": batch}
        for name, rounds in timings.items():
            wall = statistics.median(r[0] for r in rounds)
            shard = statistics.median(r[1] for r in rounds)
            result[name] = {
                "ms_per_step": round(wall, 2),
                "shard_ms_per_step": round(shard, 2),
                "gap_ms": round(wall - shard, 2),
                "rounds_ms_per_step": [round(r[0], 2) for r in rounds],
            }
        result["empty_step_round_trip_ms"] = round(await empty_round_trip_ms(stub, 300), 3)
        result["empty_step_round_trip_ms_stream"] = round(
            await empty_stream_round_trip_ms(stub, 300), 3
        )
        # The next batch starts from an empty shard.
        await stub.ClearCache(pb.ClearCacheRequest())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="decode steps per way and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--server-source",
        type=Path,
        help="run the shard from this checkout's server/ folder (another revision) instead of "
        "the installed one",
    )
    args = parser.parse_args()

    socket = Path(tempfile.mkdtemp(prefix="sluice-pipelining-")) / "shard.sock"
    server = venv_bin() / "sluice-server"
    command = [str(server if server.exists() else "sluice-server")]
    env = dict(os.environ)
    if args.server_source:
        command = [sys.executable, "-m", "sluice_server"]
        env["PYTHONPATH"] = str(args.server_source.resolve() / "server")
    shard = subprocess.Popen(
        [
            *command,
            "serve",
            "--uds-path",
            str(socket),
            "--dtype",
            args.dtype,
            str(args.model.expanduser()),
        ],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while not socket.exists():
            if shard.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the shard did not start")
            time.sleep(0.5)
        for batch in args.batch:
            print(json.dumps(asyncio.run(measure(socket, batch, args))), flush=True)
    finally:
        shard.terminate()
        shard.wait(timeout=60)


if __name__ == "__main__":
    main()
