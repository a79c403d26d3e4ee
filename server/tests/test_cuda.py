"""Sluice's engine on a CUDA GPU, against transformers on the same GPU.

The GPU versions of test_models_vs_transformers.py and test_step.py (on CUDA the model runs with
the PyTorch reference kernels), plus what only a GPU has: the KV cache sized from free GPU
memory. Skipped without a GPU; scripts/gpu_check.sh runs them on one (see docs/gpu.md).
"""

import copy
from collections.abc import Iterator, Sequence

import pytest
import torch
from sluice_server.engine.kv_cache import CUDA_MEMORY_FRACTION, KVCacheSpec
from sluice_server.engine.step import ForwardChunk, StepExecutor, run_forward
from sluice_server.kernels import Kernels, select_kernels, triton_quantized
from sluice_server.layers.linear import Linear
from sluice_server.layers.ops import CudaOps
from sluice_server.models.loader import LoadedModel, load_model
from sluice_server.pb import generate_pb2 as pb
from packed_checkpoints import dequantized_state_dict, quantize_checkpoint
from test_models_vs_transformers import MODEL_VARIANTS
from test_step import BLOCK_SIZE, PROMPTS, MiniRouter, make_executor, new_request
from test_step import (
    test_seeded_sampling_does_not_depend_on_the_batch as check_seeded_sampling,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: scripts/gpu_check.sh runs it on one (docs/gpu.md)",
)

DEVICE = torch.device("cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Largest logit error allowed against transformers, as a share of the largest logit. float32
# differs only in the order of operations; bfloat16 rounds every layer's output (on CPU the
# errors were about 1.6 % of the largest logit, a few bfloat16 steps).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.04}
# What the caching allocator, lazily loaded CUDA modules and the warmup's activations may take
# from the free memory the cache is sized from.
SIZING_SLACK_BYTES = 512 * 2**20
NEW_TOKENS = 10
# The prompt `_prefill_and_decode_errors` prefills before it decodes token by token.
PROMPT_TOKENS = 6


@pytest.fixture(
    scope="module",
    params=[(variant, dtype) for variant in MODEL_VARIANTS for dtype in DTYPES],
    ids=lambda param: "-".join(param),
)
def models(
    request: pytest.FixtureRequest, save_tiny_model
) -> tuple[LoadedModel, torch.nn.Module, torch.nn.Module]:
    """(our model, transformers' model in the same dtype, transformers' model in float32), all
    on the GPU."""
    variant, dtype_name = request.param
    model_type, overrides = MODEL_VARIANTS[variant]
    directory, reference = save_tiny_model(model_type, **overrides)
    dtype = DTYPES[dtype_name]
    loaded = load_model(directory, dtype, DEVICE, Kernels.reference())
    same_dtype = copy.deepcopy(reference).to(DEVICE, dtype)
    exact = same_dtype if dtype == torch.float32 else copy.deepcopy(reference).to(DEVICE)
    return loaded, same_dtype, exact.float()


@pytest.fixture(scope="module")
def cuda_llama(tiny_llama) -> LoadedModel:
    return load_model(tiny_llama[0], torch.float32, DEVICE, Kernels.reference())


@pytest.fixture
def release_gpu_memory() -> Iterator[None]:
    """Returns what a test's caches held to the GPU, so that the next test can size its own."""
    yield
    torch.cuda.empty_cache()


def _prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=generator).tolist()


def _tolerance(loaded: LoadedModel, expected: torch.Tensor) -> float:
    return RELATIVE_TOLERANCE[loaded.dtype] * expected.abs().max().item()


def _reference_generate(
    reference: torch.nn.Module, prompt: Sequence[int]
) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens, EOS ignored, and the logits each was chosen from."""
    with torch.no_grad():
        output = reference.generate(
            torch.tensor([list(prompt)], device=DEVICE),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = output.sequences[0, len(prompt) :].tolist()
    return tokens, torch.cat(output.logits).float()


def _engine_greedy(loaded: LoadedModel, prompts: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Greedy tokens from our engine, the prompts batched and prefilled in chunks of 4."""
    router = MiniRouter(make_executor(loaded), chunk_size=4)
    for request_id, prompt in enumerate(prompts):
        router.add(new_request(request_id, prompt), max_new_tokens=NEW_TOKENS)
    return router.run()


