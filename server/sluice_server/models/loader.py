"""Builds a model from a Hugging Face style directory (config.json + safetensors)."""

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels import Kernels
from ..layers.linear import Linear
from ..layers.runtime import LayerRuntime
from ..layers.tensor_parallel import SINGLE_SHARD, ShardGroup, ShardingError
from ..memory import (
    TRANSPARENT_HUGE_PAGES,
    available_memory,
    gather_into_huge_pages,
    transparent_huge_pages_mode,
)
from ..quant.checkpoint import CheckpointQuantizationError, checkpoint_quantization
from ..quant.gguf import GgufQuantizedTensors
from ..weights import CheckpointWeights
from .compiled_stack import compile_stack
from .decoder import CausalLM, ModelConfig
from .registry import UnsupportedModelError, model_builder_for

logger = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The directory does not hold a model we can serve; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    # The attention backend and ops the model runs with; the engine uses them too.
    kernels: Kernels
    # The tensor-parallel group the model is split across.
    shards: ShardGroup
    # The weights this rank holds, as loaded (before any packing for the CPU's matmul).
    weight_bytes: int


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    kernels: Kernels,
    shards: ShardGroup = SINGLE_SHARD,
    gguf_file: Path | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Builds the model's layers (this rank's slice of them, under tensor parallelism) and fills
    them from the checkpoint. With `gguf_file` (the file `model_dir` was converted from), the
    projections it holds quantized are served quantized (`--quantize gguf`); so are those of a
    checkpoint quantized with AWQ, GPTQ or FP8, which `quantize` (`--quantize`) may insist on.
    An unquantized checkpoint's projections are quantized at load with `quantize` fp8 or
    bitsandbytes'."""
    hf_config = _read_json(model_dir / "config.json", required=True)
    try:
        packing = checkpoint_quantization(model_dir, hf_config, quantize)
    except CheckpointQuantizationError as error:
        raise ModelLoadError(f"{model_dir}: {error}") from error
    at_load = quantize if packing is None and gguf_file is None else None
    if packing is not None:
        logger.info(
            "serving %s's %d-bit %s weights as stored", model_dir, packing.bits, packing.method
        )
    elif at_load is not None:
        logger.info("quantizing %s's projections with %s as they load", model_dir, at_load)
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{model_dir / 'config.json'} has no model_type")
    try:
        build = model_builder_for(model_type)
    except UnsupportedModelError as error:
        remote_code = "auto_map" in hf_config  # modeling code shipped inside the repository
        note = "; it needs remote code, which Sluice does not run" if remote_code else ""
        raise ModelLoadError(f"{model_dir}: {error}{note}") from error
    runtime = LayerRuntime(kernels.attention, kernels.ops, dtype, device, shards)
    try:
        model = build(hf_config, runtime)
    except torch.cuda.OutOfMemoryError as error:
        raise ModelLoadError(
            f"{model_dir}: the weights do not fit in {device}'s memory in {dtype}; use a smaller "
            f"--dtype or more shards (--num-shard)"
        ) from error
    except ShardingError as error:
        counts = ", ".join(str(count) for count in supported_shard_counts(hf_config))
        raise ModelLoadError(f"{model_dir}: {error}; it splits across {counts} shards") from error
    except (ValueError, KeyError) as error:
        raise ModelLoadError(f"{model_dir}: {error}") from error
    if device.type == "cpu" and gguf_file is None and packing is None and at_load is None:
        # The parameters are allocated but not yet touched: checked now, a model too large
        # fails with a message instead of the kernel's out-of-memory kill midway through.
        _check_weights_fit(model_dir, _tensor_bytes(model), available_memory(device), dtype)
    try:
        quantized = None if gguf_file is None else GgufQuantizedTensors(gguf_file, hf_config)
        with CheckpointWeights(model_dir, quantized, packing, at_load) as weights:
            model.load_weights(weights)
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise ModelLoadError(f"{model_dir}: cannot load weights: {error}") from error
    model.eval()
    weight_bytes = _tensor_bytes(model)
    if device.type == "cpu":
        model.prepack_for_cpu()
        gathered = gather_into_huge_pages(weight_tensors(model))
        if transparent_huge_pages_mode() == "never":
            logger.warning(
                "transparent huge pages are off (%s is never): the weights and the KV cache stay "
                "in 4 KiB pages, which made decode steps 6-9 %% slower (docs/microbenchmarks.md)",
                TRANSPARENT_HUGE_PAGES,
            )
        else:
            logger.info("the weights' %.0f MB moved into memory in huge pages", gathered / 1e6)
        model.compiled_stack = compile_stack(model)
        how = "in one compiled call" if model.compiled_stack else "layer by layer"
        logger.info("the decoder layers run %s", how)
    generation_config = _read_json(model_dir / "generation_config.json", required=False)
    eos_token_ids = _eos_token_ids(generation_config) + _eos_token_ids(hf_config)
    return LoadedModel(
        model=model,
        config=model.config,
        eos_token_ids=tuple(dict.fromkeys(eos_token_ids)),
        dtype=dtype,
        device=device,
        kernels=kernels,
        shards=shards,
        weight_bytes=weight_bytes,
    )


def _check_weights_fit(
    model_dir: Path, weight_bytes: int, available_bytes: int, dtype: torch.dtype
) -> None:
    if weight_bytes > available_bytes:
        raise ModelLoadError(
            f"{model_dir}: the weights need {weight_bytes / 2**30:.2f} GiB in {dtype} on this rank, "
            f"but only {available_bytes / 2**30:.2f} GiB of memory is available; use a smaller "
            f"--dtype, more shards (--num-shard) or a machine with more memory"
        )


def weight_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters and buffers, and its projections' weights as packed for the CPU's
    matmul (which are neither)."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        if isinstance(module, Linear) and module.packed is not None:
            yield module.packed.weight
            if module.packed.bias is not None:
                yield module.packed.bias


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Memory the model's weights take on this rank, a tensor shared by two modules (tied
    embeddings) counted once."""
    tensors = {tensor.data_ptr(): tensor for tensor in model.state_dict().values()}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def supported_shard_counts(hf_config: dict[str, Any]) -> list[int]:
    """The tensor-parallel sizes a model splits across: its query heads and every MLP's
    intermediate features divide evenly, and its KV heads divide or are divided evenly."""
    num_heads = int(hf_config["num_attention_heads"])
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    even_dims = [num_heads] + [
        int(hf_config[key])
        for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
        if hf_config.get(key)
    ]
    return [
        count
        for count in range(1, num_heads + 1)
        if all(dim % count == 0 for dim in even_dims)
        and (num_kv_heads % count == 0 or count % num_kv_heads == 0)
    ]


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"not a model directory: {path} does not exist")
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(content, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return content


def _eos_token_ids(config: dict[str, Any]) -> list[int]:
    """eos_token_id may be absent, an int or a list (Llama 3 has several)."""
    value = config.get("eos_token_id")
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(token) for token in value]
