"""AWQ and GPTQ checkpoints made from an unquantized one by round-to-nearest quantization, for the
tests (and `python server/tests/packed_checkpoints.py METHOD SRC OUT` for the end-to-end tests
and benchmarks).

The packing follows the layouts AutoAWQ (`WQLinear_GEMM`) and AutoGPTQ/GPTQModel
(`QuantLinear.pack`) document. Those libraries build CUDA extensions and do not install on a
machine without a GPU toolkit, so their packing code cannot run in the tests; the tests instead
check Sluice's reader against the dequantization formulas they publish (`reference_weight`).
"""

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# AutoAWQ's order of the 8 output features within an int32 word, lowest 4 bits first.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class RoundedWeight:
    """W[n, k] ~= scales[g, n] * (codes[n, k] - zeros[g, n]) for g = g_idx[k]."""

    codes: torch.Tensor  # int64 [N, K], 0..2^bits - 1
    scales: torch.Tensor  # float16 [G, N]
    zeros: torch.Tensor  # int64 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int


def act_order_groups(in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """A g_idx as act-order leaves it: groups of features in a shuffled order."""
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g_idx


def round_to_nearest(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    g_idx: torch.Tensor | None = None,
) -> RoundedWeight:
    """Each group's range in 2^bits steps (symmetric: around a zero point of 2^(bits-1))."""
    out_features, in_features = weight.shape
    if g_idx is None:
        g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    order = torch.argsort(g_idx.long(), stable=True)
    grouped = weight.float()[:, order].view(out_features, -1, group_size)  # [N, G, group]
    top = (1 << bits) - 1
    if symmetric:
        magnitude = grouped.abs().amax(dim=-1).clamp(min=1e-5)
        scales = (2 * magnitude / top).half()
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int64)
    else:
        low = grouped.amin(dim=-1).clamp(max=0)
        high = grouped.amax(dim=-1).clamp(min=0)
        scales = ((high - low).clamp(min=1e-5) / top).half()
        zeros = torch.round(-low / scales.float()).clamp(0, top).to(torch.int64)
    rounded = torch.round(grouped / scales.float()[..., None]) + zeros[..., None]
    codes = torch.empty(out_features, in_features, dtype=torch.int64)
    codes[:, order] = rounded.clamp(0, top).to(torch.int64).view(out_features, in_features)
    return RoundedWeight(codes, scales.t().contiguous(), zeros.t().contiguous(), g_idx, bits)


