"""The compiled decoder stack (models/compiled_stack.py, kernels/csrc/decoder.cpp) against the
Python layers it replaces: it calls the same kernels in the same order, so the logits and the
KV cache it writes must be bitwise equal, for each kind of projection (Sluice's bfloat16 matmul,
oneDNN's, each quantized format) and each layer option (biases, q/k norms, sliding windows).
The models it must leave layer by layer are checked too; transformers' agreement with both paths
is test_models_vs_transformers.py's."""

from pathlib import Path

import pytest
import torch
from packed_checkpoints import quantize_checkpoint
from sluice_server.engine.step import ForwardChunk, run_forward
from sluice_server.kernels import CpuFeatures, Kernels
from sluice_server.layers.attention import LayerKVCache
from sluice_server.layers.ops import CompiledCpuOps
from sluice_server.models.compiled_stack import CompiledStack
from sluice_server.models.loader import LoadedModel, load_model
from test_models_vs_transformers import MODEL_VARIANTS, fresh_cache

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


def assert_both_paths_agree(loaded: LoadedModel) -> None:
    stack = loaded.model.compiled_stack
    assert isinstance(stack, CompiledStack)
    compiled_cache = fresh_cache(loaded)
    compiled = run_steps(loaded, compiled_cache)
    loaded.model.compiled_stack = None
    try:
        python_cache = fresh_cache(loaded)
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
    with pytest.raises(RuntimeError, match="one key and one value cache per layer"):
        run_forward(loaded, cache, [ForwardChunk(TOKENS[:3], 0, TABLE, True)])
