"""Batched logits processing and token selection.

Every row of a batch has its own parameters. The processing order follows Hugging Face's:
repetition penalty, then (for sampled rows) temperature, top-k, top-p, then a draw.

Draws are reproducible: the random generator is seeded from the request's seed and the position
of the token being drawn, so a seeded request gives the same tokens whatever else is in the batch,
and also after a preemption replays it from the start.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_UINT64_MASK = (1 << 64) - 1
# An odd 64-bit constant (the golden ratio's fraction) spreads consecutive positions far apart.
_POSITION_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0  # 1: off

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about the request behind one row of logits."""

    params: SamplingParams
    # Every token of the request so far: penalised by repetition_penalty, and its length is the
    # position of the token being drawn.
    token_ids: Sequence[int]


ArgmaxLogprob = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], argmax_logprob: ArgmaxLogprob
) -> tuple[list[int], list[float]]:
    """One token per row of logits [S, vocab] (any float dtype), with its log-probability.

    The log-probability is taken from the distribution the token was chosen from: for greedy rows
    the model's (after any repetition penalty), for sampled rows the processed one.
    `argmax_logprob` is the greedy pick (see Ops.argmax_logprob); it reads the model's dtype
    directly, so an all-greedy batch never widens its logits to float32.
    """
    penalties = [row.params.repetition_penalty for row in rows]
    if any(penalty != 1.0 for penalty in penalties):
        # Penalised in place, in float32; the model's output stays as it was.
        logits = logits.to(torch.float32, copy=True)
        _apply_repetition_penalty(logits, [row.token_ids for row in rows], penalties)

    token_ids, logprobs = argmax_logprob(logits)

    sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
    if sampled:
        sampled_rows = [rows[index] for index in sampled]
        row_index = torch.tensor(sampled, device=logits.device)
        processed = _process_for_sampling(
            logits[row_index].float(), [row.params for row in sampled_rows]
        )
        drawn = _draw(processed.softmax(dim=-1), sampled_rows)
        token_ids[row_index] = drawn
        logprobs[row_index] = torch.log_softmax(processed, dim=-1).gather(1, drawn[:, None])[:, 0]
    return token_ids.tolist(), logprobs.tolist()


def _apply_repetition_penalty(
    logits: torch.Tensor, histories: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    # A seen token's logit is divided by the penalty when positive and multiplied when negative,
    # so a penalty > 1 always makes it less likely (the CTRL paper's rule, as in transformers).
    width = max(len(history) for history in histories)
    # Padding repeats a token the row has already seen, so it rewrites the same value.
    padded = [list(history) + [history[0]] * (width - len(history)) for history in histories]
    token_ids = torch.tensor(padded, dtype=torch.long, device=logits.device)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    seen = logits.gather(1, token_ids)
    logits.scatter_(1, token_ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def _process_for_sampling(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p; filtered-out tokens get -inf."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        return logits

    vocab_size = logits.shape[-1]
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device)
    removed = ranks[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a token goes when the
    # tokens before it already reach it. The most likely token always stays.
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _draw(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    generator = torch.Generator(device=probs.device)
    drawn = []
    for row_probs, row in zip(probs, rows, strict=True):
        generator.manual_seed(_position_seed(row.params.seed, len(row.token_ids)))
        drawn.append(torch.multinomial(row_probs, 1, generator=generator))
    return torch.cat(drawn)


def _position_seed(seed: int, position: int) -> int:
    return (seed ^ (position * _POSITION_MIX)) & _UINT64_MASK
