"""Load generator for any TGI or OpenAI-compatible server.

A fixed prompt set (seeded) of exactly `--prompt-tokens` tokens each is sent at each concurrency
level, streamed; per level it reports request throughput, output tokens/s, time to first token
(TTFT) and inter-token latency (ITL) percentiles, and errors, as JSON.

    python benchmark/load.py --url http://127.0.0.1:3000 --api tgi \
        --tokenizer ~/.cache/sluice/models/SmolLM2-135M-Instruct --concurrency 1 16 \
        --requests 16 --prompt-tokens 128 --output-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

# fmt: off
WORDS = [
    "river", "stone", "light", "market", "garden", "winter", "number", "music", "paper", "window",
    "silver", "engine", "forest", "history", "letter", "morning", "ocean", "travel", "bridge",
    "animal", "season", "question", "family", "language", "summer", "mountain", "village",
    "energy", "picture", "doctor", "island", "country", "machine", "evening", "science",
    "theatre", "kitchen", "planet", "corner", "wonder", "harbour", "lantern", "meadow", "thunder",
    "velvet", "orchard", "canyon",
]
# fmt: on


def make_prompts(tokenizer: Tokenizer, count: int, prompt_tokens: int, seed: int) -> list[str]:
    """`count` distinct prompts of exactly `prompt_tokens` tokens, the same for a given seed."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(prompt_tokens * 2)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:prompt_tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_p95_s: float
    mean_output_tokens: float
    first_error: str = ""  # the first failed request's error, to tell why `errors` is not 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Target:
    """How to ask one kind of server for a streamed completion."""

    def __init__(self, url: str, api: str, model: str, output_tokens: int, ignore_eos: bool):
        self.url, self.api, self.model = url.rstrip("/"), api, model
        self.output_tokens, self.ignore_eos = output_tokens, ignore_eos

    def request(self, prompt: str) -> tuple[str, dict]:
        if self.api == "tgi":
            parameters = {"max_new_tokens": self.output_tokens}
            if self.ignore_eos:
                parameters["ignore_eos"] = True
            return f"{self.url}/generate_stream", {"inputs": prompt, "parameters": parameters}
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.output_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return f"{self.url}/v1/completions", body

    def tokens_in(self, event: dict) -> int:
        """Output tokens one streamed event carries."""
        if self.api == "tgi":
            return 1 if "token" in event else 0
        choices = event.get("choices") or []
        return 1 if choices and choices[0].get("text") is not None else 0


async def run_one(session: aiohttp.ClientSession, target: Target, prompt: str) -> RequestResult:
    url, body = target.request(prompt)
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return RequestResult(ok=False, error=f"{response.status}: {await response.text()}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data:") :])
                if "error" in event:
                    return RequestResult(ok=False, error=str(event["error"]))
                now = time.perf_counter()
                stamps.extend([now] * target.tokens_in(event))
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return RequestResult(ok=False, error=repr(e))
    if not stamps:
        return RequestResult(ok=False, error="no tokens")
    return RequestResult(
        ok=True,
        output_tokens=len(stamps),
        ttft_s=stamps[0] - start,
        latency_s=stamps[-1] - start,
        itl_s=[b - a for a, b in itertools.pairwise(stamps)],
    )


async def run_level(target: Target, prompts: list[str], concurrency: int) -> LevelResult:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                results.append(await run_one(session, target, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(good),
        duration_s=duration,
        request_throughput=len(good) / duration,
        output_tokens_per_s=tokens / duration,
        ttft_p50_s=percentile([r.ttft_s for r in good], 50),
        ttft_p95_s=percentile([r.ttft_s for r in good], 95),
        itl_p50_s=percentile([x for r in good for x in r.itl_s], 50),
        itl_p95_s=percentile([x for r in good for x in r.itl_s], 95),
        mean_output_tokens=statistics.fmean([r.output_tokens for r in good]) if good else 0.0,
        first_error=next((r.error for r in results if not r.ok), ""),
    )


async def benchmark(args: argparse.Namespace) -> list[LevelResult]:
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer).expanduser() / "tokenizer.json"))
    target = Target(args.url, args.api, args.model, args.output_tokens, args.ignore_eos)
    warmup = make_prompts(tokenizer, args.warmup, args.prompt_tokens, seed=args.seed + 1)
    await run_level(target, warmup, max(1, len(warmup)))
    levels = []
    for concurrency in args.concurrency:
        count = args.requests or 2 * concurrency
        prompts = make_prompts(tokenizer, count, args.prompt_tokens, seed=args.seed)
        level = await run_level(target, prompts, concurrency)
        print(json.dumps(asdict(level)), flush=True)
        levels.append(level)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api", choices=["tgi", "openai"], default="openai")
    parser.add_argument("--model", default="", help="model name for the OpenAI API")
    parser.add_argument("--tokenizer", required=True, help="model directory with tokenizer.json")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=0, help="per level; 0 = 2x concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    levels = asyncio.run(benchmark(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(level) for level in levels], indent=2))


if __name__ == "__main__":
    main()
