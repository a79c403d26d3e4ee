"""What a shard remembers about one request between steps."""

from dataclasses import dataclass, field

from ..pb import generate_pb2 as pb
from ..sampling import SamplingParams


@dataclass
class Request:
    id: int
    # Every token so far: the prompt, then each generated token as soon as it is sampled.
    token_ids: list[int]
    # The prompt's share of token_ids (after a preemption, the router resends the generated
    # tokens with the prompt).
    prompt_len: int
    # Leading tokens whose K/V are in the cache; the next step processes the ones after them.
    num_computed: int
    sampling: SamplingParams
    # Alternatives to report with each sampled token.
    top_n_tokens: int = 0
    # Whether to score the prompt's tokens as they are computed.
    prompt_logprobs: bool = False
    # Block ids in sequence order; grows by the new_blocks of each ScheduledRequest.
    block_table: list[int] = field(default_factory=list)

    @classmethod
    def from_proto(cls, new: pb.NewRequest) -> "Request":
        sampling = SamplingParams(
            temperature=new.sampling.temperature,
            top_k=new.sampling.top_k,
            # Proto3 zero means "not set" for these three.
            top_p=new.sampling.top_p or 1.0,
            do_sample=new.sampling.do_sample,
            seed=new.sampling.seed,
            repetition_penalty=new.sampling.repetition_penalty or 1.0,
            typical_p=new.sampling.typical_p or 1.0,
            min_p=new.sampling.min_p,
            frequency_penalty=new.sampling.frequency_penalty,
            presence_penalty=new.sampling.presence_penalty,
        )
        return cls(
            id=new.id,
            token_ids=list(new.token_ids),
            # Zero (unset): all of token_ids is the prompt.
            prompt_len=new.prompt_len or len(new.token_ids),
            num_computed=new.cached_tokens,
            sampling=sampling,
            top_n_tokens=new.top_n_tokens,
            prompt_logprobs=new.prompt_logprobs,
        )

    def prompt_tokens_in(self, num_tokens: int) -> int:
        """How many of the next `num_tokens` positions hold prompt tokens (the rest hold
        generated ones: decoding, or recomputing them after a preemption)."""
        return max(0, min(num_tokens, self.prompt_len - self.num_computed))

    def prompt_tokens_scored_by(self, num_tokens: int) -> int:
        """How many prompt tokens the next `num_tokens` computed positions score: position p
        predicts token p + 1, and only tokens inside the prompt are scored."""
        if not self.prompt_logprobs:
            return 0
        return max(0, min(self.num_computed + num_tokens, self.prompt_len - 1) - self.num_computed)
