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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_UINT64_MASK = (1 << 64) - 1
# An odd 64-bit constant (the golden ratio's fraction) spreads consecutive positions far apart.
_POSITION_MIX = 0x9E3779B97F4A7C15
# The head a top-p row's cut is first looked for in (see _top_k_top_p).
HEAD_TOKENS = 512
# Where exp() stops being worth taking (see _relative_weights): e^-80 is about 2e-35.
EXP_FLOOR = -80.0
# Tokens per partial sum of the draw's search (see _draw).
DRAW_CHUNK = 256


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


ArgmaxLogprob = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingRow], argmax_logprob: ArgmaxLogprob
) -> Sampled:
    """One token per row of logits [S, vocab] (any float dtype), with its log-probability.

    The log-probabilities are taken from the distribution the token was chosen from: for greedy
    rows the model's (after any penalty), for sampled rows the processed one.
    `argmax_logprob` is the greedy pick (see Ops.argmax_logprob); it reads the model's dtype
    directly, so an all-greedy batch never widens its logits to float32.
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

    token_ids, logprobs = argmax_logprob(logits)
    top_tokens: list[list[tuple[int, float]]] = [[] for _ in rows]

    sampled = [index for index, row in enumerate(rows) if not row.params.is_greedy]
    if sampled:
        sampled_rows = [rows[index] for index in sampled]
        row_index = torch.tensor(sampled, device=logits.device)
        chosen_rows = logits if len(sampled) == len(rows) else logits[row_index]
        processed = process_for_sampling(chosen_rows.float(), [row.params for row in sampled_rows])
        drawn, log_total = _draw(processed, sampled_rows)
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


def process_for_sampling(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p (transformers' order); filtered-out
    tokens get -inf. Rows whose parameter is off pass through each filter unchanged."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    if not any(p.filters for p in params):
        return logits
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    if any(p.min_p > 0.0 for p in params):
        logits = _min_p(logits, params)
    if any(p.typical_p < 1.0 for p in params):
        logits = _typical_p(logits, params)
    return logits


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p over the renormalised top k, in place on the rows that have either.

    Only each row's head is sorted: its top_k tokens, or, for top-p alone, its HEAD_TOKENS most
    likely, widened eightfold until they hold top_p of the mass (every token after them is cut).
    Sorting a whole 50,000-token vocabulary takes milliseconds a row on a CPU. On the default
    model over benchmark/data/perplexity.txt at temperature 1, top_p 0.9 keeps a median of 5
    tokens and at most 512 at 98 % of positions.
    """
    device = logits.device
    vocab_size = logits.shape[-1]
    pending = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    width = max([HEAD_TOKENS] + [params[i].top_k for i in pending])
    while pending:
        width = min(width, vocab_size)
        rows = logits[pending]
        values, order = rows.topk(width, dim=-1)
        top_k = torch.tensor([params[i].top_k for i in pending], device=device)
        top_p = torch.tensor([params[i].top_p for i in pending], dtype=logits.dtype, device=device)
        has_top_k = top_k > 0
        ranks = torch.arange(width, device=device)
        values.masked_fill_(has_top_k[:, None] & (ranks[None, :] >= top_k[:, None]), float("-inf"))
        # The probabilities top-p sees: within the top k where a row has one, else the row's.
        probs = torch.where(
            has_top_k[:, None],
            values.softmax(dim=-1),
            (values - _log_total(rows)).exp(),
        )
        done = has_top_k | (probs.sum(dim=-1) >= top_p) | (width == vocab_size)
        # A token goes when the tokens before it already reach top_p; the most likely one always
        # stays. Rows without top_p are left out: their float32 mass can round up to 1.
        mass_before = probs.cumsum(dim=-1) - probs
        values.masked_fill_((mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0), float("-inf"))
        finished = done.nonzero()[:, 0]
        heads = torch.full((len(finished), vocab_size), float("-inf"), device=device)
        heads.scatter_(1, order[finished], values[finished])
        logits[[pending[i] for i in finished.tolist()]] = heads
        pending = [
            row for row, row_done in zip(pending, done.tolist(), strict=True) if not row_done
        ]
        width *= 8
    return logits


