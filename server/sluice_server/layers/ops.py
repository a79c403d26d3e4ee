"""The elementwise work between a decoder layer's matmuls, the projections' matmul on CPU, and
the sampler's passes over the vocabulary (the greedy pick, the top-k/top-p and typical-p cuts,
the draw), behind one interface.

`Ops` is the plain PyTorch version, which runs on any device and is the reference.
`CompiledCpuOps` runs the same operations as single fused passes from Sluice's C++ kernels
(sluice_server.kernels): on CPU, PyTorch spends most of these operators' time on dispatch,
dtype round trips and temporaries rather than on the arithmetic. `CudaOps` is the reference on a
GPU but for the quantized projections, which it multiplies with GPU kernels
(kernels/triton_quantized.py) instead of dequantizing the weight on every call.

The projections' weights are packed once at load time (`pack_linear`) for the fastest matmul the
CPU has: Sluice's own bfloat16 matmul on CPUs with AVX512-BF16 and on AVX2 CPUs without AVX-512
(`CpuFeatures.sluice_bf16_matmul`), and its float32 matmul on every CPU with AVX2
(`CpuFeatures.sluice_f32_matmul`); compiled ops only, each faster than oneDNN's at the row counts
of decoding and no slower on prompt chunks. Else oneDNN's blocked layout where oneDNN supports the
dtype here. A weight left unpacked runs through `F.linear`, which repacks it on every call
(bfloat16 without the compiled kernels on CPUs that oneDNN has no bfloat16 for).
"""

from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..quant import QuantizedWeight
from ..sampling import vocabulary

if TYPE_CHECKING:
    from ..kernels.cpu_features import CpuFeatures


# Output columns per tile of Sluice's packed weights (linear.cpp's kLinearColumns): the bias is
# padded to whole tiles.
PACKED_TILE_COLUMNS = 32


class LinearMatmul(Enum):
    """The matmul a packed weight is laid out for."""

    ONEDNN = "oneDNN"
    SLUICE_BF16 = "Sluice's bfloat16 matmul"
    SLUICE_F32 = "Sluice's float32 matmul"


@dataclass(frozen=True)
class PackedLinear:
    """A projection's weight in the layout of `matmul`, packed once at load time."""

    matmul: LinearMatmul
    weight: torch.Tensor
    # SLUICE_*: float32, padded like the weight's output columns. ONEDNN: the checkpoint's.
    # None without a bias.
    bias: torch.Tensor | None
    out_features: int


