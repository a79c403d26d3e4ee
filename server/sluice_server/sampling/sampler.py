"""Batched logits processing and token selection.

Every row of a batch has its own parameters. The processing order follows Hugging Face's, with
OpenAI's penalties next to the repetition penalty (as vLLM places them): repetition penalty
(over prompt and output, transformers' rule), frequency and presence penalties (over the output
only, OpenAI's rule); then, for sampled rows, temperature, top-k, top-p, min-p, typical-p, and a
draw. Each filter keeps at least the most likely token.

With each token comes its log-probability and, when the request asks for them, the most likely
alternatives (`top_n`), both read off the distribution the token was chosen from.

Draws are reproducible: the random generator is seeded from the request's seed and the position
of the token being drawn, so a seeded request gives the same tokens whatever else is in the batch,
and also after a preemption replays it from the start.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    typical_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    frequency_penalty: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # 0: off

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def filters(self) -> bool:
        """Whether any filter after the temperature applies."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.typical_p < 1.0

    @property
    def penalises_output(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self) -> None:
        """Raises ValueError for a value no filter can apply (the router's validation keeps
        users' values within narrower, documented ranges)."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about the request behind one row of logits."""

    params: SamplingParams
    # Every token of the request so far: penalised by repetition_penalty, and its length is the
    # position of the token being drawn.
    token_ids: Sequence[int]
    # How many of token_ids are the prompt; the rest is the output the frequency and presence
    # penalties count.
    prompt_len: int
    # How many of the most likely tokens to report with the chosen one.
    top_n: int = 0


@dataclass(frozen=True)
class Sampled:
    """One token per row, its log-probability, and the row's top_n alternatives as
    (token id, log-probability), most likely first."""

    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]


class SamplerOps(Protocol):
    """The sampler's passes over every token of a row: Ops (layers/ops.py) runs them in PyTorch,
    CompiledCpuOps as the compiled CPU kernels."""

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy pick; reads the model's dtype directly, so an all-greedy batch never
        widens its logits to float32."""
        ...

    def top_k_top_p_(self, logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
        """See vocabulary.top_k_top_p_."""
        ...

    def min_p_(self, logits: torch.Tensor, min_p: torch.Tensor) -> None:
        """See vocabulary.min_p_."""
        ...

    def typical_p_(self, logits: torch.Tensor, typical_p: torch.Tensor) -> None:
        """See vocabulary.typical_p_."""
        ...

    def draw(
        self, logits: torch.Tensor, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See vocabulary.draw."""
        ...


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], ops: SamplerOps) -> Sampled:
    """One token per row of logits [S, vocab] (any float dtype), with its log-probability.

    The log-probabilities are taken from the distribution the token was chosen from: for greedy
    rows the model's (after any penalty), for sampled rows the processed one.
    """
    penalties = [row.params.repetition_penalty for row in rows]
    penalise_output = any(row.params.penalises_output for row in rows)
    if penalise_output or any(penalty != 1.0 for penalty in penalties):
        # Penalised in place, in float32; the model's output stays as it was.
        logits = logits.to(torch.float32, copy=True)
        if any(penalty != 1.0 for penalty in penalties):
            _apply_repetition_penalty(logits, [row.token_ids for row in rows], penalties)
        if penalise_output:
            _apply_output_penalties(logits, rows)

    top_tokens: list[list[tuple[int, float]]] = [[] for _ in rows]
    sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
    if len(sampled) < len(rows):
        token_ids, logprobs = ops.argmax_logprob(logits)
    else:
        # Every row is drawn: the greedy pick's pass over the vocabulary would be thrown away.
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    if sampled:
        sampled_rows = [rows[index] for index in sampled]
        row_index = torch.tensor(sampled, device=logits.device)
        chosen_rows = logits if len(sampled) == len(rows) else logits[row_index]
        processed = process_for_sampling(chosen_rows, [row.params for row in sampled_rows], ops)
        drawn, log_total = ops.draw(processed, _uniforms(sampled_rows))
        token_ids[row_index] = drawn
        logprobs[row_index] = processed.gather(1, drawn[:, None])[:, 0] - log_total
        if any(row.top_n > 0 for row in sampled_rows):
            processed_logprobs = processed - log_total[:, None]
            _fill_top_tokens(top_tokens, sampled, sampled_rows, processed_logprobs)

    greedy = [i for i, row in enumerate(rows) if row.params.is_greedy and row.top_n > 0]
    if greedy:
        row_index = torch.tensor(greedy, device=logits.device)
        greedy_logprobs = torch.log_softmax(logits[row_index].float(), dim=-1)
        _fill_top_tokens(top_tokens, greedy, [rows[i] for i in greedy], greedy_logprobs)
    return Sampled(token_ids.tolist(), logprobs.tolist(), top_tokens)


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int]) -> list[float]:
    """The model's log-probability of each given token, one per row of logits (the prompt's
    tokens, scored by the positions before them)."""
    targets = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0].tolist()


