"""Mixtral: Mistral's decoder with a sparse mixture of experts (top-k of `num_local_experts`,
probabilities renormalised over the chosen ones) in place of the MLP."""

from typing import Any

from ..layers.mlp import GatedMLPNames
from ..layers.moe import MoEConfig, SparseMoE
from ..layers.runtime import LayerRuntime
from .decoder import CausalLM, FeedForward
from .hf_config import activation, sliding_windows
from .llama import build_pre_norm_model

EXPERT_NAMES = GatedMLPNames(gate="w1", up="w3", down="w2")


def build_mixtral(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    moe = MoEConfig(
        hidden_size=int(hf_config["hidden_size"]),
        num_experts=int(hf_config["num_local_experts"]),
        experts_per_token=int(hf_config["num_experts_per_tok"]),
        expert_intermediate_size=int(hf_config["intermediate_size"]),
        activation=activation(hf_config),
        renormalize=True,
        expert_names=EXPERT_NAMES,
    )

    def feed_forward(_layer: int) -> tuple[FeedForward, str]:
        return SparseMoE(moe, runtime), "block_sparse_moe"

    windows = sliding_windows(hf_config, lambda _: True)
    return build_pre_norm_model(hf_config, runtime, windows, feed_forward=feed_forward)
