"""Rotary position embeddings (RoPE), with the scaling variants checkpoints use.

Uses the "rotate half" layout of Hugging Face checkpoints: the first and second halves of each
head dimension form the rotated pairs.

Every rotation here depends on the token's own position only, never on the rest of the batch, so
a sequence's keys and outputs do not change with what else runs in its step. Two scalings that
transformers computes from the longest sequence in the forward are therefore chosen per position
instead: `dynamic` rescales the base for a token past `max_position_embeddings` by that token's
own position, and `longrope` rotates tokens past the original context with the long factors.
Within the original context both equal transformers exactly.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_SCALING_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    scaling_type: str = "default"
    factor: float = 1.0
    # llama3: the band between these wavelengths is interpolated smoothly.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3, yarn, longrope: the context the model was pretrained with.
    original_max_position_embeddings: int = 8192
    # dynamic, longrope: the context the config declares.
    max_position_embeddings: int = 8192
    # yarn: the band of rotation counts blended between interpolation and extrapolation.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # yarn, longrope: cos and sin are multiplied by this (None: derived from `factor`).
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # longrope: per-frequency divisors within and past the original context.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf_config(
        cls, hf_config: dict[str, Any], params: dict[str, Any] | None = None
    ) -> "RopeConfig":
        """Reads transformers v5 `rope_parameters`, or the older `rope_theta` and `rope_scaling`;
        `params` overrides them (a model with one set per layer type passes its own)."""
        if params is None:
            params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        partial = float(params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1)))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
        theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
        scaling_type = params.get("rope_type", params.get("type", "default")) or "default"
        if scaling_type == "su":  # Phi-3's first name for longrope
            scaling_type = "longrope"
        if scaling_type not in SUPPORTED_SCALING_TYPES:
            supported = ", ".join(SUPPORTED_SCALING_TYPES)
            raise ValueError(
                f"unsupported rope scaling type {scaling_type!r}; supported: {supported}"
            )
        max_positions = int(hf_config.get("max_position_embeddings", 8192))
        original = int(
            params.get(
                "original_max_position_embeddings",
                hf_config.get("original_max_position_embeddings", max_positions),
            )
        )
        factor = params.get("factor")
        if factor is None:
            # yarn and longrope may leave the factor to the two context lengths.
            factor = max_positions / original if scaling_type in ("yarn", "longrope") else 1.0

        def optional_float(key: str) -> float | None:
            value = params.get(key)
            return None if value is None else float(value)

        return cls(
            theta=theta,
            scaling_type=scaling_type,
            factor=float(factor),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            max_position_embeddings=max_positions,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            attention_factor=optional_float("attention_factor"),
            mscale=optional_float("mscale"),
            mscale_all_dim=optional_float("mscale_all_dim"),
            short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        )


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """One rotation frequency per pair of dimensions, [head_dim / 2], float32, for every scaling
    whose frequencies do not depend on the position (all but dynamic and longrope's long set)."""
    inv_freq = 1.0 / (rope.theta ** _exponents(head_dim))
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    if rope.scaling_type == "yarn":
        return _yarn_scaled(inv_freq, head_dim, rope)
    if rope.scaling_type == "longrope":
        return _longrope_scaled(head_dim, rope, rope.short_factor)
    return inv_freq


def attention_factor(rope: RopeConfig) -> float:
    """What yarn and longrope multiply cos and sin by (so attention scores by its square)."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.scaling_type == "yarn":
        if rope.mscale and rope.mscale_all_dim:
            return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(
                rope.factor, rope.mscale_all_dim
            )
        return _yarn_mscale(rope.factor)
    if rope.scaling_type == "longrope" and rope.factor > 1.0:
        return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    return 1.0


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


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaled(inv_freq: torch.Tensor, head_dim: int, rope: RopeConfig) -> torch.Tensor:
    # YaRN keeps the frequencies that rotate many times over the original context (they never
    # saw longer distances but need none), divides those that rotate less than once by `factor`,
    # and ramps linearly between the two dimension bounds.
    def dimension_of(rotations: float) -> float:
        context = rope.original_max_position_embeddings
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = dimension_of(rope.beta_fast), dimension_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


def _longrope_scaled(
    head_dim: int, rope: RopeConfig, factors: tuple[float, ...]
) -> torch.Tensor:
    if len(factors) != head_dim // 2:
        raise ValueError(
            f"longrope needs {head_dim // 2} factors per set, the config has {len(factors)}"
        )
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta ** _exponents(head_dim))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.scale = attention_factor(rope)
        self.register_buffer(
            "inv_freq", inverse_frequencies(head_dim, rope).to(device), persistent=False
        )
        long_inv_freq = (
            _longrope_scaled(head_dim, rope, rope.long_factor)
            if rope.scaling_type == "longrope"
            else None
        )
        self.register_buffer(
            "long_inv_freq",
            None if long_inv_freq is None else long_inv_freq.to(device),
            persistent=False,
        )

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin of every (position, frequency), [T, head_dim / 2]; once per
        forward, shared by every layer that uses this rotation."""
        angles = positions.float()[:, None] * self._frequencies(positions)
        if self.scale == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.scale, angles.sin() * self.scale

    def _frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """[1 or T, head_dim / 2]: the frequencies each position rotates by."""
        if self.long_inv_freq is not None:
            past_original = positions >= self.rope.original_max_position_embeddings
            return torch.where(past_original[:, None], self.long_inv_freq, self.inv_freq)
        if self.rope.scaling_type == "dynamic":
            return self._dynamic_frequencies(positions)
        return self.inv_freq[None, :]

    def _dynamic_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        # NTK-aware: the base grows with the length reached, once past the declared context.
        rope = self.rope
        seq_len = (positions.float() + 1).clamp(min=rope.max_position_embeddings)
        growth = rope.factor * seq_len / rope.max_position_embeddings - (rope.factor - 1)
        base = rope.theta * growth ** (self.head_dim / (self.head_dim - 2))
        exponents = _exponents(self.head_dim).to(positions.device)
        return 1.0 / (base[:, None] ** exponents[None, :])
