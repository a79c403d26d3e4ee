"""A GGUF file's quantized projections, served as they are stored (`--quantize gguf`) rather
than expanded to the model's dtype.

The model directory converted from the same file (gguf_files.convert_gguf) still gives the
configuration, the tokenizer and every tensor that is not a projection (embeddings, norms); this
supplies the projections' weights, by their Hugging Face names, in the kernel's layout
(weight.py). Block formats read: Q4_0, Q4_1, Q8_0, Q4_K and Q6_K. A projection stored in any
other format (Q5_K, F16, ...) is taken from the converted directory in the model's dtype.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .weight import CODE_BLOCK, HALF_BLOCK, CodeFormat, QuantizedWeight, pack_4bit

logger = logging.getLogger(__name__)

# Architectures whose tensor names and layouts (llama.cpp's q/k row order) are verified here.
SUPPORTED_ARCHITECTURES = ("llama",)


class GgufQuantizedTensors:
    """The quantized projections of one GGUF file, looked up by Hugging Face tensor name."""

    def __init__(self, gguf_file: Path, hf_config: dict[str, Any]) -> None:
        import gguf

        self._reader = gguf.GGUFReader(gguf_file)
        architecture = _string_field(self._reader, "general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{gguf_file}: serving GGUF weights quantized is supported for "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models, not {architecture!r}; serve it "
                "without --quantize to use its weights dequantized"
            )
        num_layers = int(hf_config["num_hidden_layers"])
        arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
        self._names = gguf.get_tensor_name_map(arch, num_layers)
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        self._num_heads = int(hf_config["num_attention_heads"])
        self._num_kv_heads = int(hf_config.get("num_key_value_heads") or self._num_heads)
        self._file = gguf_file

    def get(self, name: str) -> QuantizedWeight | None:
        """The projection `name` (e.g. `model.layers.0.self_attn.q_proj.weight`, or
        `lm_head.weight`, which falls back to the tied token embeddings), or None if the file
        does not hold it in a block format read here."""
        tensor = self._tensor(name)
        if tensor is None:
            return None
        weight = _read_blocks(tensor.tensor_type.name, np.asarray(tensor.data))
        if weight is None:
            return None
        # llama.cpp stores q and k with each head's rotary pairs interleaved; Hugging Face
        # checkpoints (and Sluice's rotary) keep each head's two halves apart.
        if name.endswith("self_attn.q_proj.weight"):
            weight = _unpermute_rows(weight, self._num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = _unpermute_rows(weight, self._num_kv_heads)
        return weight

    def holds(self, name: str) -> bool:
        """Whether `get(name)` gives a quantized weight, without reading it."""
        tensor = self._tensor(name)
        return tensor is not None and tensor.tensor_type.name in _BLOCK_READERS

    def _tensor(self, name: str) -> Any:
        stem, _, suffix = name.rpartition(".")
        if stem == "lm_head":
            candidates = ["output", "token_embd"]
        else:
            mapped = self._names.get_name(stem)
            candidates = [] if mapped is None else [mapped]
        for candidate in candidates:
            tensor = self._tensors.get(f"{candidate}.{suffix}")
            if tensor is not None:
                return tensor
        return None


def _string_field(reader: Any, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def _read_blocks(type_name: str, data: np.ndarray) -> QuantizedWeight | None:
    """Rows of GGUF blocks (uint8 [N, bytes per row]) in the kernel's layout, for the block
    formats read here."""
    reader = _BLOCK_READERS.get(type_name)
    return None if reader is None else reader(data)


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [N, blocks]."""
    return (
        np.ascontiguousarray(blocks[..., start : start + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _q4_0(data: np.ndarray) -> QuantizedWeight:
    # 18 bytes per 32 weights: scale d, 16 bytes of codes; w = d * (q - 8).
    blocks = data.reshape(data.shape[0], -1, 18)
    scales = _halves(blocks, 0)
    return _weight4(blocks[..., 2:], scales, -8 * scales)


def _q4_1(data: np.ndarray) -> QuantizedWeight:
    # 20 bytes per 32 weights: scale d, minimum m, 16 bytes of codes; w = d * q + m.
    blocks = data.reshape(data.shape[0], -1, 20)
    return _weight4(blocks[..., 4:], _halves(blocks, 0), _halves(blocks, 2))


def _weight4(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> QuantizedWeight:
    rows = codes.shape[0]
    return QuantizedWeight(
        codes=torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, -1)),
        scales=torch.from_numpy(scales),
        offsets=torch.from_numpy(offsets),
        code_format=CodeFormat.UINT4,
        group_size=CODE_BLOCK,
    )


def _q8_0(data: np.ndarray) -> QuantizedWeight:
    # 34 bytes per 32 weights: scale d, 32 signed codes; w = d * q.
    blocks = data.reshape(data.shape[0], -1, 34)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(data.shape[0], -1)
    return QuantizedWeight(
        codes=torch.from_numpy(codes),
        scales=torch.from_numpy(_halves(blocks, 0)),
        offsets=None,
        code_format=CodeFormat.INT8,
        group_size=CODE_BLOCK,
    )


def _q4_k(data: np.ndarray) -> QuantizedWeight:
    # 144 bytes per 256 weights: d, dmin, 12 bytes of eight 6-bit sub-scales and sub-minimums,
    # 128 bytes of codes; in each 64 weights, the first 32 are the low nibbles of 32 bytes and
    # the next 32 the high nibbles. Sub-block j: w = d * sc[j] * q - dmin * m[j].
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, 144)
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    packed = blocks[..., 4:16].astype(np.int32)
    low, high = packed[..., 0:4], packed[..., 4:8]
    tail = packed[..., 8:12]
    sub_scales = np.concatenate([low & 63, (tail & 0x0F) | ((low >> 6) << 4)], axis=-1)
    sub_mins = np.concatenate([high & 63, (tail >> 4) | ((high >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)
    return QuantizedWeight(
        codes=pack_4bit(torch.from_numpy(codes)),
        scales=torch.from_numpy((d[..., None] * sub_scales).reshape(rows, -1).astype(np.float32)),
        offsets=torch.from_numpy(
            (-dmin[..., None] * sub_mins).reshape(rows, -1).astype(np.float32)
        ),
        code_format=CodeFormat.UINT4,
        group_size=CODE_BLOCK,
    )


def _q6_k(data: np.ndarray) -> QuantizedWeight:
    # 210 bytes per 256 weights: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 signed
    # sub-scales, d. Sub-block j (16 weights): w = d * sc[j] * (q - 32), q the 6-bit code.
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, 210)
    low = blocks[..., :128].reshape(rows, -1, 2, 2, 32).astype(np.int16)  # [half, 32-byte run]
    high = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32).astype(np.int16)
    sub_scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _halves(blocks, 208)
    # In each half of 128 weights, quarter k (32 weights) is: the low nibbles (k = 0, 1) or the
    # high nibbles (k = 2, 3) of run k % 2, with bits 2k and 2k + 1 of the high-bit bytes.
    quarters = [
        ((low[..., k % 2, :] >> (4 * (k // 2))) & 0x0F) | (((high[..., 0, :] >> (2 * k)) & 3) << 4)
        for k in range(4)
    ]
    codes = (np.stack(quarters, axis=3) - 32).astype(np.int8).reshape(rows, -1)
    return QuantizedWeight(
        codes=torch.from_numpy(codes),
        scales=torch.from_numpy((d[..., None] * sub_scales).reshape(rows, -1)),
        offsets=None,
        code_format=CodeFormat.INT8,
        group_size=HALF_BLOCK,
    )


_BLOCK_READERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def _unpermute_rows(weight: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    rows = weight.out_features
    order = torch.arange(rows).view(num_heads, rows // num_heads // 2, 2).transpose(1, 2)
    order = order.reshape(-1)
    return QuantizedWeight(
        codes=weight.codes[order],
        scales=weight.scales[order],
        offsets=None if weight.offsets is None else weight.offsets[order],
        code_format=weight.code_format,
        group_size=weight.group_size,
    )
