"""The engine driven through StepRequest messages, the way the router drives it."""

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sluice_server.engine.contract import InvalidRequestError
from sluice_server.engine.kv_cache import KV_CACHE_DTYPES, KVCacheSpec
from sluice_server.engine.request import Request
from sluice_server.engine.step import NotWarmedUpError, StepExecutor
from sluice_server.kernels import Kernels
from sluice_server.models.loader import LoadedModel, ModelLoadError, load_model
from sluice_server.pb import generate_pb2 as pb

BLOCK_SIZE = 4
NUM_BLOCKS = 64
PROMPTS = [[5, 17, 99, 42, 8], [120, 3, 64, 77, 31, 90, 12, 50, 6]]


def make_executor(loaded: LoadedModel, num_blocks: int = NUM_BLOCKS) -> StepExecutor:
    spec = KVCacheSpec.for_model(loaded, BLOCK_SIZE)
    executor = StepExecutor(loaded, BLOCK_SIZE, num_blocks * spec.bytes_per_block)
    assert (
        executor.warmup(max_prefill_tokens=32, max_batch_size=4, max_total_tokens=64) == num_blocks
    )
    return executor


def new_request(
    request_id: int,
    token_ids: Sequence[int],
    sampling: pb.SamplingParameters | None = None,
    cached_tokens: int = 0,
    prompt_len: int = 0,
) -> pb.NewRequest:
    return pb.NewRequest(
        id=request_id,
        token_ids=token_ids,
        cached_tokens=cached_tokens,
        sampling=sampling or pb.SamplingParameters(),
        prompt_len=prompt_len,
    )


@dataclass
class RouterSequence:
    known_tokens: int
    computed: int
    max_new_tokens: int
    stop_at_eos: bool
    blocks: list[int] = field(default_factory=list)
    # Blocks in `blocks` the shard has not been told about yet (a prefix-cache hit's).
    unsent_blocks: list[int] = field(default_factory=list)
    generations: list[pb.Generation] = field(default_factory=list)


class MiniRouter:
    """The router's side of the contract, reduced to what these tests need: blocks on demand,
    prompts in chunks of at most `chunk_size` tokens, one decode per running request per step,
    and the decision when a request stops, freed through the next step's free_ids."""

    def __init__(
        self, executor: StepExecutor, chunk_size: int = 1000, eos_token_ids: Sequence[int] = ()
    ) -> None:
        self.executor = executor
        self.chunk_size = chunk_size
        self.eos_token_ids = set(eos_token_ids)
        self.free_blocks = list(range(executor.num_blocks))[
            ::-1
        ]  # Handed out from the high ids down.
        self.waiting: list[pb.NewRequest] = []
        self.running: dict[int, RouterSequence] = {}
        self.finished: dict[int, RouterSequence] = {}
        self.to_free: list[int] = []

    def add(
        self,
        new: pb.NewRequest,
        blocks: Sequence[int] = (),
        max_new_tokens: int = 8,
        ignore_eos: bool = True,
    ) -> None:
        self.waiting.append(new)
        self.running[new.id] = RouterSequence(
            len(new.token_ids),
            new.cached_tokens,
            max_new_tokens,
            not ignore_eos,
            list(blocks),
            list(blocks),
        )

    def step(self, free_ids: Sequence[int] = ()) -> pb.StepResponse:
        free_ids = [*self.to_free, *free_ids]
        self.to_free = []
        scheduled = []
        for request_id, sequence in self.running.items():
            num_tokens = min(sequence.known_tokens - sequence.computed, self.chunk_size)
            blocks_needed = -(-(sequence.computed + num_tokens) // BLOCK_SIZE)
            allocated = [
                self.free_blocks.pop() for _ in range(blocks_needed - len(sequence.blocks))
            ]
            sequence.blocks.extend(allocated)
            new_blocks = sequence.unsent_blocks + allocated
            sequence.unsent_blocks = []
            sequence.computed += num_tokens
            scheduled.append(
                pb.ScheduledRequest(id=request_id, num_tokens=num_tokens, new_blocks=new_blocks)
            )
        response = self.executor.step(
            pb.StepRequest(free_ids=free_ids, new_requests=self.waiting, scheduled=scheduled)
        )
        self.waiting = []
        for generation in response.generations:
            sequence = self.running[generation.id]
            sequence.generations.append(generation)
            sequence.known_tokens += 1
            eos = sequence.stop_at_eos and generation.token_id in self.eos_token_ids
            if eos or len(sequence.generations) == sequence.max_new_tokens:
                self.finished[generation.id] = self.running.pop(generation.id)
                self.to_free.append(generation.id)
        return response

    def run(self) -> dict[int, list[int]]:
        """Steps until every request finished and the shard forgot it; returns each request's
        generated tokens."""
        while self.running or self.to_free:
            self.step()
        return {
            request_id: [generation.token_id for generation in sequence.generations]
            for request_id, sequence in self.finished.items()
        }


def reference_greedy(
    reference: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int
) -> list[int]:
    with torch.no_grad():
        output = reference.generate(
            torch.tensor([list(prompt)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,  # Like ignore_eos: generate all max_new_tokens.
            pad_token_id=0,
        )
    return output[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_generate(tiny_llama, tiny_loaded) -> None:
    _directory, reference = tiny_llama
    router = MiniRouter(make_executor(tiny_loaded), chunk_size=4)  # Chunked prefill as well.
    for request_id, prompt in enumerate(PROMPTS):
        router.add(new_request(request_id, prompt), max_new_tokens=10)
    generated = router.run()
    for request_id, prompt in enumerate(PROMPTS):
        assert generated[request_id] == reference_greedy(reference, prompt, 10)


def test_only_free_ids_make_the_shard_forget_a_request(tiny_loaded) -> None:
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0]), max_new_tokens=6)
    greedy = router.run()[0]
    assert len(greedy) == 6
    assert router.executor.requests == {}

    # The shard does not stop at the model's end-of-sequence token nor at any length: it keeps
    # the request, ready for the next decode, until the router frees it.
    eos = greedy[2]
    executor = make_executor(dataclasses.replace(tiny_loaded, eos_token_ids=(eos,)))
    router = MiniRouter(executor)
    router.add(new_request(0, PROMPTS[0]), max_new_tokens=6)
    for _ in range(6):
        router.step()
    assert [generation.token_id for generation in router.finished[0].generations] == greedy
    assert list(executor.requests) == [0]
    response = executor.step(pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)]))
    assert [generation.id for generation in response.generations] == [0]
    router.step()  # Sends free_ids=[0].
    assert executor.requests == {}
    with pytest.raises(InvalidRequestError, match="unknown id"):
        executor.step(pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)]))


