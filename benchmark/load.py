"""Load generator for any TGI or OpenAI-compatible server.

A fixed prompt set (seeded) of exactly `--prompt-tokens` tokens each is sent at each concurrency
level, streamed, through one route (`--route`):

    generate_stream  TGI's POST /generate_stream (`inputs`, `parameters.max_new_tokens`,
                     `details` for the server's token count)
    completions      OpenAI's POST /v1/completions (`prompt`, `max_tokens`)
    chat             OpenAI's POST /v1/chat/completions (the prompt as one user message, which the
                     server's chat template wraps: the model sees more than --prompt-tokens)

Every request is greedy unless --temperature (and --top-p) ask for sampling. With --ignore-eos,
it asks the server (`ignore_eos`, vLLM's and Sluice's extension on the OpenAI routes) to produce
exactly --output-tokens tokens. The OpenAI routes ask for `stream_options.include_usage`.

Per level it reports request throughput, output tokens/s, time to first token (TTFT: to the first
chunk carrying text), inter-token latency (ITL: between consecutive chunks carrying text) and
errors, as JSON. Output tokens are the server's own count (the usage chunk on the OpenAI routes,
`details.generated_tokens` on generate_stream); a server that sends neither gets its chunks
carrying text counted instead, and `tokens_counted_from` says which.

A chat replay (`run_chat`, run_all.py's chat workload) holds conversations instead: each turn
sends the whole conversation so far plus a new user message, so that every prompt begins with
the previous one and a server's prefix cache can skip it; it reports TTFT per turn.

    python benchmark/load.py --url http://127.0.0.1:3000 --route completions --ignore-eos \
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


ROUTES = ("generate_stream", "completions", "chat")
OPENAI_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# A conversation so far: [{"role": "user" | "assistant", "content": text}, ...]
Messages = list[dict[str, str]]


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    # "server" (usage chunk or details) or "chunks" (the chunks carrying text, counted here)
    tokens_counted_from: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    text: str = ""
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
    # The longest wait of any request between two of its tokens: a step that carries a prompt
    # chunk holds up every running request for its whole length, however rare such steps are.
    itl_max_s: float
    mean_output_tokens: float
    tokens_counted_from: str  # "server", "chunks", or both joined by "+" when requests differed
    first_error: str = ""  # the first failed request's error, to tell why `errors` is not 0
    # A chat replay's TTFT per turn: the median over its conversations.
    ttft_p50_s_by_turn: list[float] = field(default_factory=list)
    # Every answered request's TTFT, in the order they finished: with a few requests the p95 is
    # the slowest one, and this tells whether it was the first.
    ttfts_s: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Target:
    """How to ask one server for a streamed answer on one route, and how to read its chunks."""

    def __init__(
        self,
        url: str,
        route: str,
        model: str,
        output_tokens: int,
        ignore_eos: bool,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ):
        self.url, self.route, self.model = url.rstrip("/"), route, model
        self.output_tokens, self.ignore_eos = output_tokens, ignore_eos
        self.temperature, self.top_p = temperature, top_p

    def request(self, prompt: str | Messages) -> tuple[str, dict]:
        """The URL and body asking for an answer to `prompt`: a text, or a conversation, which
        the chat route sends as messages and the other routes as its texts, one per line."""
        if not isinstance(prompt, str) and self.route != "chat":
            prompt = "\n".join(message["content"] for message in prompt)
        if self.route == "generate_stream":
            parameters = {"max_new_tokens": self.output_tokens, "details": True}
            if self.temperature > 0:
                parameters.update(do_sample=True, temperature=self.temperature)
                if self.top_p < 1:
                    parameters["top_p"] = self.top_p
            if self.ignore_eos:
                parameters["ignore_eos"] = True
            return f"{self.url}/generate_stream", {"inputs": prompt, "parameters": parameters}
        body: dict = {
            "model": self.model,
            "max_tokens": self.output_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.top_p < 1:
            body["top_p"] = self.top_p
        if self.route == "chat":
            body["messages"] = (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            )
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return f"{self.url}{OPENAI_PATHS[self.route]}", body

    def text_in(self, event: dict) -> str:
        """The text one streamed event carries ("" for none: a role-only or usage chunk)."""
        if self.route == "generate_stream":
            token = event.get("token") or {}
            return "" if token.get("special") else token.get("text") or ""
        choices = event.get("choices") or []
        if not choices:
            return ""
        if self.route == "chat":
            return (choices[0].get("delta") or {}).get("content") or ""
        return choices[0].get("text") or ""

    def server_count(self, event: dict) -> int | None:
        """The server's count of output tokens, on the event that carries it."""
        if self.route == "generate_stream":
            details = event.get("details") or {}
            return details.get("generated_tokens")
        return (event.get("usage") or {}).get("completion_tokens")


