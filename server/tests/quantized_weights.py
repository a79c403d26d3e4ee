"""Random quantized weights for the kernels' tests: every code format, groupings from half a code
block to several blocks, with and without offsets."""

import torch
from sluice_server.quant import CodeFormat, QuantizedWeight, pack_4bit

# Each code format with and without offsets, groups of half a block to several blocks.
GROUPINGS = [
    (CodeFormat.UINT4, 32, True),
    (CodeFormat.UINT4, 128, True),
    (CodeFormat.UINT4, 64, False),
    (CodeFormat.UINT4, 16, True),
    (CodeFormat.INT8, 16, False),
    (CodeFormat.INT8, 32, False),
    (CodeFormat.INT8, 128, True),
    (CodeFormat.FLOAT8_E4M3, 256, False),
    (CodeFormat.FLOAT8_E4M3, 64, False),
    (CodeFormat.LEVELS4, 64, False),
    (CodeFormat.LEVELS4, 32, True),
]


def random_weight(
    rows: int, in_features: int, code_format: CodeFormat, group_size: int, offsets: bool
) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(rows * in_features + code_format + group_size)
    shape = (rows, in_features)
    if code_format.bits == 4:
        codes = pack_4bit(torch.randint(0, 16, shape, generator=generator))
    elif code_format is CodeFormat.INT8:
        codes = torch.randint(-128, 128, shape, generator=generator).to(torch.int8)
    else:
        # Every FP8 e4m3 byte but the two NaNs (0x7f, 0xff): subnormals, zeros, both signs.
        codes = torch.randint(0, 127, shape, generator=generator).to(torch.uint8)
        codes |= torch.randint(0, 2, shape, generator=generator).to(torch.uint8) << 7
    levels = None
    if code_format is CodeFormat.LEVELS4:
        levels = torch.randn(16, generator=generator).sort().values
    groups = in_features // group_size
    return QuantizedWeight(
        codes=codes,
        scales=torch.rand(rows, groups, generator=generator) / 8,
        offsets=torch.randn(rows, groups, generator=generator) / 4 if offsets else None,
        code_format=code_format,
        group_size=group_size,
        levels=levels,
    )
