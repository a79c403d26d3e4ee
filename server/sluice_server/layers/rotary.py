"""Rotary position embeddings (RoPE), with the scaling variants Llama checkpoints use.

Uses the "rotate half" layout of Hugging Face checkpoints: the first and second halves of each
head dimension form the rotated pairs.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_SCALING_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"
    factor: float = 1.0
    # llama3 only: the band between these wavelengths is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> "RopeConfig":
        """Reads transformers v5 `rope_parameters`, or the older `rope_theta` and `rope_scaling`."""
        params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
        scaling_type = params.get("rope_type", params.get("type", "default")) or "default"
        if scaling_type not in SUPPORTED_SCALING_TYPES:
            supported = ", ".join(SUPPORTED_SCALING_TYPES)
            raise ValueError(
                f"unsupported rope scaling type {scaling_type!r}; supported: {supported}"
            )
        return cls(
            theta=theta,
            scaling_type=scaling_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get(
                    "original_max_position_embeddings",
                    hf_config.get("max_position_embeddings", 8192),
                )
            ),
        )


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """One rotation frequency per pair of dimensions, [head_dim / 2], float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1 stretches only the long wavelengths (those that did not fit the original context)
    # by `factor`, keeps the short ones, and blends linearly in between.
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelength = rope.original_max_position_embeddings / rope.high_freq_factor
    stretched = torch.where(wavelength > low_freq_wavelength, inv_freq / rope.factor, inv_freq)
    blend = (rope.original_max_position_embeddings / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * stretched / rope.factor + blend * stretched
    in_between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_between, blended, stretched)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device) -> None:
        super().__init__()
        self.register_buffer(
            "inv_freq", inverse_frequencies(head_dim, rope).to(device), persistent=False
        )

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin of every (position, frequency), [T, head_dim / 2]; once per
        forward, shared by every layer."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()
