"""The sampler's passes over every token of a row, in PyTorch: the top-k/top-p, min-p and
typical-p cuts and the draw.

`Ops` (layers/ops.py) runs these on any device; `CompiledCpuOps` runs the compiled kernels of
kernels/csrc/sampling.cpp instead, which do the same in one or two passes per row. Both weigh a
token exp(logit - the row's largest) and give the tokens more than -EXP_FLOOR below the largest
weight 0: their probabilities are below 1e-35, and exp() of such values (or of a filtered
token's -inf) takes 5 to 50 times as long on a CPU.
"""

import torch

# The head a top-p row's cut is first looked for in (see top_k_top_p_).
HEAD_TOKENS = 512
# Where exp() stops being worth taking: e^-80 is about 2e-35.
EXP_FLOOR = -80.0
# Tokens per partial sum of the draw's search (see draw).
DRAW_CHUNK = 256


def top_k_top_p_(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Top-k, then top-p over the renormalised top k, in place on float32 logits [S, vocab];
    top_k [S] (0: off) and top_p [S] (1: off). Rows with neither are left as they are.

    Only each row's head is sorted: its top_k tokens, or, for top-p alone, its HEAD_TOKENS most
    likely, widened eightfold until they hold top_p of the mass (every token after them is cut).
    Sorting a whole 50,000-token vocabulary takes milliseconds a row on a CPU. On the default
    model over benchmark/data/perplexity.txt at temperature 1, top_p 0.9 keeps a median of 5
    tokens and at most 512 at 98 % of positions.
    """
    device = logits.device
    vocab_size = logits.shape[-1]
    ks, ps = top_k.tolist(), top_p.tolist()
    pending = [
        i for i, (k, p) in enumerate(zip(ks, ps, strict=True)) if 0 < k < vocab_size or p < 1
    ]
    # Rows with top-k need their top k; rows with top-p alone start at the head.
    width = (
        max((ks[i] if 0 < ks[i] < vocab_size else HEAD_TOKENS) for i in pending) if pending else 0
    )
    # Each pending row's logsumexp, once (a pass over the vocabulary), for the rows whose top-p
    # sees the whole row's probabilities.
    whole_row_rows = [i for i in pending if not 0 < ks[i] < vocab_size]
    row_log_totals = (
        dict(zip(whole_row_rows, log_total(logits[whole_row_rows]).unbind(0), strict=True))
        if whole_row_rows
        else {}
    )
    while pending:
        width = min(width, vocab_size)
        rows = logits[pending]
        values, order = rows.topk(width, dim=-1)
        row_top_k = top_k[pending].to(device)
        row_top_p = top_p[pending].to(device)
        has_top_k = (row_top_k > 0) & (row_top_k < vocab_size)
        ranks = torch.arange(width, device=device)
        values.masked_fill_(
            has_top_k[:, None] & (ranks[None, :] >= row_top_k[:, None]), float("-inf")
        )
        # The probabilities top-p sees, in float64 as the compiled kernel sums them: within the
        # top k where a row has one, else the row's.
        probs = values.double().softmax(dim=-1)
        if not bool(has_top_k.all()):
            # (Rows with top-k take `probs`; their entry is a placeholder.)
            unused = torch.zeros(1, dtype=torch.float64, device=device)
            totals = torch.stack([row_log_totals.get(i, unused) for i in pending])
            whole_row = (values.double() - totals).exp()
            probs = torch.where(has_top_k[:, None], probs, whole_row)
        done = has_top_k | (probs.sum(dim=-1) >= row_top_p) | (width == vocab_size)
        # A token goes when the tokens before it already reach top_p; the most likely one always
        # stays. Rows without top_p are left out: their float32 mass can round up to 1.
        mass_before = probs.cumsum(dim=-1) - probs
        cut = (mass_before >= row_top_p[:, None]) & (row_top_p[:, None] < 1.0)
        values.masked_fill_(cut, float("-inf"))
        finished = done.nonzero()[:, 0]
        heads = torch.full((len(finished), vocab_size), float("-inf"), device=device)
        heads.scatter_(1, order[finished], values[finished])
        logits[[pending[i] for i in finished.tolist()]] = heads
        pending = [
            row for row, row_done in zip(pending, done.tolist(), strict=True) if not row_done
        ]
        width *= 8


def min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Min-p, in place on float32 logits [S, vocab] with min_p [S] (0: off): a token goes when its
    probability is below min_p times the most likely token's, that is when its logit is below
    the largest plus log(min_p) (no exp); the most likely one never does."""
    log_min_p = min_p.to(device=logits.device, dtype=logits.dtype).log()
    threshold = logits.amax(dim=-1, keepdim=True) + log_min_p[:, None]
    logits.masked_fill_(logits < threshold, float("-inf"))


def typical_p_(logits: torch.Tensor, typical_p: torch.Tensor) -> None:
    """Locally typical sampling, in place on float32 logits [S, vocab] with typical_p [S] (1: off):
    keeps the tokens whose information (-log p) is closest to the row's entropy, in that order,
    until they hold typical_p of the mass. In float64, as the compiled kernel sums."""
    mass = typical_p.to(device=logits.device, dtype=torch.float64)
    log_probs = logits.double().log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    _, order = distance.sort(dim=-1)
    sorted_probs = probs.gather(1, order)
    # Tokens whose predecessors (closer to the entropy) already reach the mass go; the closest
    # one always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    removed_sorted = (mass_before >= mass[:, None]) & (mass[:, None] < 1.0)
    removed_sorted[:, 0] = False
    removed = torch.empty_like(removed_sorted).scatter_(1, order, removed_sorted)
    # A filtered-out token (-inf, probability 0) is never brought back.
    logits.masked_fill_(removed, float("-inf"))


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of float32 logits [S, vocab], the row's cumulative distribution
    inverted at its uniform number in [0, 1) (float64 [S]); and each row's logsumexp.

    The search runs over sums of DRAW_CHUNK tokens, then within the chunk the draw falls in: a
    running sum over the whole vocabulary would be one long sequential pass. (torch.multinomial
    draws a random number per token: about 1.5 ms a row at 50,000 tokens on a CPU.)
    """
    num_rows, vocab_size = logits.shape
    chunks = -(-vocab_size // DRAW_CHUNK)
    # Weights padded with zeros to whole chunks.
    weights = torch.zeros(num_rows, chunks * DRAW_CHUNK, device=logits.device)
    peak = _relative_weights(logits, weights[:, :vocab_size])
    by_chunk = weights.view(num_rows, chunks, DRAW_CHUNK)
    chunk_ends = by_chunk.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    total = chunk_ends[:, -1]
    targets = (uniforms.to(logits.device) * total)[:, None]

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
    # A row without weight (every logit NaN or -inf, or one +inf) gets token 0, as in the
    # compiled kernel, rather than an index past the vocabulary.
    drawn = torch.where(total > 0, drawn, 0)
    return drawn, peak[:, 0] + total.log().float()


def log_total(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row [S, vocab] -> float64 [S, 1], the tokens weighed as the module
    says."""
    weights = torch.empty_like(logits)
    peak = _relative_weights(logits, weights)
    return peak.double() + weights.sum(dim=-1, keepdim=True, dtype=torch.float64).log()


def _relative_weights(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(logits - the row's largest) into `out` [S, vocab], 0 past the floor; returns the
    largest [S, 1]. As in the compiled kernels, a NaN logit weighs 0 and is not the largest
    (a row of NaN has largest -inf)."""
    inf = float("inf")
    peak = logits.nan_to_num(nan=-inf, posinf=inf, neginf=-inf).amax(dim=-1, keepdim=True)
    torch.sub(logits, peak, out=out)
    negligible = (out >= EXP_FLOOR).logical_not_()  # NaN included
    out.clamp_(min=EXP_FLOOR).exp_().masked_fill_(negligible, 0.0)
    return peak
