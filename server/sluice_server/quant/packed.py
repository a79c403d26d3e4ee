"""Integers packed into int32 words, as AWQ and GPTQ checkpoints store codes and zero points."""

import torch


def unpack_int32(words: torch.Tensor, bits: int, along_rows: bool) -> torch.Tensor:
    """Each int32 of `words` [R, C] as its 32 / bits values, lowest bits first, laid out along
    the rows ([R * 32 / bits, C]) or the columns ([R, C * 32 / bits]); int32 values
    0..2^bits - 1."""
    rows, columns = words.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    values = (words.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # [R, C, per word]
    if along_rows:
        return values.permute(0, 2, 1).reshape(-1, columns)
    return values.reshape(rows, -1)
