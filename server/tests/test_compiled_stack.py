"""The compiled decoder stack (models/compiled_stack.py, kernels/csrc/decoder.cpp) against the
Python layers it replaces: it calls the same kernels in the same order, so the logits and the
KV cache it writes must be bitwise equal, for each kind of projection (Sluice's bfloat16 matmul,
oneDNN's, each quantized format) and each layer option (biases, q/k norms, sliding windows).
The models it must leave layer by layer are checked too; transformers' agreement with both paths
is test_models_vs_transformers.py's."""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from packed_checkpoints import quantize_checkpoint
from sluice_server.engine.kv_cache import KVCacheSpec
from sluice_server.engine.step import ForwardChunk, run_forward
from sluice_server.kernels import CpuFeatures, Kernels
from sluice_server.layers.attention import LayerKVCache
from sluice_server.layers.ops import CompiledCpuOps, LinearMatmul
from sluice_server.models.compiled_stack import CompiledStack
from sluice_server.models.loader import LoadedModel, load_model
from test_models_vs_transformers import BLOCK_SIZE, MODEL_VARIANTS, NUM_BLOCKS, fresh_cache

CPU = torch.device("cpu")
# Scattered blocks, a prompt in two chunks, then decodes past a block boundary.
TABLE = [11, 2, 7, 0, 5]
TOKENS = [3, 17, 42, 99, 5, 64, 23, 7, 81, 30, 12, 55, 9]
FIRST_CHUNK = 5
SECOND_CHUNK = 4


def run_steps(loaded: LoadedModel, cache: list[LayerKVCache]) -> list[torch.Tensor]:
    """Every step's logits: two prompt chunks, then one decode per remaining token."""
    logits = []
    position = 0
    for length in (FIRST_CHUNK, SECOND_CHUNK, *[1] * (len(TOKENS) - FIRST_CHUNK - SECOND_CHUNK)):
        chunk = ForwardChunk(TOKENS[position : position + length], position, TABLE, True)
        logits.append(run_forward(loaded, cache, [chunk]).logits)
        position += length
    return logits


def assert_both_paths_agree(
    loaded: LoadedModel,
    new_cache: Callable[[LoadedModel], list[LayerKVCache]] = fresh_cache,
) -> None:
    stack = loaded.model.compiled_stack
    assert isinstance(stack, CompiledStack)
    compiled_cache = new_cache(loaded)
    compiled = run_steps(loaded, compiled_cache)
    loaded.model.compiled_stack = None
    try:
        python_cache = new_cache(loaded)
        python = run_steps(loaded, python_cache)
    finally:
        loaded.model.compiled_stack = stack
    for step, (ours, theirs) in enumerate(zip(compiled, python, strict=True)):
        assert torch.equal(ours, theirs), f"step {step}"
    for ours, theirs in zip(compiled_cache, python_cache, strict=True):
        assert torch.equal(ours.key, theirs.key) and torch.equal(ours.value, theirs.value)