def pack_int32(values: torch.Tensor, bits: int, along_rows: bool) -> torch.Tensor:
    """Values [R, C] into int32 words of 32 / bits values each, lowest bits first, taken from
    consecutive rows ([R * bits / 32, C]) or consecutive columns ([R, C * bits / 32])."""
    per_word = 32 // bits
    values = values.to(torch.int64)
    if along_rows:
        values = values.t()
    rows, columns = values.shape
    fields = values.view(rows, columns // per_word, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (fields << shifts).sum(dim=-1)
    # Two's complement: a word with its top bit set is a negative int32.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.t().contiguous() if along_rows else words


def pack_awq(rounded: RoundedWeight) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout (4 bits, consecutive groups): qweight [K, N / 8], qzeros
    [K / G, N / 8], both packed along the output features in AWQ's field order."""

    def along_outputs(values: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0]
        reordered = values.view(rows, -1, 8)[..., list(AWQ_PACK_ORDER)].reshape(rows, -1)
        return pack_int32(reordered, 4, along_rows=False)

    return {
        "qweight": along_outputs(rounded.codes.t()),
        "qzeros": along_outputs(rounded.zeros),
        "scales": rounded.scales,
    }


def pack_gptq(rounded: RoundedWeight, zeros_minus_one: bool) -> dict[str, torch.Tensor]:
    """GPTQ's layout: qweight [K * bits / 32, N] packed along the inputs, qzeros
    [K / G, N * bits / 32] along the outputs, stored minus one in the original format."""
    zeros = rounded.zeros - 1 if zeros_minus_one else rounded.zeros
    return {
        "qweight": pack_int32(rounded.codes.t(), rounded.bits, along_rows=True),
        "qzeros": pack_int32(zeros & ((1 << rounded.bits) - 1), rounded.bits, along_rows=False),
        "scales": rounded.scales,
        "g_idx": rounded.g_idx,
    }


def reference_weight(
    method: str, tensors: dict[str, torch.Tensor], bits: int, zeros_minus_one: bool = False
) -> torch.Tensor:
    """The float32 weight [N, K] by the published dequantization: AutoAWQ's `dequantize_gemm`
    (fields unshifted, then put back in output order with AWQ's reverse order) and AutoGPTQ's
    torch path (codes unshifted along the inputs, zeros along the outputs plus one in the
    original format, scales and zeros gathered by g_idx)."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    scales = tensors["scales"].float()
    if method == "awq":
        reverse_order = [0, 4, 1, 5, 2, 6, 3, 7]

        def unpack(words: torch.Tensor) -> torch.Tensor:
            fields = (words[:, :, None] >> shifts) & mask
            return fields[:, :, reverse_order].reshape(words.shape[0], -1)

        codes, zeros = unpack(tensors["qweight"]), unpack(tensors["qzeros"])
        group_size = codes.shape[0] // scales.shape[0]
        expanded_zeros = zeros.repeat_interleave(group_size, dim=0)
        expanded_scales = scales.repeat_interleave(group_size, dim=0)
        return ((codes - expanded_zeros) * expanded_scales).t()
    qweight, qzeros, g_idx = tensors["qweight"], tensors["qzeros"], tensors["g_idx"].long()
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])
    zeros = ((qzeros[:, :, None] >> shifts) & mask).reshape(qzeros.shape[0], -1)
    if zeros_minus_one:
        zeros = zeros + 1
    return ((codes - zeros[g_idx]) * scales[g_idx]).t()


def quantize_checkpoint(
    source: Path,
    out: Path,
    method: str,
    bits: int = 4,
    group_size: int = 32,
    act_order: bool = False,
    zeros_minus_one: bool = True,
) -> None:
    """Writes `source`'s model to `out` with its decoder projections quantized by `method`
    (awq: asymmetric 4-bit; gptq: symmetric, optionally in act-order), in one safetensors file
    with the matching `quantization_config` in config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        projection = name.removesuffix(".weight")
        if not (name.endswith(".weight") and projection.rsplit(".", 1)[-1] in PROJECTIONS):
            packed[name] = tensor.contiguous()
            continue
        in_features = tensor.shape[1]
        # Projections of the same input (q/k/v, gate/up) share act-order's order, which ranks
        # features by their input's statistics.
        g_idx = act_order_groups(in_features, group_size, in_features) if act_order else None
        rounded = round_to_nearest(tensor, bits, group_size, method == "gptq", g_idx)
        parts = pack_awq(rounded) if method == "awq" else pack_gptq(rounded, zeros_minus_one)
        packed.update({f"{projection}.{suffix}": t for suffix, t in parts.items()})
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
            shutil.copy(file, out / file.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        method, bits, group_size, act_order, zeros_minus_one
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))


def quantization_config(
    method: str, bits: int, group_size: int, act_order: bool, zeros_minus_one: bool
) -> dict[str, object]:
    """The `quantization_config` transformers writes for such a checkpoint."""
    if method == "awq":
        return {
            "quant_method": "awq",
            "bits": bits,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": True,
        "checkpoint_format": "gptq" if zeros_minus_one else "gptq_v2",
    }


def dequantized_state_dict(packed_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint written by `quantize_checkpoint` with every projection dequantized by the
    reference (`reference_weight`), in float32."""
    config = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    method, bits = config["quant_method"], config["bits"]
    zeros_minus_one = config.get("checkpoint_format") == "gptq"
    tensors = load_file(packed_dir / "model.safetensors")
    state = {}
    for name, tensor in tensors.items():
        projection, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            parts = {
                key: tensors[f"{projection}.{key}"]
                for key in ("qweight", "qzeros", "scales", "g_idx")
                if f"{projection}.{key}" in tensors
            }
            weight = reference_weight(method, parts, bits, zeros_minus_one)
            state[f"{projection}.weight"] = weight.contiguous()
        elif suffix not in ("qzeros", "scales", "g_idx"):
            state[name] = tensor.float()
    return state


def dequantize_checkpoint(packed_dir: Path, out: Path) -> None:
    """Writes the unquantized model `packed_dir` holds (for transformers to run)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(dequantized_state_dict(packed_dir), out / "model.safetensors", {"format": "pt"})
    for file in packed_dir.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
            shutil.copy(file, out / file.name)
    config = json.loads((packed_dir / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for method in ("awq", "gptq"):
        quantize = commands.add_parser(method, help=f"write SOURCE quantized with {method}")
        quantize.add_argument("source", type=Path)
        quantize.add_argument("out", type=Path)
        quantize.add_argument("--bits", type=int, default=4)
        quantize.add_argument("--group-size", type=int, default=32)
        quantize.add_argument("--act-order", action="store_true")
    dequantize = commands.add_parser("dequantize", help="write a quantized checkpoint unquantized")
    dequantize.add_argument("source", type=Path)
    dequantize.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "dequantize":
        dequantize_checkpoint(args.source, args.out)
    else:
        quantize_checkpoint(
            args.source, args.out, args.command, args.bits, args.group_size, args.act_order
        )


if __name__ == "__main__":
    main()
