"""FP8 (e4m3) weights, from checkpoints and quantized at load (`--quantize fp8`).

A checkpoint's FP8 projection `X` holds its codes in `X.weight` (float8_e4m3fn [N, K]) and its
scale, W = float(code) * scale, in `X.weight_scale`:

- per tensor: one value ([] or [1]);
- per output feature: [N] or [N, 1];
- per group of G input features: [N, K / G];
- per block of Bn x Bk (compressed-tensors' block strategy): [ceil(N / Bn), ceil(K / Bk)];

or, per block, in `X.weight_scale_inv` (transformers' fine-grained FP8 and DeepSeek's; a
multiplier despite its name). Plain FP8 (`quant_method: fp8`) and compressed-tensors'
float-quantized configurations store them so.

Activation scales (`X.input_scale`) serve GPUs that multiply in FP8. On CPU the activations stay
in the model's dtype (weights only are FP8), so those scales go unused.
"""

import torch

from .weight import CODE_BLOCK, CodeFormat, QuantizedWeight

# The largest finite e4m3 value: quantizing at load maps each output feature's largest weight
# to it.
FLOAT8_MAX = 448.0


def read_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> QuantizedWeight:
    """A checkpoint's FP8 projection; `block` is its configuration's block size (Bn, Bk)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 weights must be float8_e4m3fn, not {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight of shape {tuple(weight.shape)} is not a matrix")
    out_features, in_features = weight.shape
    scales, group_size = _groups(scale.float(), out_features, in_features, block)
    if group_size % CODE_BLOCK or in_features % group_size:
        raise ValueError(
            f"FP8 scales per {group_size} input features are not supported (Sluice reads "
            f"groups of a multiple of {CODE_BLOCK} that divide the {in_features} features)"
        )
    return QuantizedWeight(
        codes=weight.contiguous().view(torch.uint8),
        scales=scales.contiguous(),
        offsets=None,
        code_format=CodeFormat.FLOAT8_E4M3,
        group_size=group_size,
    )


def _groups(
    scale: torch.Tensor, out_features: int, in_features: int, block: tuple[int, int] | None
) -> tuple[torch.Tensor, int]:
    """The scale as [N, groups] and the group size."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(out_features, 1), in_features
    if tuple(scale.shape) in ((out_features,), (out_features, 1)):
        return scale.reshape(out_features, 1), in_features
    if scale.dim() == 2 and block is not None:
        block_rows, block_columns = block
        expected = (-(-out_features // block_rows), -(-in_features // block_columns))
        if tuple(scale.shape) == expected:
            return scale.repeat_interleave(block_rows, dim=0)[:out_features], block_columns
    if scale.dim() == 2 and scale.shape[0] == out_features and in_features % scale.shape[1] == 0:
        return scale, in_features // scale.shape[1]
    raise ValueError(
        f"FP8 scale of shape {tuple(scale.shape)} does not fit a [{out_features}, {in_features}] "
        f"weight per tensor, output feature, group or block (block size {block})"
    )


def quantize_fp8(weight: torch.Tensor) -> QuantizedWeight:
    """`weight` [N, K] as e4m3 codes scaled per output feature (each row's largest magnitude
    becomes 448), as vLLM and TGI quantize at load."""
    rows = weight.float()
    scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX
    codes = (rows / scales).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return read_fp8(codes, scales, block=None)