def _first_difference(actual: Sequence[int], expected: Sequence[int]) -> int | None:
    return next((i for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e), None)


def _prefill_and_decode_errors(
    loaded: LoadedModel, tokens: Sequence[int], expected: torch.Tensor
) -> list[float]:
    """The largest logit error against `expected` (every position's logits) of a prompt's
    prefill (PROMPT_TOKENS), then of each following token decoded through a paged cache."""
    cache = KVCacheSpec.for_model(loaded, BLOCK_SIZE).allocate(16)
    table = [11, 2, 7, 0]  # Out of order, so that a slot mix-up shows.
    chunks = [ForwardChunk(tokens[:PROMPT_TOKENS], 0, table, True)] + [
        ForwardChunk(tokens[position : position + 1], position, table, True)
        for position in range(PROMPT_TOKENS, len(tokens))
    ]
    errors = []
    for chunk in chunks:
        logits = run_forward(loaded, cache, [chunk]).logits
        assert logits.device.type == DEVICE.type
        position = chunk.cache_len + len(chunk.token_ids) - 1
        errors.append((logits[0] - expected[position]).abs().max().item())
    return errors


def test_prefill_and_decodes_match_transformers(models, record_property) -> None:
    """Against transformers in float32. bfloat16 rounds every layer's output, at other places in
    two implementations (cuBLAS picks its kernels by shape: our fused projections against
    transformers' separate ones), so a bfloat16 model may be off by the tolerance or by 1.5x
    transformers' own bfloat16 error, whichever is larger."""
    loaded, reference, exact_reference = models
    tokens = _prompt(15, seed=1)
    with torch.no_grad():
        input_ids = torch.tensor([tokens], device=DEVICE)
        exact = exact_reference(input_ids).logits[0].float()
        theirs = (reference(input_ids).logits[0].float() - exact)[PROMPT_TOKENS - 1 :]
    tolerance = _tolerance(loaded, exact)
    if loaded.dtype != torch.float32:
        record_property("transformers_error", theirs.abs().max().item())
        tolerance = max(tolerance, 1.5 * theirs.abs().max().item())
    errors = _prefill_and_decode_errors(loaded, tokens, exact)
    record_property("max_logit_error", max(errors))
    record_property("tolerance", tolerance)
    assert max(errors) < tolerance, f"errors by position: {errors}"


def test_greedy_matches_transformers_generate(models, record_property) -> None:
    """float32: the same tokens. bfloat16: the same tokens up to a step where the two choices'
    logits are within twice the tolerance of each other, where rounding may pick either (a
    difference at a clear step would be a bug: both sides chose from the same tokens)."""
    loaded, reference, _exact = models
    generated = _engine_greedy(loaded, PROMPTS)
    compared_steps = 0
    for request_id, prompt in enumerate(PROMPTS):
        expected, logits = _reference_generate(reference, prompt)
        difference = _first_difference(generated[request_id], expected)
        if difference is not None and loaded.dtype != torch.float32:
            top_two = logits[difference].topk(2).values
            margin = (top_two[0] - top_two[1]).item()
            assert margin <= 2 * _tolerance(loaded, logits), (
                f"request {request_id} differs at step {difference} with a clear margin {margin}"
            )
        else:
            assert difference is None, f"request {request_id} differs at step {difference}"
        compared_steps += len(expected) if difference is None else difference
    record_property("compared_greedy_steps", compared_steps)


