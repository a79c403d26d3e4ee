"""Tensor parallelism end to end: the real launcher splitting the default model (9 query heads,
3 KV heads) across three shard processes, and across three launchers as on three machines,
compared with one shard; a rank that dies has every rank restarted, and one death more than
--max-shard-restarts allows takes the whole server down with an error naming it, leaving no
process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, SluiceServer, free_port, serve, start_server
from helpers import generate, shard_pids, wait_for_health

PROMPTS = [
    f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    for question in [
        "What is the capital of France?",
        "Name three primary colours.",
        "Write a haiku about rain.",
        "How many legs does a spider have?",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
        "Why is the sky blue?",
        "What does a bee make?",
        "List the days of the week.",
        "Translate 'good morning' into Spanish.",
        "What is the boiling point of water?",
        "Who wrote Romeo and Juliet?",
        "Describe a cat in one sentence.",
        "What is the largest planet?",
        "Suggest a name for a dog.",
        "How do plants make food?",
    ]
]
MAX_NEW_TOKENS = 24
# A dead rank fails the collective the others are in, or is seen exiting, within this.
SHUTDOWN_AFTER_A_DEATH_S = 30


def greedy_outputs(server: SluiceServer) -> list[str]:
    """The 16 prompts sent at once, greedy."""
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        answers = pool.map(
            lambda prompt: generate(server, prompt, max_new_tokens=MAX_NEW_TOKENS), PROMPTS
        )
        return [answer["generated_text"] for answer in answers]


@pytest.fixture(scope="module")
def one_shard_outputs() -> list[str]:
    single = serve()
    server = next(single)
    outputs = greedy_outputs(server)
    next(single, None)  # Stops it, checking that it stops cleanly.
    return outputs


@pytest.fixture(scope="module")
def three_shards() -> Iterator[SluiceServer]:
    """Three ranks, restarted once; the last test kills one twice, otherwise it must stop
    cleanly."""
    server = start_server(
        "--num-shard", "3", "--master-port", str(free_port()), "--max-shard-restarts", "1"
    )
    yield server
    if server.process.poll() is None:
        code = server.stop()
        assert code == 0, f"launcher exited with {code} on SIGTERM:\n{server.log_tail()}"


def test_three_shards_answer_as_one(
    three_shards: SluiceServer, one_shard_outputs: list[str]
) -> None:
    assert sorted(shard_pids(three_shards)) == [0, 1, 2]
    assert greedy_outputs(three_shards) == one_shard_outputs


def test_a_shard_count_that_does_not_split_the_heads_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"does not split across 2 shards.*1, 3 shards"):
        start_server("--num-shard", "2", "--master-port", str(free_port()))


def test_a_dead_rank_restarts_every_rank_and_past_the_limit_stops_the_server(
    three_shards: SluiceServer, one_shard_outputs: list[str]
) -> None:
    before = shard_pids(three_shards)
    os.kill(before[1], signal.SIGKILL)
    # The group cannot go on without one of its ranks: all three start again, and the router
    # warms them up by itself.
    wait_for_health(three_shards, 503)
    wait_for_health(three_shards, 200)
    after = shard_pids(three_shards)
    assert sorted(after) == [0, 1, 2]
    assert not set(after.values()) & set(before.values())
    assert greedy_outputs(three_shards) == one_shard_outputs

    os.kill(after[1], signal.SIGKILL)
    code = three_shards.process.wait(timeout=SHUTDOWN_AFTER_A_DEATH_S)
    log = three_shards.log_tail(200)
    assert code != 0, log
    assert "giving up after 1 shard restarts (--max-shard-restarts 1)" in log, log
    assert "shard-1 exited with signal: 9 (SIGKILL)" in log, log
    assert shard_pids(three_shards) == {}


def test_three_nodes_answer_as_one(one_shard_outputs: list[str], tmp_path: Path) -> None:
    """Three launchers, one rank each, standing in for three machines: they bind distinct
    loopback addresses, so that each "node" has its own address as on a network."""
    launcher = shutil.which("sluice-launcher")
    assert launcher is not None, "run `make install` first"
    master_port, shard_port = free_port(), free_port()
    # fmt: off
    common = [
        "--model-id", DEFAULT_MODEL, "--dtype", "float32", "--num-shard", "1", "--nnodes", "3",
        "--master-addr", "127.0.0.1", "--master-port", str(master_port),
        "--shard-port", str(shard_port), "--shard-startup-timeout-s", "180",
    ]
    workers = []
    for node in (1, 2):
        log = (tmp_path / f"node-{node}.log").open("wb")
        workers.append(subprocess.Popen(
            [launcher, *common, "--node-rank", str(node), "--hostname", f"127.0.0.{node + 1}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    try:
        first = start_server(*common[4:], "--worker-addresses", "127.0.0.2,127.0.0.3")
        # fmt: on
        try:
            assert greedy_outputs(first) == one_shard_outputs
        finally:
            assert first.stop() == 0, first.log_tail()
        for node, worker in enumerate(workers, start=1):
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=60)
            assert code == 0, (tmp_path / f"node-{node}.log").read_text(errors="replace")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
