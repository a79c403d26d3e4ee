"""How a checkpoint is served quantized: the method and settings its configuration names
(AWQ, GPTQ, FP8), checked against `--quantize`, which may also ask to quantize an unquantized
checkpoint at load (`at_load`); and a quantized checkpoint's projections read as
`QuantizedWeight`s.

A projection `X` of an AWQ or GPTQ checkpoint is stored as `X.qweight`, `X.qzeros` and
`X.scales` (and GPTQ's `X.g_idx`) in place of `X.weight`; an FP8 one as FP8 codes in `X.weight`
beside `X.weight_scale` (see `fp8`). Layers the method left alone (the LM head, usually) keep
their `X.weight`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .at_load import QUANTIZERS
from .awq import read_awq
from .fp8 import read_fp8
from .gptq import read_gptq
from .weight import QuantizedWeight

# Methods Sluice serves from a checkpoint, as `quant_method` names them.
SERVED_METHODS = ("awq", "gptq", "fp8", "fbgemm_fp8", "compressed-tensors")
# Those whose projections are FP8 (compressed-tensors': its float-quantized format).
_FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")
# What `--quantize` may ask for: a checkpoint's method, or (fp8 and bitsandbytes') quantizing an
# unquantized checkpoint at load.
REQUESTABLE = ("awq", "gptq", *QUANTIZERS)

# Where checkpoints made before transformers' `quantization_config` keep their settings.
_LEGACY_CONFIG_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


class CheckpointQuantizationError(ValueError):
    """The checkpoint's quantization cannot be served as asked; the message says why."""


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str
    bits: int
    # GPTQ's original format stores zero points minus one.
    zeros_minus_one: bool = False
    # AWQ's group size (GPTQ's follows from its scales' shape).
    group_size: int = 0
    # FP8's scale block (rows, columns), where scales are per block.
    block: tuple[int, int] | None = None

    @classmethod
    def parse(cls, method: str, config: dict[str, Any]) -> "CheckpointQuantization":
        if method in ("fp8", "fbgemm_fp8"):
            return cls("fp8", 8, block=_block(config.get("weight_block_size")))
        if method == "compressed-tensors":
            return _parse_compressed_tensors(config)
        if method == "awq":
            version = str(config.get("version", "gemm")).lower()
            if version != "gemm":
                raise CheckpointQuantizationError(
                    f"AWQ's {version} layout is not supported; Sluice reads AWQ's GEMM layout"
                )
            if not config.get("zero_point", True):
                raise CheckpointQuantizationError("AWQ without zero points is not supported")
            bits = int(config.get("bits", config.get("w_bit", 4)))
            if bits != 4:
                raise CheckpointQuantizationError(f"{bits}-bit AWQ is not supported (4 bits)")
            group_size = int(config.get("group_size", config.get("q_group_size", 128)))
            return cls(method, bits, group_size=group_size)
        fmt = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointQuantizationError(
                f"GPTQ's {fmt} format is not supported; Sluice reads gptq and gptq_v2"
            )
        bits = int(config.get("bits", 4))
        if bits not in (4, 8):
            raise CheckpointQuantizationError(f"{bits}-bit GPTQ is not supported (4 or 8 bits)")
        return cls(method, bits, zeros_minus_one=fmt == "gptq")


