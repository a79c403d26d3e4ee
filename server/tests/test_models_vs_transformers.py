"""Every architecture against transformers' on tiny random checkpoints, in float32 (and in
bfloat16 with the compiled kernels, to a looser tolerance).

Covers prefill, decodes through a paged cache with scattered blocks, chunked prefill, and a mixed
batch, for every registered model_type and the rope scalings (Llama tied and untied, llama3,
linear, dynamic, YaRN, LongRoPE; Qwen2's biases, Qwen3's q/k norms, Mistral's and Phi-3's sliding
windows with prompts longer than the window, Gemma 2's soft-capping and Gemma 3's local layers,
three mixture-of-experts models), each with the PyTorch reference kernels and with the compiled
CPU kernels.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from sluice_server.engine.kv_cache import KVCacheSpec
from sluice_server.engine.step import ForwardChunk, run_forward
from sluice_server.kernels import CpuFeatures, Kernels
from sluice_server.layers.attention import AttentionBackend, LayerKVCache, SequenceChunk
from sluice_server.layers.ops import CompiledCpuOps, LinearMatmul
from sluice_server.layers.rotary import RopeConfig, RotaryEmbedding, inverse_frequencies
from sluice_server.models.loader import LoadedModel, ModelLoadError, load_model
from sluice_server.models.registry import MODEL_BUILDERS

TOLERANCE = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 16

# A window shorter than the tests' prompts and not a multiple of the block size, so that keys
# leave it mid-block.
WINDOW = 5
LONGROPE_FACTORS = {
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.5 * i for i in range(8)],
}
# Tiny mixture-of-experts: 4 experts, 2 per token.
MOE = {"num_experts_per_tok": 2, "tie_word_embeddings": False}
QWEN_MOE = {**MOE, "num_experts": 4, "moe_intermediate_size": 32}

MODEL_VARIANTS = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama3-rope": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    # Within max_position_embeddings dynamic NTK is the default rotation; past it, see
    # test_dynamic_rope_grows_the_base_per_position.
    "dynamic-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "yarn-rope": (
        "llama",
        {
            "max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
    "mistral": ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    "mistral-window": ("mistral", {"tie_word_embeddings": False, "sliding_window": WINDOW}),
    # Mistral-Nemo style: head_dim is not hidden_size / heads.
    "mistral-head-dim": ("mistral", {"sliding_window": None, "head_dim": 24}),
    "phi3-longrope": (
        "phi3",
        {
            "pad_token_id": 0,
            "sliding_window": WINDOW,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 32,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, **LONGROPE_FACTORS},
        },
    ),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": WINDOW,
            "sliding_window_pattern": 3,
        },
    ),
    "mixtral": ("mixtral", {**MOE, "num_local_experts": 4}),
    "qwen2-moe": (
        "qwen2_moe",
        {**QWEN_MOE, "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]},
    ),
    "qwen3-moe": ("qwen3_moe", {**QWEN_MOE, "norm_topk_prob": True}),
}


@pytest.fixture(
    scope="module",
    params=[
        (variant, kernels) for variant in MODEL_VARIANTS for kernels in ("reference", "compiled")
    ],
    ids=lambda param: "-".join(param),
)
def models(
    request: pytest.FixtureRequest, save_tiny_model, compiled_kernels: Kernels
) -> tuple[LoadedModel, torch.nn.Module, AttentionBackend]:
    """(our model, transformers' model, the attention backend ours runs with)."""
    variant, kernel_choice = request.param
    model_type, overrides = MODEL_VARIANTS[variant]
    directory, reference = save_tiny_model(model_type, **overrides)
    kernels = compiled_kernels if kernel_choice == "compiled" else Kernels.reference()
    loaded = load_model(directory, torch.float32, torch.device("cpu"), kernels)
    return loaded, reference, kernels.attention


def fresh_cache(loaded: LoadedModel) -> list[LayerKVCache]:
    spec = KVCacheSpec.for_model(loaded, BLOCK_SIZE)
    return spec.allocate(NUM_BLOCKS)


def _reference_logits(reference: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([list(token_ids)])).logits[0]


def all_row_logits(
    loaded: LoadedModel,
    backend: AttentionBackend,
    cache: list[LayerKVCache],
    token_ids: Sequence[int],
    cache_len: int,
    table: Sequence[int],
) -> torch.Tensor:
    """Logits for every token of one chunk (the engine only asks for the last)."""
    metadata = backend.build_metadata(
        [SequenceChunk(cache_len, len(token_ids), table)], BLOCK_SIZE, torch.device("cpu")
    )
    with torch.inference_mode():
        return loaded.model(
            torch.tensor(list(token_ids)),
            torch.arange(cache_len, cache_len + len(token_ids)),
            metadata,
            cache,
            torch.arange(len(token_ids)),
        )


def _prompt(length: int, seed: int = 1) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=generator).tolist()


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item()