def test_the_router_stops_at_end_of_sequence_unless_told_to_ignore_it(tiny_loaded) -> None:
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0]), max_new_tokens=6)
    greedy = router.run()[0]

    eos = greedy[2]
    router = MiniRouter(make_executor(tiny_loaded), eos_token_ids=[eos])
    router.add(new_request(0, PROMPTS[0]), max_new_tokens=6, ignore_eos=False)
    router.add(new_request(1, PROMPTS[0]), max_new_tokens=6, ignore_eos=True)
    generated = router.run()
    assert generated[0] == greedy[: greedy.index(eos) + 1]
    assert generated[1] == greedy
    assert router.executor.requests == {}


def test_prompt_chunks_generate_only_at_the_end(tiny_loaded) -> None:
    router = MiniRouter(make_executor(tiny_loaded), chunk_size=4)
    router.add(new_request(0, PROMPTS[1]))  # 9 tokens: chunks of 4, 4, 1.
    assert len(router.step().generations) == 0
    assert len(router.step().generations) == 0
    (generation,) = router.step().generations
    assert generation.id == 0 and generation.logprob <= 0.0


def test_prompt_logprobs_and_top_tokens_equal_the_reference_log_softmax(
    tiny_llama, tiny_loaded
) -> None:
    """Prompt tokens scored chunk by chunk (4, 4, 1) and the first token's alternatives match
    log_softmax of transformers' logits over the whole prompt."""
    _directory, reference = tiny_llama
    prompt = PROMPTS[1]
    router = MiniRouter(make_executor(tiny_loaded), chunk_size=4)
    request = new_request(0, prompt)
    request.prompt_logprobs = True
    request.top_n_tokens = 3
    router.add(request, max_new_tokens=1)
    scored: dict[int, float] = {}
    while router.running or router.to_free:
        for chunk in router.step().prompt_logprobs:
            assert chunk.id == 0
            for offset, logprob in enumerate(chunk.logprobs):
                assert chunk.start + offset not in scored
                scored[chunk.start + offset] = logprob
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
    assert sorted(scored) == list(range(1, len(prompt)))
    for position, logprob in scored.items():
        assert abs(logprob - expected[position - 1, prompt[position]].item()) < 1e-4
    (generation,) = router.finished[0].generations
    top = expected[-1].topk(3)
    assert [t.token_id for t in generation.top_tokens] == top.indices.tolist()
    for alternative, value in zip(generation.top_tokens, top.values.tolist(), strict=True):
        assert abs(alternative.logprob - value) < 1e-4
    assert generation.top_tokens[0].token_id == generation.token_id