def _block(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    rows, columns = (int(size) for size in value)
    return rows, columns


def _parse_compressed_tensors(config: dict[str, Any]) -> CheckpointQuantization:
    """compressed-tensors' FP8 weights (its float-quantized format, or naive-quantized with
    float weights); its integer and sparse formats are not served."""
    fmt = str(config.get("format", "")).lower()
    if fmt not in ("float-quantized", "naive-quantized"):
        raise CheckpointQuantizationError(
            f"compressed-tensors' {fmt} format is not supported; Sluice serves its FP8 weights "
            "(float-quantized)"
        )
    blocks = set()
    for name, group in dict(config.get("config_groups") or {}).items():
        weights = dict(group.get("weights") or {})
        kind, bits = str(weights.get("type", "int")), int(weights.get("num_bits", 0))
        if (kind, bits) != ("float", 8):
            raise CheckpointQuantizationError(
                f"compressed-tensors group {name}: {bits}-bit {kind} weights are not supported; "
                "Sluice serves its 8-bit float (FP8) weights"
            )
        blocks.add(_block(weights.get("block_structure")))
    if len(blocks) > 1:
        raise CheckpointQuantizationError("compressed-tensors groups with different blocks")
    return CheckpointQuantization("fp8", 8, block=blocks.pop() if blocks else None)


def checkpoint_quantization(
    model_dir: Path, hf_config: dict[str, Any], requested: str | None
) -> CheckpointQuantization | None:
    """How the checkpoint in `model_dir` is quantized, checked against `--quantize`
    (`requested`, None: whatever the checkpoint holds); None: not quantized (then `requested`
    may be a method that quantizes at load, which `at_load` does)."""
    if requested is not None and requested not in REQUESTABLE:
        raise CheckpointQuantizationError(
            f"--quantize {requested}: Sluice serves {', '.join(REQUESTABLE)}"
        )
    method, config = _declared(model_dir, hf_config)
    if method is None:
        if requested is not None and requested not in QUANTIZERS:
            raise CheckpointQuantizationError(
                f"--quantize {requested} serves checkpoints quantized with {requested}, but "
                f"{model_dir} is not quantized (its config.json has no quantization_config)"
            )
        return None
    # compressed-tensors' checkpoints Sluice serves hold FP8 weights (checked when parsed).
    as_requested = "fp8" if method in _FP8_METHODS else method
    if requested is not None and requested != as_requested:
        raise CheckpointQuantizationError(
            f"--quantize {requested} conflicts with the checkpoint, which is quantized with "
            f"{method}; leave --quantize out to serve it as it is"
        )
    if method not in SERVED_METHODS:
        hint = ""
        if method == "bitsandbytes":
            hint = "; serve its unquantized original with --quantize bitsandbytes-nf4 instead"
        raise CheckpointQuantizationError(
            f"the checkpoint is quantized with {method}, which Sluice does not serve yet "
            f"(it serves {', '.join(SERVED_METHODS)} checkpoints and GGUF files){hint}"
        )
    try:
        return CheckpointQuantization.parse(method, config)
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointQuantizationError):
            raise
        raise CheckpointQuantizationError(f"unreadable {method} settings: {error}") from error


def _declared(model_dir: Path, hf_config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    config = hf_config.get("quantization_config")
    if isinstance(config, dict):
        return str(config.get("quant_method", "")).lower() or None, config
    for name, method in _LEGACY_CONFIG_FILES.items():
        path = model_dir / name
        if path.is_file():
            try:
                return method, json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise CheckpointQuantizationError(f"cannot read {path}: {error}") from error
    return None, {}


class TensorSource(Protocol):
    def stored(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...


# Where an FP8 projection keeps its scale: compressed-tensors' and TGI's name, and transformers'
# fine-grained (block) FP8's.
_FP8_SCALES = ("weight_scale", "weight_scale_inv")


class PackedQuantizedTensors:
    """A checkpoint's quantized projections, looked up by the weight's name (`X.weight`)."""

    def __init__(self, quantization: CheckpointQuantization, tensors: TensorSource) -> None:
        self._quantization = quantization
        self._tensors = tensors

    def holds(self, name: str) -> bool:
        return self._fp8_scale(name) is not None or f"{_projection(name)}.qweight" in self._tensors

    def _fp8_scale(self, name: str) -> str | None:
        if self._quantization.method != "fp8":
            return None
        names = (f"{_projection(name)}.{suffix}" for suffix in _FP8_SCALES)
        return next((scale for scale in names if scale in self._tensors), None)

    def get(self, name: str) -> QuantizedWeight | None:
        if not self.holds(name):
            return None
        projection = _projection(name)

        def tensor(suffix: str) -> torch.Tensor:
            return self._tensors.stored(f"{projection}.{suffix}")

        quantization = self._quantization
        try:
            fp8_scale = self._fp8_scale(name)
            if fp8_scale is not None:
                return read_fp8(
                    tensor("weight"), self._tensors.stored(fp8_scale), quantization.block
                )
            if quantization.method == "awq":
                return read_awq(
                    tensor("qweight"), tensor("qzeros"), tensor("scales"), quantization.group_size
                )
            g_idx = tensor("g_idx") if f"{projection}.g_idx" in self._tensors else None
            return read_gptq(
                tensor("qweight"),
                tensor("qzeros"),
                tensor("scales"),
                g_idx,
                quantization.bits,
                quantization.zeros_minus_one,
            )
        except (ValueError, RuntimeError) as error:
            # RuntimeError: torch refusing a tensor of the wrong shape for its packing.
            raise ValueError(f"{projection}: {error}") from error


def _projection(name: str) -> str:
    return name.removesuffix(".weight")