def test_prefill_matches_transformers(models) -> None:
    loaded, reference, backend = models
    tokens = _prompt(11)
    logits = all_row_logits(loaded, backend, fresh_cache(loaded), tokens, 0, [9, 3, 14])
    assert _max_error(logits, _reference_logits(reference, tokens)) < TOLERANCE


def test_decodes_through_scattered_blocks_match_transformers(models) -> None:
    loaded, reference, _backend = models
    tokens = _prompt(15)
    expected = _reference_logits(reference, tokens)
    cache = fresh_cache(loaded)
    table = [11, 2, 7, 0]  # Out of order, so that a slot mix-up shows.
    prompt_len = 6
    result = run_forward(loaded, cache, [ForwardChunk(tokens[:prompt_len], 0, table, True)])
    assert _max_error(result.logits[0], expected[prompt_len - 1]) < TOLERANCE
    for position in range(prompt_len, len(tokens)):
        chunk = ForwardChunk(tokens[position : position + 1], position, table, True)
        result = run_forward(loaded, cache, [chunk])
        assert _max_error(result.logits[0], expected[position]) < TOLERANCE, f"position {position}"


def test_chunked_prefill_matches_one_prefill(models) -> None:
    loaded, reference, backend = models
    tokens = _prompt(13)
    expected = _reference_logits(reference, tokens)
    cache = fresh_cache(loaded)
    table = [5, 13, 1, 8]
    start = 0
    for end in (5, 6, 13):  # Chunk boundaries inside blocks, and a chunk of one token.
        logits = all_row_logits(loaded, backend, cache, tokens[start:end], start, table)
        assert _max_error(logits, expected[start:end]) < TOLERANCE, f"chunk {start}:{end}"
        start = end


def test_mixed_batch_matches_each_alone(models) -> None:
    loaded, _reference, _backend = models
    prefill_tokens = _prompt(9, seed=2)
    decode_tokens = _prompt(7, seed=3)
    prefill_table, decode_table = [4, 10, 6], [12, 3]

    def run(chunks: list[ForwardChunk], prefix_cache: bool) -> torch.Tensor:
        cache = fresh_cache(loaded)
        if prefix_cache:  # The decoding sequence's first six tokens are already cached.
            run_forward(loaded, cache, [ForwardChunk(decode_tokens[:6], 0, decode_table, False)])
        return run_forward(loaded, cache, chunks).logits

    prefill_chunk = ForwardChunk(prefill_tokens, 0, prefill_table, True)
    decode_chunk = ForwardChunk(decode_tokens[6:], 6, decode_table, True)
    together = run([prefill_chunk, decode_chunk], prefix_cache=True)
    assert _max_error(together[0], run([prefill_chunk], prefix_cache=False)[0]) < TOLERANCE
    assert _max_error(together[1], run([decode_chunk], prefix_cache=True)[0]) < TOLERANCE


