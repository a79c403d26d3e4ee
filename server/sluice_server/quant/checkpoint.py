"""Checkpoints quantized before serving (AWQ, GPTQ): the method and settings their
configuration names, and their packed projections read as `QuantizedWeight`s.

A projection `X` of such a checkpoint is stored as `X.qweight`, `X.qzeros` and `X.scales` (and
GPTQ's `X.g_idx`) in place of `X.weight`; layers the method left alone (the LM head, usually)
keep their `X.weight`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .awq import read_awq
from .gptq import read_gptq
from .weight import QuantizedWeight

# Methods Sluice serves from a checkpoint, as `quant_method` and `--quantize` name them.
SERVED_METHODS = ("awq", "gptq")

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

    @classmethod
    def parse(cls, method: str, config: dict[str, Any]) -> "CheckpointQuantization":
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


def checkpoint_quantization(
    model_dir: Path, hf_config: dict[str, Any], requested: str | None
) -> CheckpointQuantization | None:
    """How the checkpoint in `model_dir` is quantized, checked against `--quantize`
    (`requested`, None: whatever the checkpoint holds); None: not quantized."""
    if requested is not None and requested not in SERVED_METHODS:
        raise CheckpointQuantizationError(
            f"--quantize {requested}: Sluice serves {', '.join(SERVED_METHODS)} checkpoints"
        )
    method, config = _declared(model_dir, hf_config)
    if method is None:
        if requested is not None:
            raise CheckpointQuantizationError(
                f"--quantize {requested} serves checkpoints quantized with {requested}, but "
                f"{model_dir} is not quantized (its config.json has no quantization_config)"
            )
        return None
    if requested is not None and requested != method:
        raise CheckpointQuantizationError(
            f"--quantize {requested} conflicts with the checkpoint, which is quantized with "
            f"{method}; leave --quantize out to serve it as it is"
        )
    if method not in SERVED_METHODS:
        raise CheckpointQuantizationError(
            f"the checkpoint is quantized with {method}, which Sluice does not serve yet "
            f"(it serves {', '.join(SERVED_METHODS)} checkpoints and GGUF files)"
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
    def get(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...


class PackedQuantizedTensors:
    """A checkpoint's packed projections, looked up by the weight's name (`X.weight`)."""

    def __init__(self, quantization: CheckpointQuantization, tensors: TensorSource) -> None:
        self._quantization = quantization
        self._tensors = tensors

    def holds(self, name: str) -> bool:
        return f"{_projection(name)}.qweight" in self._tensors

    def get(self, name: str) -> QuantizedWeight | None:
        if not self.holds(name):
            return None
        projection = _projection(name)

        def tensor(suffix: str) -> torch.Tensor:
            return self._tensors.get(f"{projection}.{suffix}")

        quantization = self._quantization
        try:
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
