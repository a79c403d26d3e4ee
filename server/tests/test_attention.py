"""The PyTorch reference attention backend (the one of GPUs, and of CPUs without the compiled
kernels) with sliding windows and soft-capped scores, on each of its paths (batched decodes,
prompts that start their sequence, chunks after a cached prefix), against a dense reference.
test_cpu_kernels.py checks the compiled kernel the same way."""

import pytest
import torch
from attention_cases import (
    CACHE_DTYPES_8BIT,
    WINDOW_AND_CAP_VARIANTS,
    attend_8bit_cache,
    attend_scaled_8bit_cache,
    check_8bit_cache_saturates,
    check_window_and_cap,
)
from sluice_server.layers.attention import AttentionParams, TorchAttentionBackend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "group", "block_size"), [(64, 3, 16), (48, 2, 24)])
@pytest.mark.parametrize(("sliding_window", "logit_softcap", "score_gain"), WINDOW_AND_CAP_VARIANTS)
def test_windows_and_softcap_match_dense_reference(
    dtype: torch.dtype,
    head_dim: int,
    group: int,
    block_size: int,
    sliding_window: int | None,
    logit_softcap: float | None,
    score_gain: float,
) -> None:
    check_window_and_cap(
        TorchAttentionBackend(),
        dtype,
        head_dim,
        group,
        block_size,
        sliding_window,
        logit_softcap,
        score_gain,
    )


def test_params_reject_an_empty_window_and_a_non_positive_cap() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AttentionParams(scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="positive"):
        AttentionParams(scale=1.0, logit_softcap=0.0)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_8bit_cache_attends_the_values_it_holds(
    dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    attend_8bit_cache(TorchAttentionBackend(), dtype, cache_dtype, 64, 3, 16)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_8bit_cache_applies_its_scales(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    attend_scaled_8bit_cache(TorchAttentionBackend(), dtype, cache_dtype)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES_8BIT)
def test_an_8bit_cache_saturates(cache_dtype: torch.dtype) -> None:
    check_8bit_cache_saturates(TorchAttentionBackend(), cache_dtype)