def test_batched_decodes_of_different_lengths_match_each_alone(models) -> None:
    loaded, _reference, _backend = models
    sequences = [
        (_prompt(3, seed=4), [1]),
        (_prompt(10, seed=5), [7, 2, 15]),
        (_prompt(6, seed=6), [9, 14]),
    ]
    cache = fresh_cache(loaded)
    for tokens, table in sequences:
        run_forward(loaded, cache, [ForwardChunk(tokens[:-1], 0, table, False)])
    decodes = [
        ForwardChunk(tokens[-1:], len(tokens) - 1, table, True) for tokens, table in sequences
    ]
    together = run_forward(loaded, cache, decodes).logits
    for index, decode in enumerate(decodes):
        alone = run_forward(loaded, cache, [decode]).logits[0]
        assert _max_error(together[index], alone) < TOLERANCE


# An AVX2-only CPU as CpuFeatures reports it (e.g. AMD Zen 3): no AVX-512, so no bfloat16 in
# oneDNN; the projections run through Sluice's AVX2 matmul. And an x86 CPU without AVX2, where
# they run through F.linear in bfloat16.
AVX2_ONLY = CpuFeatures(
    flags=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}),
    machine="x86_64",
    onednn_bf16=False,
)
NO_AVX2 = CpuFeatures(flags=frozenset({"sse4_2"}), machine="x86_64", onednn_bf16=False)


@pytest.mark.parametrize("cpu_paths", ["this-cpu", "avx2-only", "no-avx2"])
# qwen2: projections with a bias; gemma2: GeGLU, soft-capping, windows, Gemma's norms; qwen3-moe:
# q/k norms and experts.
@pytest.mark.parametrize("variant", ["llama-tied", "qwen2", "gemma2", "qwen3-moe"])
def test_bfloat16_compiled_kernels_match_transformers(
    variant: str, cpu_paths: str, save_tiny_model, compiled_kernels: Kernels
) -> None:
    """bfloat16 through the compiled kernels, with the matmuls this CPU chooses (Sluice's own
    with AVX512-BF16 or AVX2, else oneDNN's or F.linear) and with those of an AVX2-only CPU and
    of one without AVX2, against transformers' float32 logits. Each layer rounds its output to
    bfloat16, so the tolerance is a few bfloat16 steps of the largest logit."""
    kernels = compiled_kernels
    assert isinstance(compiled_kernels.ops, CompiledCpuOps)
    module = compiled_kernels.ops.kernels
    if cpu_paths != "this-cpu":
        cpu = AVX2_ONLY if cpu_paths == "avx2-only" else NO_AVX2
        kernels = Kernels(compiled_kernels.attention, CompiledCpuOps(module, cpu))
    model_type, overrides = MODEL_VARIANTS[variant]
    directory, reference = save_tiny_model(model_type, **overrides)
    loaded = load_model(directory, torch.bfloat16, torch.device("cpu"), kernels)
    lm_head = loaded.model.lm_head.packed
    if cpu_paths == "avx2-only" and module.has_linear_bf16():
        assert lm_head is not None and lm_head.matmul is LinearMatmul.SLUICE_BF16
    if cpu_paths == "no-avx2":
        assert lm_head is None
    tokens = _prompt(15)
    expected = _reference_logits(reference, tokens)
    tolerance = 0.04 * expected.abs().max().item()
    cache = fresh_cache(loaded)
    table = [11, 2, 7, 0]
    prompt_len = 6
    logits = all_row_logits(loaded, loaded.kernels.attention, cache, tokens[:prompt_len], 0, table)
    assert _max_error(logits.float(), expected[:prompt_len]) < tolerance
    for position in range(prompt_len, len(tokens)):
        chunk = ForwardChunk(tokens[position : position + 1], position, table, True)
        result = run_forward(loaded, cache, [chunk])
        assert _max_error(result.logits[0].float(), expected[position]) < tolerance, position


def test_every_registered_architecture_is_compared() -> None:
    assert {model_type for model_type, _ in MODEL_VARIANTS.values()} == set(MODEL_BUILDERS)


