"""What the compiled CPU kernel's integer path computes (csrc/linear_quantized.cpp), for tests to
compare against: 4- and 8-bit integer codes multiply each row of x rounded to integers per run
of 32 features at a scale of the run's largest magnitude / 2047 (4-bit codes: 12 bits), or of 16
features / 32767 (8-bit codes: 16 bits); the offsets multiply x as it is."""

from dataclasses import replace

import torch
from sluice_server.quant import CodeFormat, QuantizedWeight

# A tiny random model's logits through the integer path move by up to about 3.5e-2 from the exact
# product's (the rounding above, through every layer: 4-bit codes' 12-bit activations dominate);
# the matmul itself is checked against the rounding exactly (`integer_path_product`), and the
# rounding's effect on a real model's projections is measured by
# benchmark/activation_rounding.py.
INTEGER_PATH_LOGITS_TOLERANCE = 5e-2


def takes_integer_path(weight: QuantizedWeight) -> bool:
    return weight.code_format is CodeFormat.INT8 or (
        weight.code_format is CodeFormat.UINT4 and weight.group_size % 32 == 0
    )


def rounded_activations(
    x: torch.Tensor, weight: QuantizedWeight, step: bool = False
) -> torch.Tensor:
    """x as the integer path multiplies it, float64 (or, with `step`, each feature's rounding
    step: its run's scale)."""
    run, largest = (32, 2047) if weight.bits == 4 else (16, 32767)
    runs = x.float().view(x.shape[0], -1, run)
    scale = runs.abs().amax(-1, keepdim=True) / largest
    if step:
        return scale.double().expand_as(runs).reshape(x.shape)
    rounded = torch.round(runs * torch.where(scale > 0, 1 / scale, 0))
    return (rounded.double() * scale.double()).reshape(x.shape)


def integer_path_product(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x @ W^T as the integer path computes it, in float64 (the kernel sums in float32)."""
    if weight.input_order is not None:
        x = x.index_select(-1, weight.input_order)
        weight = replace(weight, input_order=None)
    scaled = replace(weight, offsets=None).dequantize(torch.float64)
    product = rounded_activations(x, weight) @ scaled.T
    if weight.offsets is not None:
        offsets = weight.offsets.double().repeat_interleave(weight.group_size, dim=1)
        product += x.double() @ offsets.T
    return product