def test_free_ids_forget_requests(tiny_loaded) -> None:
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0]))
    router.step()
    router.running.pop(0)
    router.step(free_ids=[0])
    assert router.executor.requests == {}
    with pytest.raises(InvalidRequestError, match="free_ids: unknown request 0"):
        router.executor.step(pb.StepRequest(free_ids=[0]))


def test_prefix_cached_request_matches_full_prefill(tiny_loaded) -> None:
    prompt = PROMPTS[1]
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, prompt), max_new_tokens=5)
    router.step()
    shared_blocks = router.running[0].blocks[:2]  # The first 8 prompt tokens, full blocks.
    router.add(new_request(1, prompt, cached_tokens=8), blocks=shared_blocks, max_new_tokens=5)
    generated = router.run()
    assert generated[1] == generated[0]


@pytest.mark.parametrize(
    "sampling",
    [
        pb.SamplingParameters(do_sample=True, temperature=0.8, seed=7),
        # Greedy, so the penalties decide: the tiny model repeats its third token at the tenth
        # unless that token counts as output, which the resumed request's prompt_len keeps so.
        pb.SamplingParameters(frequency_penalty=2.0, presence_penalty=2.0),
    ],
    ids=["sampled", "output-penalties"],
)
def test_preempted_request_resumes_where_it_stopped(
    tiny_loaded, sampling: pb.SamplingParameters
) -> None:
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0], sampling=sampling), max_new_tokens=12)
    uninterrupted = router.run()[0]

    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0], sampling=sampling), max_new_tokens=12)
    for _ in range(3):
        router.step()
    preempted = router.running.pop(0)
    router.free_blocks.extend(preempted.blocks)
    before = [generation.token_id for generation in preempted.generations]
    # Resumed: the prompt and what it generated run again as one prompt.
    router.step(free_ids=[0])
    router.add(
        new_request(0, PROMPTS[0] + before, sampling=sampling, prompt_len=len(PROMPTS[0])),
        max_new_tokens=12 - len(before),
    )
    assert before + router.run()[0] == uninterrupted


def test_a_chunk_knows_which_of_its_tokens_are_the_prompts() -> None:
    # A resumed request's generated tokens run again as part of a chunk, but not as prompt.
    request = Request.from_proto(new_request(0, PROMPTS[0] + [7, 8], prompt_len=5))
    assert request.prompt_tokens_in(3) == 3
    request.num_computed = 4
    assert request.prompt_tokens_in(3) == 1
    request.num_computed = 5
    assert request.prompt_tokens_in(2) == 0


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_loaded) -> None:
    seeded = pb.SamplingParameters(
        do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=1234, repetition_penalty=1.2
    )
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0], sampling=seeded))
    alone = router.run()[0]

    router = MiniRouter(make_executor(tiny_loaded), chunk_size=3)
    router.add(new_request(5, PROMPTS[1]))
    router.add(
        new_request(
            6, PROMPTS[1], sampling=pb.SamplingParameters(do_sample=True, temperature=1.5, seed=99)
        )
    )
    router.add(new_request(7, PROMPTS[0], sampling=seeded))
    assert router.run()[7] == alone

    other_seed = pb.SamplingParameters(
        do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=4321, repetition_penalty=1.2
    )
    router = MiniRouter(make_executor(tiny_loaded))
    router.add(new_request(0, PROMPTS[0], sampling=other_seed))
    assert router.run()[0] != alone


def valid_request() -> pb.NewRequest:
    return new_request(1, PROMPTS[0])


