"""The gated feed-forward block of modern decoders: down(act(gate(x)) * up(x)).

gate and up read the same input, so they run as one fused projection; checkpoints that store them
apart are concatenated at load, those that store them fused (Phi-3's `gate_up_proj`) load as is.
Across tensor-parallel ranks each holds a share of the intermediate features: gate/up are
column-parallel, down row-parallel.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..weights import CheckpointWeights
from .linear import ColumnParallelLinear, RowParallelLinear
from .ops import Ops
from .runtime import LayerRuntime

# config.json's activation name -> the ops' fused activation-and-multiply.
ACTIVATIONS: dict[str, Callable[[Ops], Callable[[torch.Tensor], torch.Tensor]]] = {
    "silu": lambda ops: ops.silu_and_mul,
    "swish": lambda ops: ops.silu_and_mul,
    "gelu_pytorch_tanh": lambda ops: ops.gelu_tanh_and_mul,
    "gelu_new": lambda ops: ops.gelu_tanh_and_mul,
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return name


@dataclass(frozen=True)
class GatedMLPNames:
    """The checkpoint's names for the three projections (Mixtral's experts say w1, w3, w2)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    fused_gate_up: str = "gate_up_proj"


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        bias: bool,
        runtime: LayerRuntime,
        names: GatedMLPNames = GatedMLPNames(),
        reduce: bool = True,
    ) -> None:
        """`reduce=False` leaves the ranks' partial outputs for the caller to sum (a mixture of
        experts sums all its experts' at once)."""
        super().__init__()
        self.names = names
        self.activation_name = check_activation(activation)
        self.activation = ACTIVATIONS[self.activation_name](runtime.ops)
        intermediate = runtime.shards.even(intermediate_size, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate, intermediate], bias, runtime
        )
        self.down_proj = RowParallelLinear(intermediate, hidden_size, bias, runtime, reduce)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_up_proj(hidden)))

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        names = self.names
        fused = f"{prefix}.{names.fused_gate_up}"
        if f"{fused}.weight" in weights:
            self.gate_up_proj.load(weights, [fused])
        else:
            self.gate_up_proj.load(weights, [f"{prefix}.{names.gate}", f"{prefix}.{names.up}"])
        self.down_proj.load(weights, [f"{prefix}.{names.down}"])
