"""The sampler against transformers' logits processors: each filter and penalty on batched rows
with different parameters, and the distribution of drawn tokens against the processed softmax;
also on vocabularies larger than the sampler's sorted head and draw chunks."""

import math

import pytest
import torch
from sluice_server.kernels.cpu_features import CpuFeatures
from sluice_server.layers.ops import Ops
from sluice_server.sampling import SamplingParams, SamplingRow, sample, token_logprobs
from sluice_server.sampling.sampler import process_for_sampling
from sluice_server.sampling.vocabulary import DRAW_CHUNK, HEAD_TOKENS
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


class _ReferenceOps(Ops):
    """The PyTorch sampler ops (tests/test_cpu_kernels.py holds the compiled ones to them),
    recording the logits each greedy pick is given."""

    def __init__(self) -> None:
        super().__init__(CpuFeatures.detect())
        self.greedy_inputs: list[torch.Tensor] = []

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.greedy_inputs.append(logits)
        return super().argmax_logprob(logits)


def _transformers_warpers(params: SamplingParams) -> LogitsProcessorList:
    """transformers' warpers for `params`, in the order `generate` applies them."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    if params.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(params.typical_p))
    return warpers


ROW_PARAMS = [
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=5),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, min_p=0.1),
    SamplingParams(do_sample=True, typical_p=0.7),
    SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.8),
]


def test_filters_match_transformers_row_by_row_in_one_batch() -> None:
    logits = _logits(len(ROW_PARAMS))
    processed = process_for_sampling(logits.clone(), ROW_PARAMS, _ReferenceOps())
    for index, params in enumerate(ROW_PARAMS):
        expected = _transformers_warpers(params)(None, logits[index : index + 1].clone())[0]
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(processed[index]), kept), params
        assert torch.allclose(processed[index][kept], expected[kept], atol=1e-6), params
        # Each filter removed something, so the comparison is not vacuous.
        if params.filters:
            assert 0 < kept.sum() < VOCAB, params


def test_top_k_and_top_p_match_transformers_beyond_the_sorted_head() -> None:
    """A vocabulary 16 times the head: a peaked row's top-p cut lies in the head, a flat row's
    only in the whole sorted row (the head widens twice); rows without either filter, in the same
    batch, keep every token."""
    vocab = 16 * HEAD_TOKENS
    generator = torch.Generator().manual_seed(9)
    peaked = torch.randn(vocab, generator=generator) * 4
    flat = torch.randn(vocab, generator=generator) * 0.1
    cases = [
        (peaked, SamplingParams(do_sample=True, top_p=0.9)),
        (flat, SamplingParams(do_sample=True, top_p=0.9)),
        (flat, SamplingParams(do_sample=True)),
        (flat, SamplingParams(do_sample=True, top_k=HEAD_TOKENS + 3, top_p=0.5)),
        (peaked, SamplingParams(do_sample=True, min_p=0.2)),
    ]
    logits = torch.stack([row for row, _ in cases])
    processed = process_for_sampling(
        logits.clone(), [params for _, params in cases], _ReferenceOps()
    )
    for index, (row, params) in enumerate(cases):
        expected = _transformers_warpers(params)(None, row[None].clone())[0]
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(processed[index]), kept), params
        assert torch.allclose(processed[index][kept], expected[kept], atol=1e-6), params
    # The flat row's cut is past the first widened head: the case exercises the whole row.
    assert int(torch.isfinite(processed[1]).sum()) > 8 * HEAD_TOKENS
    assert int(torch.isfinite(processed[0]).sum()) < HEAD_TOKENS
    assert bool(torch.isfinite(processed[2]).all())


def test_repetition_penalty_matches_transformers_over_prompt_and_output() -> None:
    logits = _logits(2, seed=1)
    history = [[3, 9, 9, 40], [0, 63]]
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=1.3), history[0], prompt_len=2),
        SamplingRow(SamplingParams(repetition_penalty=0.8), history[1], prompt_len=1),
    ]
    ops = _ReferenceOps()
    sample(logits.clone(), rows, ops)
    seen = ops.greedy_inputs
    for index, (row, tokens) in enumerate(zip(rows, history, strict=True)):
        processor = RepetitionPenaltyLogitsProcessor(row.params.repetition_penalty)
        expected = processor(torch.tensor([tokens]), logits[index : index + 1].clone())[0]
        assert torch.allclose(seen[0][index], expected, atol=1e-6)


def test_frequency_and_presence_penalties_count_the_output_only() -> None:
    logits = _logits(2, seed=2)
    # Token 7 is in both prompts; row 0 generated 7, 7 and 12.
    rows = [
        SamplingRow(
            SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [7, 1, 7, 7, 12], 2
        ),
        SamplingRow(SamplingParams(presence_penalty=-1.0), [7, 5], 2),
    ]
    ops = _ReferenceOps()
    sample(logits.clone(), rows, ops)
    seen = ops.greedy_inputs
    expected = logits.clone()
    expected[0, 7] -= 0.5 * 2 + 0.25
    expected[0, 12] -= 0.5 * 1 + 0.25
    # Row 1 generated nothing yet: its prompt's 7 is not penalised.
    assert torch.allclose(seen[0], expected, atol=1e-6)


def _chi_square_critical(degrees: int) -> float:
    """The 0.1 % upper quantile of chi-square with `degrees` degrees of freedom
    (Wilson-Hilferty), high enough that a correct sampler fails once in a thousand seeds."""
    z = 3.09
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


@pytest.mark.parametrize(
    "params", ROW_PARAMS[1:], ids=["top_k", "top_p", "min_p", "typical_p", "all"]
)
def test_drawn_tokens_follow_the_processed_distribution(params: SamplingParams) -> None:
    """4,000 rows with the same logits and parameters and seeds 0..3999, drawn in one batch: the
    counts of each token match the softmax of transformers' processed logits (chi-square), and
    no filtered-out token is ever drawn. Fixed seeds make the test deterministic."""
    draws = 4000
    logits = _logits(1, seed=3).expand(draws, VOCAB).contiguous()
    rows = [
        SamplingRow(
            SamplingParams(**{**params.__dict__, "seed": seed}), token_ids=[1, 2], prompt_len=2
        )
        for seed in range(draws)
    ]
    token_ids = sample(logits, rows, _ReferenceOps()).token_ids
    expected_probs = _transformers_warpers(params)(None, logits[:1].clone())[0].softmax(dim=-1)
    counts = torch.bincount(torch.tensor(token_ids), minlength=VOCAB).double()
    assert counts[expected_probs == 0].sum() == 0
    support = expected_probs > 0
    expected_counts = expected_probs[support].double() * draws
    statistic = ((counts[support] - expected_counts) ** 2 / expected_counts).sum().item()
    degrees = max(1, int(support.sum()) - 1)
    assert statistic < _chi_square_critical(degrees), (statistic, degrees)


def test_draws_across_chunks_follow_the_distribution_and_skip_negligible_tokens() -> None:
    """A vocabulary of several draw chunks, whose 24 likely tokens lie in different chunks and
    whose other tokens sit 100 below the most likely (probabilities under 1e-43, which the
    sampler weighs 0): the draws follow the softmax of the likely ones (chi-square) and never
    pick another token."""
    draws = 4000
    vocab = 5 * DRAW_CHUNK + 17
    generator = torch.Generator().manual_seed(11)
    likely = torch.randperm(vocab, generator=generator)[:24]
    row = torch.full((vocab,), -100.0)
    row[likely] = torch.randn(24, generator=generator)
    rows = [
        SamplingRow(SamplingParams(do_sample=True, seed=seed), token_ids=[1], prompt_len=1)
        for seed in range(draws)
    ]
    sampled = sample(row.expand(draws, vocab).contiguous(), rows, _ReferenceOps())
    counts = torch.bincount(torch.tensor(sampled.token_ids), minlength=vocab).double()
    assert counts.sum() == counts[likely].sum()
    expected_counts = row[likely].softmax(dim=-1).double() * draws
    statistic = ((counts[likely] - expected_counts) ** 2 / expected_counts).sum().item()
    assert statistic < _chi_square_critical(23), statistic
    drawn = torch.tensor(sampled.token_ids)
    expected_logprobs = row.log_softmax(dim=-1)[drawn]
    assert torch.allclose(torch.tensor(sampled.logprobs), expected_logprobs, atol=1e-5)


def test_a_seeded_row_draws_the_same_token_alone_and_in_a_batch() -> None:
    vocab = 3 * DRAW_CHUNK
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(12)) * 2
    params = [
        SamplingParams(do_sample=True, seed=7, top_p=0.8),
        SamplingParams(),
        SamplingParams(do_sample=True, seed=3, temperature=0.5),
        SamplingParams(do_sample=True, seed=1, top_k=10),
        SamplingParams(do_sample=True, seed=9, min_p=0.1),
        SamplingParams(do_sample=True, seed=5),
    ]
    rows = [SamplingRow(p, token_ids=[1, 2, 3], prompt_len=2) for p in params]
    together = sample(logits.clone(), rows, _ReferenceOps())
    for index, row in enumerate(rows):
        alone = sample(logits[index : index + 1].clone(), [row], _ReferenceOps())
        assert alone.token_ids[0] == together.token_ids[index]
        assert alone.logprobs[0] == together.logprobs[index]


def test_logprobs_of_sampled_tokens_come_from_the_processed_distribution() -> None:
    params = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=5)
    logits = _logits(1, seed=4)
    sampled = sample(logits.clone(), [SamplingRow(params, [1], 1, top_n=3)], _ReferenceOps())
    reference = _transformers_warpers(params)(None, logits.clone())[0].log_softmax(dim=-1)
    assert math.isclose(sampled.logprobs[0], reference[sampled.token_ids[0]].item(), abs_tol=1e-5)
    # The alternatives come from the same distribution; top-p's cut leaves out the rest.
    kept = int(torch.isfinite(reference).sum())
    expected = reference.topk(min(3, kept))
    assert [token for token, _ in sampled.top_tokens[0]] == expected.indices.tolist()
    assert torch.allclose(
        torch.tensor([value for _, value in sampled.top_tokens[0]]), expected.values, atol=1e-5
    )


def test_greedy_top_tokens_are_the_models_log_softmax_and_other_rows_get_none() -> None:
    logits = _logits(3, seed=6)
    rows = [
        SamplingRow(SamplingParams(), [1], 1, top_n=4),
        SamplingRow(SamplingParams(), [1], 1),
        SamplingRow(SamplingParams(repetition_penalty=1.5), [2, 7], 2, top_n=2),
    ]
    sampled = sample(logits.clone(), rows, _ReferenceOps())
    assert sampled.top_tokens[1] == []
    model = logits[0].log_softmax(dim=-1)
    assert [token for token, _ in sampled.top_tokens[0]] == model.topk(4).indices.tolist()
    assert sampled.top_tokens[0][0][0] == sampled.token_ids[0]
    assert math.isclose(sampled.top_tokens[0][0][1], sampled.logprobs[0], abs_tol=1e-5)
    assert torch.allclose(
        torch.tensor([value for _, value in sampled.top_tokens[0]]), model.topk(4).values
    )
    # With a penalty, the distribution the token was chosen from is the penalised one.
    penalised = logits[2].clone()
    seen = penalised[[2, 7]]
    penalised[[2, 7]] = torch.where(seen > 0, seen / 1.5, seen * 1.5)
    assert [token for token, _ in sampled.top_tokens[2]] == (
        penalised.log_softmax(dim=-1).topk(2).indices.tolist()
    )


def test_token_logprobs_score_each_row_against_its_token() -> None:
    logits = _logits(3, seed=8).to(torch.bfloat16)
    targets = [4, 0, 9]
    expected = logits.float().log_softmax(dim=-1)[torch.arange(3), torch.tensor(targets)]
    assert torch.allclose(torch.tensor(token_logprobs(logits, targets)), expected, atol=1e-6)