@pytest.mark.parametrize(
    ("step_request", "message"),
    [
        (pb.StepRequest(scheduled=[pb.ScheduledRequest(id=9, num_tokens=1)]), "unknown id"),
        (pb.StepRequest(new_requests=[valid_request(), valid_request()]), "already in use"),
        (pb.StepRequest(new_requests=[new_request(1, [])]), "no token ids"),
        (pb.StepRequest(new_requests=[new_request(1, [5, 128])]), "outside the vocabulary"),
        (pb.StepRequest(new_requests=[new_request(1, [5, 6], cached_tokens=2)]), "cached_tokens"),
        (
            pb.StepRequest(
                new_requests=[
                    pb.NewRequest(id=1, token_ids=[5, 6], cached_tokens=1, prompt_logprobs=True)
                ]
            ),
            "prompt_logprobs needs the whole prompt",
        ),
        (
            pb.StepRequest(new_requests=[pb.NewRequest(id=1, token_ids=[5], top_n_tokens=129)]),
            "top_n_tokens",
        ),
        (
            pb.StepRequest(
                new_requests=[new_request(1, [5], sampling=pb.SamplingParameters(temperature=-1))]
            ),
            "temperature",
        ),
        (
            pb.StepRequest(
                new_requests=[valid_request()],
                scheduled=[pb.ScheduledRequest(id=1, num_tokens=5, new_blocks=[0])],
            ),
            "need 2 blocks, its block table has 1",
        ),
        (
            pb.StepRequest(
                new_requests=[valid_request()],
                scheduled=[pb.ScheduledRequest(id=1, num_tokens=5, new_blocks=[0, NUM_BLOCKS])],
            ),
            "out of range",
        ),
        (
            pb.StepRequest(
                new_requests=[valid_request()],
                scheduled=[pb.ScheduledRequest(id=1, num_tokens=6, new_blocks=[0, 1])],
            ),
            "run past",
        ),
        (
            pb.StepRequest(
                new_requests=[valid_request()],
                scheduled=[pb.ScheduledRequest(id=1, num_tokens=0, new_blocks=[0, 1])],
            ),
            "num_tokens must be > 0",
        ),
        (
            pb.StepRequest(
                new_requests=[valid_request()],
                scheduled=[pb.ScheduledRequest(id=1, num_tokens=1, new_blocks=[0])] * 2,
            ),
            "scheduled twice",
        ),
    ],
)
def test_invalid_steps_are_rejected_and_change_nothing(tiny_loaded, step_request, message) -> None:
    executor = make_executor(tiny_loaded)
    executor.step(pb.StepRequest(new_requests=[new_request(0, PROMPTS[0])]))
    with pytest.raises(InvalidRequestError, match=message):
        executor.step(step_request)
    assert list(executor.requests) == [0]
    assert executor.requests[0].block_table == []
    response = executor.step(
        pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=5, new_blocks=[3, 4])])
    )
    assert len(response.generations) == 1


def test_step_and_clear_before_warmup_are_refused(tiny_loaded) -> None:
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, kv_cache_bytes=None)
    assert not executor.warmed_up
    with pytest.raises(NotWarmedUpError):
        executor.step(pb.StepRequest())
    # How a router learns that the shard it warmed up has restarted.
    with pytest.raises(NotWarmedUpError):
        executor.clear()


def test_warmup_to_a_given_number_of_blocks(tiny_loaded) -> None:
    # A restarted shard gets the size the router settled its block ids by, whatever the
    # memory available or --kv-cache-memory say.
    spec = KVCacheSpec.for_model(tiny_loaded, BLOCK_SIZE)
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, 3 * spec.bytes_per_block)
    assert executor.warmup(16, 2, 64, num_blocks=7) == 7
    assert executor.num_blocks == 7 and executor.warmed_up


def test_warmup_returns_what_fits_even_below_one_longest_sequence(tiny_loaded) -> None:
    # The router settles its limits from the returned size, so warmup does not refuse here.
    spec = KVCacheSpec.for_model(tiny_loaded, BLOCK_SIZE)
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, 3 * spec.bytes_per_block)
    assert executor.warmup(max_prefill_tokens=16, max_batch_size=2, max_total_tokens=64) == 3


def test_warmup_without_memory_for_one_block_is_a_clear_error(tiny_loaded) -> None:
    spec = KVCacheSpec.for_model(tiny_loaded, BLOCK_SIZE)
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, spec.bytes_per_block - 1)
    with pytest.raises(InvalidRequestError, match="holds no block of 4 tokens"):
        executor.warmup(max_prefill_tokens=16, max_batch_size=2, max_total_tokens=64)
    assert executor.kv_cache is None


