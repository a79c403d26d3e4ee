"""The shard's side of the contract: checks a whole StepRequest against the state it will meet.

Every check runs before anything changes, so a rejected step leaves the shard as it was.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from ..pb import generate_pb2 as pb
from .request import Request


class InvalidRequestError(ValueError):
    """The router asked for something the contract does not allow; the shard's state is unchanged.

    Maps to INVALID_ARGUMENT.
    """


@dataclass(frozen=True)
class StepLimits:
    """What the model and the KV cache allow."""

    vocab_size: int
    max_position_embeddings: int
    num_blocks: int
    block_size: int


def validate_step(
    step_request: pb.StepRequest, requests: Mapping[int, Request], limits: StepLimits
) -> list[Request]:
    """Checks the step against the shard's `requests`; returns the parsed new requests."""
    known = set(requests)
    for request_id in step_request.free_ids:
        if request_id not in known:
            raise InvalidRequestError(f"free_ids: unknown request {request_id}")
        known.remove(request_id)

    new_requests: dict[int, Request] = {}
    for new in step_request.new_requests:
        if new.id in known or new.id in new_requests:
            raise InvalidRequestError(f"new request {new.id}: the id is already in use")
        new_requests[new.id] = parse_new_request(new, limits)

    scheduled_ids: set[int] = set()
    for entry in step_request.scheduled:
        if entry.id in scheduled_ids:
            raise InvalidRequestError(f"scheduled request {entry.id}: scheduled twice in one step")
        scheduled_ids.add(entry.id)
        if entry.id in new_requests:
            request = new_requests[entry.id]
        elif entry.id in known:
            request = requests[entry.id]
        else:
            raise InvalidRequestError(f"scheduled request {entry.id}: unknown id")
        validate_scheduled(entry, request, limits)
    return list(new_requests.values())


def parse_new_request(new: pb.NewRequest, limits: StepLimits) -> Request:
    num_tokens = len(new.token_ids)
    if num_tokens == 0:
        raise InvalidRequestError(f"new request {new.id}: no token ids")
    if num_tokens > limits.max_position_embeddings:
        raise InvalidRequestError(
            f"new request {new.id}: {num_tokens} tokens, more than the model's "
            f"{limits.max_position_embeddings} positions"
        )
    out_of_vocab = [token for token in new.token_ids if token >= limits.vocab_size]
    if out_of_vocab:
        raise InvalidRequestError(
            f"new request {new.id}: token id {out_of_vocab[0]} is outside the vocabulary "
            f"of {limits.vocab_size}"
        )
    if new.cached_tokens >= num_tokens:
        raise InvalidRequestError(
            f"new request {new.id}: cached_tokens={new.cached_tokens} must be below the "
            f"{num_tokens} tokens, since the last token must run to sample the next"
        )
    if new.top_n_tokens > limits.vocab_size:
        raise InvalidRequestError(
            f"new request {new.id}: top_n_tokens={new.top_n_tokens} exceeds the vocabulary "
            f"of {limits.vocab_size}"
        )
    if new.prompt_logprobs and new.cached_tokens > 0:
        raise InvalidRequestError(
            f"new request {new.id}: prompt_logprobs needs the whole prompt computed, but "
            f"cached_tokens={new.cached_tokens}"
        )
    request = Request.from_proto(new)
    try:
        request.sampling.validate()
    except ValueError as error:
        raise InvalidRequestError(f"new request {new.id}: {error}") from None
    return request


def validate_scheduled(entry: pb.ScheduledRequest, request: Request, limits: StepLimits) -> None:
    if entry.num_tokens == 0:
        raise InvalidRequestError(f"scheduled request {entry.id}: num_tokens must be > 0")
    end = request.num_computed + entry.num_tokens
    if end > len(request.token_ids):
        raise InvalidRequestError(
            f"scheduled request {entry.id}: {entry.num_tokens} tokens after the "
            f"{request.num_computed} computed would run past its "
            f"{len(request.token_ids)} known tokens"
        )
    if end > limits.max_position_embeddings:
        raise InvalidRequestError(
            f"scheduled request {entry.id}: position {end - 1} is beyond the model's "
            f"{limits.max_position_embeddings} positions"
        )
    bad_blocks = [block for block in entry.new_blocks if block >= limits.num_blocks]
    if bad_blocks:
        raise InvalidRequestError(
            f"scheduled request {entry.id}: block id {bad_blocks[0]} is out of range "
            f"(the cache has {limits.num_blocks} blocks)"
        )
    num_blocks = len(request.block_table) + len(entry.new_blocks)
    if num_blocks * limits.block_size < end:
        raise InvalidRequestError(
            f"scheduled request {entry.id}: {end} tokens need "
            f"{-(-end // limits.block_size)} blocks, its block table has {num_blocks}"
        )