class Ops:
    def __init__(self, cpu: "CpuFeatures") -> None:
        self.cpu = cpu

    def pack_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
        """A CPU `weight` [out, in] packed for `packed_linear`: oneDNN's layout where oneDNN has
        the dtype on this CPU, else None (the layer then calls F.linear on the weight as is)."""
        if weight.device.type != "cpu" or not self._onednn_packs(weight.dtype):
            return None
        # The row count oneDNN tunes the layout for: a decode batch.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        return PackedLinear(LinearMatmul.ONEDNN, packed, bias, weight.shape[0])

    def _onednn_packs(self, dtype: torch.dtype) -> bool:
        if not torch.backends.mkldnn.is_available():
            return False
        return (
            dtype == torch.float32
            or (dtype == torch.bfloat16 and self.cpu.onednn_bf16)
            or (dtype == torch.float16 and self.cpu.onednn_fp16)
        )

    def packed_linear(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        if packed.matmul is not LinearMatmul.ONEDNN:
            raise ValueError(f"these ops cannot run a weight packed for {packed.matmul.value}")
        return torch.ops.mkldnn._linear_pointwise(x, packed.weight, packed.bias, "none", [], "")

    def prepare_quantized(
        self, weight: QuantizedWeight, activations: torch.dtype
    ) -> QuantizedWeight:
        """`weight` as `quantized_linear` reads it fastest for inputs of dtype `activations`, once
        at load: here as it is; the compiled ops regroup codes into tile order where their CPU
        path reads them so (AMX's tiles; AVX512-BF16's dot products of 4-bit and FP8 codes with
        bfloat16 inputs)."""
        return weight

    def quantized_linear(
        self,
        x: torch.Tensor,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x W^T + b for a quantized W: here by dequantizing W on every call, which is correct
        on any device but slow; the compiled ops multiply by the codes directly, and the rows in
        `prompt_rows` (a prompt's tokens) by W dequantized to bfloat16 (linear_quantized.cpp)."""
        return F.linear(x, weight.dequantize(x.dtype), bias)

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(hidden, (hidden.shape[-1],), weight, eps)

    def add_rms_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Adds `hidden` into `residual` in place and returns the normalised sum."""
        residual.add_(hidden)
        return self.rms_norm(residual, weight, eps)

    def rotary_(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates heads [T, num_heads, head_dim] in place by float32 angles cos/sin [T, D/2].

        "Rotate half" layout: dimensions i and i + D/2 form a rotated pair.
        """
        first, second = heads.chunk(2, dim=-1)
        cos = cos.to(heads.dtype)[:, None, :]
        sin = sin.to(heads.dtype)[:, None, :]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        heads.copy_(rotated)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's activation: silu(gate) * up for gate_up = [gate | up] along the last dim."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """GeGLU's activation (Gemma): gelu(gate), tanh approximation, times up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of logits [S, vocab]: the most likely token and its float32 log-probability,
        logit - logsumexp(row), without materialising a [S, vocab] log-softmax."""
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)
        logprobs = logits.gather(1, token_ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return token_ids, logprobs

    def top_k_top_p_(self, logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
        vocabulary.top_k_top_p_(logits, top_k, top_p)

    def min_p_(self, logits: torch.Tensor, min_p: torch.Tensor) -> None:
        vocabulary.min_p_(logits, min_p)

    def typical_p_(self, logits: torch.Tensor, typical_p: torch.Tensor) -> None:
        vocabulary.typical_p_(logits, typical_p)

    def draw(
        self, logits: torch.Tensor, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return vocabulary.draw(logits, uniforms)


class CompiledCpuOps(Ops):
    def __init__(self, kernels: ModuleType, cpu: "CpuFeatures") -> None:
        super().__init__(cpu)
        self.kernels = kernels

    def pack_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
        matmul = self._own_matmul(weight)
        if matmul is None:
            return super().pack_linear(weight, bias)
        if matmul is LinearMatmul.SLUICE_BF16:
            packed = self.kernels.pack_linear_bf16(weight)
        else:
            packed = self.kernels.pack_linear_f32(weight)
        padded_bias = None
        if bias is not None:
            padded_bias = torch.zeros(packed.shape[0] * PACKED_TILE_COLUMNS, dtype=torch.float32)
            padded_bias[: bias.shape[0]] = bias.float()
        return PackedLinear(matmul, packed, padded_bias, weight.shape[0])

    def _own_matmul(self, weight: torch.Tensor) -> LinearMatmul | None:
        """Sluice's matmul for `weight`, or None where it has none. The build has the bfloat16
        one where it was compiled with AVX512-BF16 or AVX2, the float32 one with AVX2;
        the CPU checks keep a caller's narrower CpuFeatures (as tests give) in charge."""
        if weight.device.type != "cpu" or weight.shape[1] % 2 != 0:
            return None
        if weight.dtype == torch.bfloat16:
            own = self.cpu.sluice_bf16_matmul and self.kernels.has_linear_bf16()
            return LinearMatmul.SLUICE_BF16 if own else None
        if weight.dtype == torch.float32:
            # Kernels of revisions before the float32 matmul, which benchmarks' --against
            # builds, lack has_linear_f32.
            has_linear_f32 = getattr(self.kernels, "has_linear_f32", lambda: False)
            own = self.cpu.sluice_f32_matmul and has_linear_f32()
            return LinearMatmul.SLUICE_F32 if own else None
        return None

    def packed_linear(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        if packed.matmul is LinearMatmul.SLUICE_BF16:
            return self.kernels.linear_bf16(x, packed.weight, packed.bias, packed.out_features)
        if packed.matmul is LinearMatmul.SLUICE_F32:
            return self.kernels.linear_f32(x, packed.weight, packed.bias, packed.out_features)
        return super().packed_linear(x, packed)

    def prepare_quantized(
        self, weight: QuantizedWeight, activations: torch.dtype
    ) -> QuantizedWeight:
        if weight.codes.device.type != "cpu" or weight.tile_order:
            return weight
        tiles = self.kernels.tile_order_codes(
            weight.codes, int(weight.code_format), weight.group_size, activations == torch.bfloat16
        )
        return weight if tiles is None else weight.with_tile_order(tiles)

    def quantized_linear(
        self,
        x: torch.Tensor,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().quantized_linear(x, weight, bias)
        if weight.input_order is not None:
            x = x.index_select(-1, weight.input_order)
        # Passed only when given: the kernels of revisions before prompt rows, which
        # benchmark/quantized_kernel.py --against builds, do not take it.
        prompt = {} if prompt_rows is None else {"prompt_rows": prompt_rows}
        if weight.tile_order:
            prompt["tile_order"] = True
        return self.kernels.linear_quantized(
            x,
            weight.codes,
            weight.scales,
            weight.offsets,
            bias,
            int(weight.code_format),
            weight.group_size,
            weight.levels,
            **prompt,
        )

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(hidden, weight, eps)

    def add_rms_norm(
        self, hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return self.kernels.add_rms_norm(hidden, residual, weight, eps)

    def rotary_(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.kernels.rotary_(heads, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(gate_up)

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.argmax_logprob(logits)

    def top_k_top_p_(self, logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
        self.kernels.top_k_top_p_(logits, top_k, top_p)

    def min_p_(self, logits: torch.Tensor, min_p: torch.Tensor) -> None:
        self.kernels.min_p_(logits, min_p)

    def typical_p_(self, logits: torch.Tensor, typical_p: torch.Tensor) -> None:
        self.kernels.typical_p_(logits, typical_p)

    def draw(
        self, logits: torch.Tensor, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.draw(logits, uniforms)


class CudaOps(Ops):
    def __init__(self, cpu: "CpuFeatures") -> None:
        super().__init__(cpu)
        # Imported here: Triton is needed, and present, only where a GPU is.
        from ..kernels import triton_quantized

        self.triton_quantized = triton_quantized

    def quantized_linear(
        self,
        x: torch.Tensor,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.device.type != "cuda":
            return super().quantized_linear(x, weight, bias)
        if self.triton_quantized.takes_scaled_mm(x, weight):
            return self.triton_quantized.scaled_mm_fp8(x, weight, bias)
        return self.triton_quantized.quantized_matmul(x, weight, bias)