def test_default_cpu_cache_is_capped_by_what_the_batch_can_use(tiny_loaded) -> None:
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, kv_cache_bytes=None)
    assert executor.warmup(max_prefill_tokens=16, max_batch_size=3, max_total_tokens=10) == 3 * 3


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_an_8bit_cache_holds_twice_the_blocks_and_generates(tiny_loaded, cache_dtype) -> None:
    """--kv-cache-dtype: the same memory holds twice the blocks of the float32 model's cache
    over four, and greedy decoding runs on it (the backends' tests check its attention)."""
    full = KVCacheSpec.for_model(tiny_loaded, BLOCK_SIZE)
    executor = StepExecutor(tiny_loaded, BLOCK_SIZE, 10 * full.bytes_per_block, None, cache_dtype)
    assert executor.cache_spec.bytes_per_block * 4 == full.bytes_per_block
    assert executor.warmup(max_prefill_tokens=16, max_batch_size=8, max_total_tokens=64) == 40
    assert all(layer.key.dtype == cache_dtype for layer in executor.kv_cache)
    router = MiniRouter(executor, chunk_size=4)
    for request_id, prompt in enumerate(PROMPTS):
        router.add(new_request(request_id, prompt), max_new_tokens=10)
    generated = router.run()
    vocab_size = tiny_loaded.config.vocab_size
    assert all(len(tokens) == 10 and max(tokens) < vocab_size for tokens in generated.values())


def with_attention_tensors(
    model_dir: Path, directory: Path, tensors: dict[str, torch.Tensor]
) -> Path:
    """A copy of the checkpoint in `model_dir` whose layers' self_attn also hold `tensors`."""
    shutil.copytree(model_dir, directory)
    weights = load_file(directory / "model.safetensors")
    for layer in range(2):
        for name, tensor in tensors.items():
            weights[f"model.layers.{layer}.self_attn.{name}"] = tensor.clone()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    ("tensors", "scales"),
    [
        # compressed-tensors' names (llm-compressor).
        ({"k_scale": torch.tensor(0.5), "v_scale": torch.tensor(3.0)}, (0.5, 3.0)),
        # One scale for both; of a scale per head, the largest.
        ({"kv_scale": torch.tensor([2.0, 0.5])}, (2.0, 2.0)),
        (
            {
                "k_proj.output_scale": torch.tensor(0.25, dtype=torch.bfloat16),
                "v_proj.output_scale": torch.tensor(4.0, dtype=torch.bfloat16),
            },
            (0.25, 4.0),
        ),
    ],
)
def test_an_8bit_cache_takes_the_checkpoints_scales(
    tiny_llama,
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    scales: tuple[float, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checkpoints calibrated for an 8-bit KV cache carry a key and a value scale per layer: a
    cache in 8 bits stores keys and values divided by them (the kernels' tests check how), one
    in the model's dtype has no use for them; the shard's log says which."""
    directory = with_attention_tensors(tiny_llama[0], tmp_path / "scaled", tensors)
    loaded = load_model(directory, torch.float32, torch.device("cpu"), Kernels.reference())
    caplog.set_level("INFO")
    full = StepExecutor(loaded, BLOCK_SIZE, None)
    full.warmup(max_prefill_tokens=16, max_batch_size=8, max_total_tokens=64)
    assert full.cache_spec.scales == ()
    assert all((layer.key_scale, layer.value_scale) == (1.0, 1.0) for layer in full.kv_cache)
    assert "the checkpoint has KV cache scales, which apply with --kv-cache-dtype" in caplog.text
    executor = StepExecutor(
        loaded, BLOCK_SIZE, 10 * full.cache_spec.bytes_per_block, None, torch.float8_e4m3fn
    )
    executor.warmup(max_prefill_tokens=16, max_batch_size=8, max_total_tokens=64)
    assert [(layer.key_scale, layer.value_scale) for layer in executor.kv_cache] == [scales] * 2
    assert "stored divided by the checkpoint's scales" in caplog.text
    router = MiniRouter(executor, chunk_size=4)
    for request_id, prompt in enumerate(PROMPTS):
        router.add(new_request(request_id, prompt), max_new_tokens=4)
    assert all(len(tokens) == 4 for tokens in router.run().values())


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("inf")])
def test_a_checkpoint_with_broken_kv_cache_scales_is_refused_at_load(
    tiny_llama, tmp_path: Path, scale: float
) -> None:
    tensors = {"k_scale": torch.tensor(0.5), "v_scale": torch.tensor(scale)}
    directory = with_attention_tensors(tiny_llama[0], tmp_path / "scaled", tensors)
    with pytest.raises(ModelLoadError, match="v_scale holds .*: KV cache scales must be positive"):
        load_model(directory, torch.float32, torch.device("cpu"), Kernels.reference())


def test_the_serve_flag_takes_every_8bit_cache() -> None:
    from sluice_server.cli import build_parser

    serve = ["serve", "/models/m", "--uds-path", "/tmp/s", "--kv-cache-dtype"]
    for name in KV_CACHE_DTYPES:
        assert build_parser().parse_args([*serve, name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*serve, "int8"])
