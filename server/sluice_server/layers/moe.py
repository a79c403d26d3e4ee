"""A sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert per token; each token runs through its top-k experts and sums their
outputs weighted by the router's probabilities. Dispatch is grouped: the (token, expert) pairs are
sorted by expert so that each expert runs once per step on all of its tokens, as one matmul per
projection, instead of once per token. Across tensor-parallel ranks every expert is split like a
dense MLP, and the block sums its experts' partial outputs across ranks once.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..weights import CheckpointWeights
from .linear import ReplicatedLinear
from .mlp import GatedMLP, GatedMLPNames
from .runtime import LayerRuntime


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    activation: str
    # Whether the top-k probabilities are rescaled to sum to 1 (Mixtral always, Qwen's
    # `norm_topk_prob`).
    renormalize: bool
    # Qwen2-MoE adds a dense expert every token runs, scaled by sigmoid(its own gate).
    shared_expert_intermediate_size: int | None = None
    expert_names: GatedMLPNames = GatedMLPNames()


class SparseMoE(nn.Module):
    def __init__(self, config: MoEConfig, runtime: LayerRuntime) -> None:
        super().__init__()
        self.config = config
        self.shards = runtime.shards
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, False, runtime)
        self.experts = nn.ModuleList(
            GatedMLP(
                config.hidden_size,
                config.expert_intermediate_size,
                config.activation,
                False,
                runtime,
                config.expert_names,
                reduce=False,
            )
            for _ in range(config.num_experts)
        )
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if config.shared_expert_intermediate_size is not None:
            self.shared_expert = GatedMLP(
                config.hidden_size,
                config.shared_expert_intermediate_size,
                config.activation,
                False,
                runtime,
                reduce=False,
            )
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, False, runtime)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        config = self.config
        probabilities = torch.softmax(self.gate(hidden).float(), dim=-1)
        weights, experts = probabilities.topk(config.experts_per_token, dim=-1)
        if config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.flatten()

        # Pair p is token p // k's choice p % k; sorted by expert, each expert's pairs are a run.
        pairs = experts.flatten().argsort(stable=True)
        counts = torch.bincount(experts.flatten(), minlength=config.num_experts).tolist()
        output = torch.zeros_like(hidden)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count == 0:
                continue
            expert_pairs = pairs[start : start + count]
            tokens = expert_pairs // config.experts_per_token
            # Weighted in float32, then rounded once, as transformers does.
            expert_output = expert(hidden[tokens]) * weights[expert_pairs, None]
            output.index_add_(0, tokens, expert_output.to(hidden.dtype))
            start += count

        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared_scale = torch.sigmoid(self.shared_expert_gate(hidden))
            output += shared_scale * self.shared_expert(hidden)
        return self.shards.all_reduce_(output)

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        self.gate.load(weights, [f"{prefix}.gate"])
        for index, expert in enumerate(self.experts):
            expert.load(weights, f"{prefix}.experts.{index}")
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            self.shared_expert.load(weights, f"{prefix}.shared_expert")
            self.shared_expert_gate.load(weights, [f"{prefix}.shared_expert_gate"])
