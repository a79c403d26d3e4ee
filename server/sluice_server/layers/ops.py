"""The elementwise work between a decoder layer's matmuls, the matmuls where Sluice has its own,
and the sampler's greedy pick, behind one interface.

`Ops` is the plain PyTorch version, which runs on any device and is the reference.
`CompiledCpuOps` runs the same operations as single fused passes from Sluice's C++ kernels
(sluice_server.kernels): on CPU, PyTorch spends most of these operators' time on dispatch,
dtype round trips and temporaries rather than on the arithmetic. It also has a bfloat16 matmul
for CPUs with AVX512-BF16, faster than oneDNN's at every row count a step has.
"""

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedLinear:
    """A projection's weight in the layout of `Ops.packed_linear`, packed once at load time."""

    weight: torch.Tensor
    # float32, padded like the weight's output columns; None without a bias.
    bias: torch.Tensor | None
    out_features: int


class Ops:
    def pack_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
        """`weight` [out, in] packed for `packed_linear`, or None where these ops have no matmul
        of their own for it (the layer then uses PyTorch's)."""
        return None

    def packed_linear(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        raise NotImplementedError("these ops pack no weights")

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

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of logits [S, vocab]: the most likely token and its float32 log-probability,
        logit - logsumexp(row), without materialising a [S, vocab] log-softmax."""
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)
        logprobs = logits.gather(1, token_ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return token_ids, logprobs


class CompiledCpuOps(Ops):
    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels

    def pack_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
        if not (
            self.kernels.has_linear_bf16()
            and weight.dtype == torch.bfloat16
            and weight.shape[1] % 2 == 0
        ):
            return None
        packed = self.kernels.pack_linear_bf16(weight)
        padded_bias = None
        if bias is not None:
            padded_bias = torch.zeros(packed.shape[0] * packed.shape[2], dtype=torch.float32)
            padded_bias[: bias.shape[0]] = bias.float()
        return PackedLinear(packed, padded_bias, weight.shape[0])

    def packed_linear(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        return self.kernels.linear_bf16(x, packed.weight, packed.bias, packed.out_features)

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