def test_mixed_batch_matches_each_request_alone(cuda_llama) -> None:
    """Decodes, prompt chunks and a request resuming after cached prefix tokens, in one batch.

    float32: in bfloat16, a row's rounding depends on the batch shape the GPU's matmuls see.
    """
    short, long = PROMPTS[0], _prompt(14, seed=2)
    alone = {}
    for request_id, prompt in ((0, short), (1, long), (2, long)):
        router = MiniRouter(make_executor(cuda_llama))
        router.add(new_request(request_id, prompt))
        alone.update(router.run())

    router = MiniRouter(make_executor(cuda_llama), chunk_size=4)
    router.add(new_request(0, short))
    router.add(new_request(1, long))
    router.step()  # Both prompts in chunks: 4 of 5, 4 of 14.
    router.step()  # The short prompt ends and samples; the long one reaches 8 tokens.
    shared_blocks = router.running[1].blocks[:2]  # Its first 8 tokens, two full blocks.
    router.add(new_request(2, long, cached_tokens=8), blocks=shared_blocks)
    router.step()  # A decode, a prompt chunk, and the resumed request's first 4 new tokens.
    assert router.run() == alone


def test_seeded_sampling_does_not_depend_on_the_batch(cuda_llama) -> None:
    check_seeded_sampling(cuda_llama)  # test_step's test, with the model on the GPU.


def _generate_on_blocks(
    executor: StepExecutor, prompt: Sequence[int], blocks: Sequence[int]
) -> list[int]:
    """Greedy tokens of one request whose block table is `blocks`, all given in its first step."""
    step = pb.StepRequest(
        new_requests=[new_request(0, prompt)],
        scheduled=[pb.ScheduledRequest(id=0, num_tokens=len(prompt), new_blocks=blocks)],
    )
    tokens = []
    while True:
        (generation,) = executor.step(step).generations
        tokens.append(generation.token_id)
        if len(tokens) == NEW_TOKENS:
            return tokens
        step = pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)])


@pytest.mark.usefixtures("release_gpu_memory")
def test_warmup_sizes_the_cache_from_free_gpu_memory(cuda_llama, record_property) -> None:
    spec = KVCacheSpec.for_model(cuda_llama, BLOCK_SIZE)
    executor = StepExecutor(cuda_llama, BLOCK_SIZE, kv_cache_bytes=None)
    torch.cuda.empty_cache()
    free_before, _total = torch.cuda.mem_get_info(DEVICE)
    num_blocks = executor.warmup(max_prefill_tokens=32, max_batch_size=4, max_total_tokens=64)
    cache_bytes = num_blocks * spec.bytes_per_block
    budget = free_before * CUDA_MEMORY_FRACTION
    record_property("free_gib", free_before / 2**30)
    record_property("cache_gib", cache_bytes / 2**30)
    assert budget - SIZING_SLACK_BYTES <= cache_bytes <= budget
    assert executor.kv_cache[0].key.device.type == "cuda"
    assert torch.cuda.memory_allocated(DEVICE) >= cache_bytes
    free_after, _total = torch.cuda.mem_get_info(DEVICE)
    assert free_after >= (1 - CUDA_MEMORY_FRACTION) * free_before - SIZING_SLACK_BYTES

    # On a GPU of tens of GiB, the last blocks lie more than 2**31 elements into each layer's
    # tensors, where indexing needs 64 bits.
    prompt = PROMPTS[1]
    blocks_needed = spec.blocks_for(len(prompt) + 8)
    last_blocks = list(range(num_blocks - 1, num_blocks - 1 - blocks_needed, -1))
    far = _generate_on_blocks(executor, prompt, last_blocks)
    del executor  # Frees the cache before the small one below.
    torch.cuda.empty_cache()
    router = MiniRouter(make_executor(cuda_llama))
    router.add(new_request(0, prompt), max_new_tokens=NEW_TOKENS)
    assert far == router.run()[0]