# llama: plain; qwen2: projection biases; qwen3: q/k norms; mistral-window: a sliding window;
# phi3-longrope: fused checkpoint projections and a scaled rotation.
@pytest.mark.parametrize(
    "variant", ["llama-tied", "qwen2", "qwen3", "mistral-window", "phi3-longrope"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_stack_matches_the_python_layers(
    variant: str, dtype: torch.dtype, save_tiny_model, compiled_kernels: Kernels
) -> None:
    model_type, overrides = MODEL_VARIANTS[variant]
    directory, _ = save_tiny_model(model_type, **overrides)
    loaded = load_model(directory, dtype, CPU, compiled_kernels)
    assert_both_paths_agree(loaded)


def test_compiled_stack_matches_the_python_layers_on_a_scaled_8bit_cache(
    tiny_llama: tuple[Path, torch.nn.Module], compiled_kernels: Kernels
) -> None:
    """Each layer's cache scales reach its kernels as the Python layers pass them."""

    def scaled_cache(loaded: LoadedModel) -> list[LayerKVCache]:
        spec = KVCacheSpec.for_model(loaded, BLOCK_SIZE, torch.float8_e4m3fn)
        return replace(spec, scales=((0.5, 3.0), (2.0, 0.75))).allocate(NUM_BLOCKS)

    loaded = load_model(tiny_llama[0], torch.bfloat16, CPU, compiled_kernels)
    assert_both_paths_agree(loaded, scaled_cache)


@pytest.mark.parametrize(
    "method", ["awq", "gptq-act-order", "fp8", "bitsandbytes", "bitsandbytes-nf4"]
)
def test_compiled_stack_matches_the_python_layers_quantized(
    method: str, save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    directory, at_load = source, None
    if method in ("awq", "gptq-act-order"):
        quantize_checkpoint(source, tmp_path, method[:4], act_order=method == "gptq-act-order")
        directory = tmp_path
    else:
        at_load = method
    loaded = load_model(directory, torch.bfloat16, CPU, compiled_kernels, quantize=at_load)
    assert loaded.model.layers[0].self_attn.qkv_proj.quantized is not None
    assert_both_paths_agree(loaded)


def test_quantized_prompt_rows_do_not_depend_on_the_step(
    save_tiny_model, compiled_kernels: Kernels, tmp_path: Path
) -> None:
    # A prompt's rows take the quantized projections' bfloat16 tiles and decoded rows the path
    # for decoding (integer codes times rounded x, or on AVX512-BF16 without AMX bfloat16 dot
    # products of the codes), so each row's kind, not the step's mix, decides its arithmetic.
    source, _ = save_tiny_model("llama", tie_word_embeddings=False)
    quantize_checkpoint(source, tmp_path, "awq")
    loaded = load_model(tmp_path, torch.bfloat16, CPU, compiled_kernels)
    assert isinstance(loaded.model.compiled_stack, CompiledStack)
    prompt, other_prompt, other_table = TOKENS[:FIRST_CHUNK], TOKENS[FIRST_CHUNK:], [1, 3, 4]

    def prompt_chunk(tokens: list[int], table: list[int], marked: bool = True) -> ForwardChunk:
        return ForwardChunk(tokens, 0, table, True, prompt_tokens=len(tokens) if marked else 0)

    def decode_chunk() -> ForwardChunk:
        return ForwardChunk(other_prompt[-1:], len(other_prompt) - 1, other_table, True)

    def logits(cache: list[LayerKVCache], chunks: list[ForwardChunk]) -> torch.Tensor:
        return run_forward(loaded, cache, chunks).logits

    alone_cache = fresh_cache(loaded)
    prompt_alone = logits(alone_cache, [prompt_chunk(prompt, TABLE)])
    logits(alone_cache, [prompt_chunk(other_prompt[:-1], other_table)])
    decode_alone = logits(alone_cache, [decode_chunk()])

    mixed_cache = fresh_cache(loaded)
    logits(mixed_cache, [prompt_chunk(other_prompt[:-1], other_table)])
    mixed = logits(mixed_cache, [prompt_chunk(prompt, TABLE), decode_chunk()])
    assert torch.equal(mixed[0], prompt_alone[0])
    assert torch.equal(mixed[1], decode_alone[0])
    for ours, theirs in zip(alone_cache, mixed_cache, strict=True):
        assert torch.equal(ours.key, theirs.key) and torch.equal(ours.value, theirs.value)
    # Unmarked, the same prompt takes the path for decoding: different arithmetic, close logits.
    unmarked = logits(fresh_cache(loaded), [prompt_chunk(prompt, TABLE, marked=False)])
    if "avx2" in compiled_kernels.ops.kernels.compiled_isa():
        assert not torch.equal(unmarked, prompt_alone)
    torch.testing.assert_close(unmarked.float(), prompt_alone.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("dtype", "matmul"),
    [(torch.bfloat16, LinearMatmul.SLUICE_BF16), (torch.float32, LinearMatmul.SLUICE_F32)],
)
def test_a_long_steps_mlp_in_chunks_of_rows_matches_the_python_layers(
    save_tiny_model, built_kernels: Kernels, dtype: torch.dtype, matmul: LinearMatmul
) -> None:
    # decoder.cpp runs the MLP of a step with more than 1,024 rows on chunks of rows where its
    # projections are Sluice's own matmuls; the Python layers take all the rows at once. Every
    # row's logits (scored) and both layers' caches must still be bitwise equal, with each
    # build's matmul (AMX, AVX512-BF16, AVX2; float32 on AVX2 CPUs without AVX-512).
    directory, _ = save_tiny_model("llama", max_position_embeddings=4096)
    loaded = load_model(directory, dtype, CPU, built_kernels)
    gate_up = loaded.model.layers[0].feed_forward.gate_up_proj.packed
    if gate_up is None or gate_up.matmul is not matmul:
        pytest.skip(f"{matmul.value} is not what this CPU and build run {dtype} with")
    stack = loaded.model.compiled_stack
    assert isinstance(stack, CompiledStack)
    tokens = torch.randint(3, 128, (2_100,), generator=torch.Generator().manual_seed(0)).tolist()
    block_size = 16
    table = list(range(-(-len(tokens) // block_size)))
    spec = KVCacheSpec.for_model(loaded, block_size)
    chunk = ForwardChunk(tokens, 0, table, True, scored=len(tokens) - 1)

    def run() -> tuple[torch.Tensor, list[LayerKVCache]]:
        cache = spec.allocate(len(table))
        result = run_forward(loaded, cache, [chunk])
        assert result.scoring_logits is not None
        return torch.cat([result.scoring_logits, result.logits]), cache

    compiled, compiled_cache = run()
    loaded.model.compiled_stack = None
    try:
        python, python_cache = run()
    finally:
        loaded.model.compiled_stack = stack
    assert compiled.shape[0] == len(tokens)
    assert torch.equal(compiled, python)
    for ours, theirs in zip(compiled_cache, python_cache, strict=True):
        assert torch.equal(ours.key, theirs.key) and torch.equal(ours.value, theirs.value)


def test_models_the_stack_cannot_run_stay_layer_by_layer(
    save_tiny_model, compiled_kernels: Kernels
) -> None:
    # Gemma's sandwich norms and GeGLU, and a mixture of experts.
    for variant in ("gemma2", "mixtral"):
        model_type, overrides = MODEL_VARIANTS[variant]
        directory, _ = save_tiny_model(model_type, **overrides)
        loaded = load_model(directory, torch.float32, CPU, compiled_kernels)
        assert loaded.model.compiled_stack is None, variant
    directory, _ = save_tiny_model("llama", tie_word_embeddings=True)
    # The PyTorch reference kernels.
    assert (
        load_model(directory, torch.float32, CPU, Kernels.reference()).model.compiled_stack is None
    )
    # A CPU without AVX2, whose bfloat16 projections nothing packs (F.linear).
    assert isinstance(compiled_kernels.ops, CompiledCpuOps)
    no_avx2 = CpuFeatures(flags=frozenset({"sse4_2"}), machine="x86_64", onednn_bf16=False)
    kernels = Kernels(
        compiled_kernels.attention, CompiledCpuOps(compiled_kernels.ops.kernels, no_avx2)
    )
    assert load_model(directory, torch.bfloat16, CPU, kernels).model.compiled_stack is None


def test_a_step_with_the_wrong_caches_is_refused(
    tiny_llama: tuple[Path, torch.nn.Module], compiled_kernels: Kernels
) -> None:
    loaded = load_model(tiny_llama[0], torch.float32, CPU, compiled_kernels)
    cache = fresh_cache(loaded)[:-1]
    with pytest.raises(
        RuntimeError, match="one key and one value cache, and their scales, per layer"
    ):
        run_forward(loaded, cache, [ForwardChunk(TOKENS[:3], 0, TABLE, True)])