def _min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    # A token goes when its probability is below min_p times the most likely token's, that is
    # when its logit is below the largest plus log(min_p); the most likely one never does.
    min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=logits.device)
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _typical_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    # Locally typical sampling: keep the tokens whose information (-log p) is closest to the
    # distribution's entropy, in that order, until their mass reaches typical_p.
    mass = torch.tensor([p.typical_p for p in params], dtype=logits.dtype, device=logits.device)
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = distance.sort(dim=-1)
    sorted_probs = probs.gather(1, order)
    # Tokens whose predecessors (closer to the entropy) already reach the mass go; the closest
    # one always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    removed_sorted = (mass_before >= mass[:, None]) & (mass[:, None] < 1.0)
    removed_sorted[:, 0] = False
    removed = torch.empty_like(removed_sorted).scatter_(1, order, removed_sorted)
    # A filtered-out token (-inf, probability 0) is never brought back.
    return logits.masked_fill(removed, float("-inf"))


def _draw(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of processed float32 logits [S, vocab], and each row's logsumexp.

    Each row's cumulative distribution is inverted at one uniform draw from the row's own seeded
    generator (torch.multinomial draws a random number per token of the vocabulary: about 1.5 ms
    a row at 50,000 tokens on a CPU). The search runs over sums of DRAW_CHUNK tokens, then
    within the chunk the draw falls in: a running sum over the whole vocabulary would be one
    long sequential pass.
    """
    num_rows, vocab_size = logits.shape
    chunks = -(-vocab_size // DRAW_CHUNK)
    # Unnormalised probabilities, padded with zeros to whole chunks; filtered tokens weigh 0.
    weights = torch.zeros(num_rows, chunks * DRAW_CHUNK, device=logits.device)
    peak = _relative_weights(logits, weights[:, :vocab_size])
    by_chunk = weights.view(num_rows, chunks, DRAW_CHUNK)
    chunk_ends = by_chunk.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    total = chunk_ends[:, -1]

    generator = torch.Generator(device="cpu")
    uniforms = []
    for row in rows:
        generator.manual_seed(_position_seed(row.params.seed, len(row.token_ids)))
        uniforms.append(torch.rand(1, generator=generator, dtype=torch.float64))
    targets = (torch.cat(uniforms).to(logits.device) * total)[:, None]

    # The chunk the target falls in: the first whose end passes it; it holds some weight.
    chunk = torch.searchsorted(chunk_ends, targets, right=True).clamp_(max=chunks - 1)
    start = torch.where(chunk > 0, chunk_ends.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    within = by_chunk[torch.arange(num_rows, device=logits.device), chunk[:, 0]]
    offset = torch.searchsorted(start + within.double().cumsum(dim=-1), targets, right=True)
    # The token found has weight above zero. Summed in another order, the chunk can end just
    # short of the target: then its last token with weight.
    last_weighted = DRAW_CHUNK - 1 - (within.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)
    offset = torch.where(offset < DRAW_CHUNK, offset, last_weighted)
    drawn = (chunk * DRAW_CHUNK + offset)[:, 0]
    return drawn, peak[:, 0] + total.log().float()


def _relative_weights(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(logits - the row's largest) into `out` [S, vocab]; returns the largest [S, 1].

    Tokens more than -EXP_FLOOR below the largest weigh 0: exp() of such values (and of
    filtered tokens' -inf) takes 5 to 50 times as long on a CPU, and their probabilities are
    below 1e-35.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    torch.sub(logits, peak, out=out)
    negligible = out < EXP_FLOOR
    out.clamp_(min=EXP_FLOOR).exp_().masked_fill_(negligible, 0.0)
    return peak


def _log_total(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row [S, vocab] -> [S, 1], as _relative_weights weighs the tokens."""
    weights = torch.empty_like(logits)
    peak = _relative_weights(logits, weights)
    return peak + weights.sum(dim=-1, keepdim=True).log()


def _position_seed(seed: int, position: int) -> int:
    return (seed ^ (position * _POSITION_MIX)) & _UINT64_MASK