def test_sliding_window_does_not_cap_the_context(save_tiny_model) -> None:
    directory, _reference = save_tiny_model("mistral", sliding_window=32)
    loaded = load_model(directory, torch.float32, torch.device("cpu"), Kernels.reference())
    assert loaded.config.max_position_embeddings == 256
    windows = {layer.self_attn.config.params.sliding_window for layer in loaded.model.layers}
    assert windows == {32}


def test_dynamic_rope_grows_the_base_per_position() -> None:
    """Up to max_position_embeddings the rotation is the default one; past it, each position's
    base grows as transformers grows it for a sequence of that length."""
    rope = RopeConfig(theta=10000.0, scaling_type="dynamic", factor=2.0, max_position_embeddings=8)
    rotary = RotaryEmbedding(16, rope, torch.device("cpu"))
    default = RotaryEmbedding(16, RopeConfig(theta=10000.0), torch.device("cpu"))
    positions = torch.arange(12)
    cos, _sin = rotary.cos_sin(positions)
    default_cos, _ = default.cos_sin(positions)
    assert torch.equal(cos[:8], default_cos[:8])
    for position in (8, 11):
        seq_len = position + 1
        base = 10000.0 * (2.0 * seq_len / 8 - 1.0) ** (16 / 14)
        inv_freq = 1.0 / base ** (torch.arange(0, 16, 2).float() / 16)
        assert torch.allclose(cos[position], (position * inv_freq).cos(), atol=1e-6)


def test_longrope_switches_factors_past_the_original_context() -> None:
    rope = RopeConfig.from_hf_config(
        {
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 32,
            "rope_scaling": {"type": "su", **LONGROPE_FACTORS},
        }
    )
    rotary = RotaryEmbedding(16, rope, torch.device("cpu"))
    # Both sets are scaled by sqrt(1 + ln(64 / 32) / ln(32)).
    assert rotary.scale == pytest.approx((1 + math.log(2) / math.log(32)) ** 0.5)
    cos, _sin = rotary.cos_sin(torch.tensor([31, 32]))
    exponents = torch.arange(0, 16, 2).float() / 16
    for row, position, factors in ((0, 31, "short_factor"), (1, 32, "long_factor")):
        inv_freq = 1.0 / (torch.tensor(LONGROPE_FACTORS[factors]) * 10000.0**exponents)
        expected = (position * inv_freq).cos() * rotary.scale
        assert torch.allclose(cos[row], expected, atol=1e-6), factors


def test_rope_config_reads_legacy_keys_and_rejects_unknown_scaling() -> None:
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert RopeConfig.from_hf_config(legacy) == RopeConfig(
        theta=500000.0, scaling_type="linear", factor=2.0
    )
    with pytest.raises(ValueError, match="unsupported rope scaling type 'mrope'"):
        RopeConfig.from_hf_config({"rope_scaling": {"rope_type": "mrope", "factor": 4.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        RopeConfig.from_hf_config({"partial_rotary_factor": 0.5})


def test_llama3_scaling_stretches_only_long_wavelengths() -> None:
    # Wavelengths under 64 / 4 = 16 positions stay, those over 64 are stretched 8 times.
    rope = RopeConfig(
        theta=500000.0, scaling_type="llama3", factor=8.0, original_max_position_embeddings=64
    )
    default = inverse_frequencies(16, RopeConfig(theta=500000.0))
    scaled = inverse_frequencies(16, rope)
    wavelength = 2 * torch.pi / default
    assert torch.equal(scaled[wavelength < 16], default[wavelength < 16])
    assert torch.allclose(scaled[wavelength > 64], default[wavelength > 64] / 8)
    between = (wavelength >= 16) & (wavelength <= 64)
    assert between.any()
    assert (scaled[between] < default[between]).all()
    assert (scaled[between] > default[between] / 8).all()


def test_unsupported_model_type_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path, torch.float32, torch.device("cpu"), Kernels.reference())