@pytest.mark.usefixtures("release_gpu_memory")
def test_the_cache_takes_what_the_gpu_holds_not_more(cuda_llama) -> None:
    # The router refuses a --max-total-tokens beyond the returned size; warmup itself does not.
    spec = KVCacheSpec.for_model(cuda_llama, BLOCK_SIZE)
    executor = StepExecutor(cuda_llama, BLOCK_SIZE, kv_cache_bytes=None)
    _free, total = torch.cuda.mem_get_info(DEVICE)
    more_than_the_gpu_holds = (total // spec.bytes_per_block + 1) * BLOCK_SIZE
    num_blocks = executor.warmup(
        max_prefill_tokens=16, max_batch_size=2, max_total_tokens=more_than_the_gpu_holds
    )
    assert 0 < num_blocks * BLOCK_SIZE < more_than_the_gpu_holds


@pytest.mark.usefixtures("release_gpu_memory")
def test_warmup_sizes_the_cache_as_asked(cuda_llama) -> None:
    spec = KVCacheSpec.for_model(cuda_llama, BLOCK_SIZE)
    executor = StepExecutor(cuda_llama, BLOCK_SIZE, 3 * spec.bytes_per_block)
    assert executor.warmup(max_prefill_tokens=16, max_batch_size=2, max_total_tokens=64) == 3


@pytest.mark.parametrize(("method", "act_order"), [("awq", False), ("gptq", True)])
def test_quantized_checkpoints_through_the_gpu_kernels(
    save_tiny_model, tmp_path, method: str, act_order: bool, record_property
) -> None:
    """A 4-bit checkpoint on the kernels `auto` picks on CUDA (the Triton W4A16 matmul), in
    float32, against transformers with the checkpoint's dequantized weights."""
    source, reference = save_tiny_model("llama", tie_word_embeddings=False)
    checkpoint = tmp_path / method
    quantize_checkpoint(source, checkpoint, method, 4, group_size=32, act_order=act_order)
    reference = copy.deepcopy(reference)
    reference.load_state_dict(dequantized_state_dict(checkpoint))
    kernels = select_kernels("auto", DEVICE, tmp_path / "kernel-cache")
    assert isinstance(kernels.ops, CudaOps)
    loaded = load_model(checkpoint, torch.float32, DEVICE, kernels)
    assert any(m.quantized is not None for m in loaded.model.modules() if isinstance(m, Linear))
    tokens = _prompt(15, seed=2)
    with torch.no_grad():
        expected = reference.to(DEVICE)(torch.tensor([tokens], device=DEVICE)).logits[0]
    errors = _prefill_and_decode_errors(loaded, tokens, expected)
    record_property("max_logit_error", max(errors))
    assert max(errors) < _tolerance(loaded, expected), f"errors by position: {errors}"


def test_fp8_weights_through_the_gpu_fp8_matmul(save_tiny_model, record_property) -> None:
    """FP8 weights (quantized at load) in bfloat16 through the FP8 matmul (activations rounded to
    e4m3 per row) against the same weights dequantized on every call: a prompt's logits and a
    one-token prompt's (the decode shape). The matmul's own error is test_triton_quantized.py's
    (3 % of a projection's output on an H200); this random model amplifies such differences
    layer by layer (on an H200: 12 % and 5 % of the logits' norm, about as much against
    activations rounded to e4m3 the same way in PyTorch), so the bound catches a wrong path
    (off by the logits' whole size), not rounding."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    fp8 = load_model(source, torch.bfloat16, DEVICE, Kernels.cuda(), quantize="fp8")
    dequantized = load_model(source, torch.bfloat16, DEVICE, Kernels.reference(), quantize="fp8")
    projections = [m.quantized for m in fp8.model.modules() if isinstance(m, Linear)]
    projections = [weight for weight in projections if weight is not None]
    assert projections
    for weight in projections:
        x = torch.ones(1, weight.in_features, dtype=torch.bfloat16, device=DEVICE)
        assert triton_quantized.takes_scaled_mm(x, weight)
    errors = []
    for tokens in (_prompt(15, seed=3), _prompt(1, seed=4)):
        table = list(range(len(tokens) // BLOCK_SIZE + 1))
        chunk = ForwardChunk(tokens, 0, table, True)
        logits = []
        for model in (fp8, dequantized):
            cache = KVCacheSpec.for_model(model, BLOCK_SIZE).allocate(len(table))
            logits.append(run_forward(model, cache, [chunk]).logits[0].float())
        errors.append(((logits[0] - logits[1]).norm() / logits[1].norm()).item())
    record_property("relative_logit_errors", errors)
    assert max(errors) < 0.25