def _fill_top_tokens(
    top_tokens: list[list[tuple[int, float]]],
    indices: Sequence[int],
    rows: Sequence[SamplingRow],
    logprobs: torch.Tensor,
) -> None:
    """The top_n most likely tokens of each row; a token a filter removed (-inf) is left out."""
    most = max(row.top_n for row in rows)
    if most == 0:
        return
    values, ids = logprobs.topk(min(most, logprobs.shape[-1]), dim=-1)
    for index, row, row_values, row_ids in zip(
        indices, rows, values.tolist(), ids.tolist(), strict=True
    ):
        top_tokens[index] = [
            (token_id, value)
            for token_id, value in zip(row_ids[: row.top_n], row_values[: row.top_n], strict=True)
            if value != float("-inf")
        ]


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


def _apply_output_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    # OpenAI's rule: logit -= frequency_penalty * count + presence_penalty * (count > 0), with
    # each token's count in the output so far.
    vocab_size = logits.shape[-1]
    outputs = [list(row.token_ids[row.prompt_len :]) for row in rows]
    width = max(1, max(len(output) for output in outputs))
    # Padding counts into an extra column, dropped after.
    padded = [output + [vocab_size] * (width - len(output)) for output in outputs]
    token_ids = torch.tensor(padded, dtype=torch.long, device=logits.device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=logits.dtype))
    counts = counts[:, :vocab_size]
    frequency = torch.tensor(
        [row.params.frequency_penalty for row in rows], dtype=logits.dtype, device=logits.device
    )
    presence = torch.tensor(
        [row.params.presence_penalty for row in rows], dtype=logits.dtype, device=logits.device
    )
    logits -= frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)


def process_for_sampling(
    logits: torch.Tensor, params: Sequence[SamplingParams], ops: SamplerOps
) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p (transformers' order), on new float32
    logits made from `logits` (any float dtype, left as they are); filtered-out tokens get -inf.
    Rows whose parameter is off pass through each filter unchanged."""
    # The division widens the model's logits to float32 as it goes (type promotion), so that a
    # step's [rows, vocab] float32 block is allocated once: each new one costs a page fault per
    # 4 KiB, more time than the arithmetic.
    if all(p.temperature == 1.0 for p in params):
        logits = logits.to(torch.float32, copy=True)
    else:
        temperature = torch.tensor(
            [p.temperature for p in params], dtype=torch.float32, device=logits.device
        )
        logits = logits / temperature[:, None]
    if not any(p.filters for p in params):
        return logits
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        ops.top_k_top_p_(logits, top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        ops.min_p_(logits, torch.tensor([p.min_p for p in params], dtype=torch.float32))
    if any(p.typical_p < 1.0 for p in params):
        ops.typical_p_(logits, torch.tensor([p.typical_p for p in params], dtype=torch.float32))
    return logits


def _uniforms(rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Each row's uniform number in [0, 1) for its draw, float64 [S], from a generator seeded by
    the request's seed and the position of the token being drawn."""
    generator = torch.Generator(device="cpu")
    uniforms = torch.empty(len(rows), dtype=torch.float64)
    for index, row in enumerate(rows):
        generator.manual_seed(_position_seed(row.params.seed, len(row.token_ids)))
        uniforms[index] = torch.rand(1, generator=generator, dtype=torch.float64)
    return uniforms


def _position_seed(seed: int, position: int) -> int:
    return (seed ^ (position * _POSITION_MIX)) & _UINT64_MASK