async def run_one(
    session: aiohttp.ClientSession, target: Target, prompt: str | Messages
) -> RequestResult:
    url, body = target.request(prompt)
    start = time.perf_counter()
    stamps: list[float] = []  # when each chunk carrying text arrived
    pieces: list[str] = []
    counted: int | None = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return RequestResult(ok=False, error=f"{response.status}: {await response.text()}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[len("data:") :])
                if "error" in event:
                    return RequestResult(ok=False, error=str(event["error"]))
                if text := target.text_in(event):
                    stamps.append(now)
                    pieces.append(text)
                count = target.server_count(event)
                if count is not None:
                    counted = count
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return RequestResult(ok=False, error=repr(e))
    if not stamps:
        return RequestResult(ok=False, error="no text")
    return RequestResult(
        ok=True,
        output_tokens=counted if counted is not None else len(stamps),
        tokens_counted_from="server" if counted is not None else "chunks",
        ttft_s=stamps[0] - start,
        latency_s=stamps[-1] - start,
        itl_s=[b - a for a, b in itertools.pairwise(stamps)],
        text="".join(pieces),
    )


async def run_pool(
    items: list, concurrency: int, handle: Callable[[aiohttp.ClientSession, Any], Awaitable[None]]
) -> float:
    """Hands `items` to `concurrency` workers on one session, each taking the next item when it
    is done with its last; returns the seconds until every item was handled."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    async with session_for(concurrency) as session:

        async def worker() -> None:
            while not queue.empty():
                await handle(session, queue.get_nowait())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


async def run_level(target: Target, prompts: list[str], concurrency: int) -> LevelResult:
    results: list[RequestResult] = []

    async def ask(session: aiohttp.ClientSession, prompt: str) -> None:
        results.append(await run_one(session, target, prompt))

    duration = await run_pool(prompts, concurrency, ask)
    return summarize(results, concurrency, duration)


async def run_chat(target: Target, conversations: list[list[str]], concurrency: int) -> LevelResult:
    """Replays `conversations` (each a list of user messages), `concurrency` at a time. Each turn
    sends the conversation so far (earlier messages and answers) plus its new message; a
    conversation whose request fails stops there."""
    by_turn: list[list[RequestResult]] = [[] for _ in range(max(map(len, conversations)))]

    async def converse(session: aiohttp.ClientSession, user_messages: list[str]) -> None:
        messages: Messages = []
        for turn, content in enumerate(user_messages):
            messages.append({"role": "user", "content": content})
            result = await run_one(session, target, messages)
            by_turn[turn].append(result)
            if not result.ok:
                return
            messages.append({"role": "assistant", "content": result.text})

    duration = await run_pool(conversations, concurrency, converse)
    level = summarize([r for results in by_turn for r in results], concurrency, duration)
    level.ttft_p50_s_by_turn = [
        percentile([r.ttft_s for r in results if r.ok], 50) for results in by_turn
    ]
    return level


def session_for(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=3600),
        # A connection per request: some servers close a kept-alive connection after a few
        # requests, which a pooled connection would meet as an error.
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=True),
    )


def summarize(results: list[RequestResult], concurrency: int, duration: float) -> LevelResult:
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft_s for r in good]
    itls = [x for r in good for x in r.itl_s]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(good),
        duration_s=duration,
        request_throughput=len(good) / duration,
        output_tokens_per_s=tokens / duration,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        itl_p50_s=percentile(itls, 50),
        itl_p95_s=percentile(itls, 95),
        itl_max_s=max(itls, default=float("nan")),
        mean_output_tokens=statistics.fmean([r.output_tokens for r in good]) if good else 0.0,
        tokens_counted_from="+".join(sorted({r.tokens_counted_from for r in good})),
        first_error=next((r.error for r in results if not r.ok), ""),
        ttfts_s=ttfts,
    )


async def benchmark(args: argparse.Namespace) -> list[LevelResult]:
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer).expanduser() / "tokenizer.json"))
    target = Target(
        args.url,
        args.route,
        args.model,
        args.output_tokens,
        args.ignore_eos,
        args.temperature,
        args.top_p,
    )
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
    parser.add_argument(
        "--route", choices=ROUTES, default="completions", help="the route every request takes"
    )
    parser.add_argument("--model", default="", help="`model` on the OpenAI routes")
    parser.add_argument("--tokenizer", required=True, help="model directory with tokenizer.json")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=0, help="per level; 0 = 2x concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="with a temperature; 1: off")
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
