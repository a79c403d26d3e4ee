"""Qwen2-MoE and Qwen3-MoE: Qwen2's / Qwen3's decoder with a sparse mixture of experts in every
`decoder_sparse_step`-th layer not listed in `mlp_only_layers` (the others keep a dense MLP).
Qwen2-MoE adds a shared expert that every token runs, gated by a sigmoid."""

from typing import Any

from ..layers.moe import MoEConfig, SparseMoE
from ..layers.runtime import LayerRuntime
from .decoder import CausalLM, FeedForward
from .hf_config import activation
from .llama import build_pre_norm_model, dense_mlp
from .qwen2 import qwen_windows


def _feed_forwards(hf_config: dict[str, Any], runtime: LayerRuntime, moe: MoEConfig):
    dense_layers = set(hf_config.get("mlp_only_layers") or ())
    sparse_step = int(hf_config.get("decoder_sparse_step", 1))

    def feed_forward(layer: int) -> tuple[FeedForward, str]:
        if layer in dense_layers or moe.num_experts == 0 or (layer + 1) % sparse_step != 0:
            return dense_mlp(hf_config, runtime), "mlp"
        return SparseMoE(moe, runtime), "mlp"

    return feed_forward


def _moe_config(hf_config: dict[str, Any], shared_expert: bool) -> MoEConfig:
    return MoEConfig(
        hidden_size=int(hf_config["hidden_size"]),
        # Hub configs say num_experts; transformers v5 writes num_local_experts.
        num_experts=int(hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0),
        experts_per_token=int(hf_config["num_experts_per_tok"]),
        expert_intermediate_size=int(hf_config["moe_intermediate_size"]),
        activation=activation(hf_config),
        renormalize=bool(hf_config.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=(
            int(hf_config["shared_expert_intermediate_size"]) if shared_expert else None
        ),
    )


def build_qwen2_moe(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    moe = _moe_config(hf_config, shared_expert=True)
    return build_pre_norm_model(
        hf_config,
        runtime,
        qwen_windows(hf_config),
        qkv_bias=bool(hf_config.get("qkv_bias", True)),
        feed_forward=_feed_forwards(hf_config, runtime, moe),
    )


def build_qwen3_moe(hf_config: dict[str, Any], runtime: LayerRuntime) -> CausalLM:
    moe = _moe_config(hf_config, shared_expert=False)
    return build_pre_norm_model(
        hf_config,
        runtime,
        qwen_windows(hf_config),
        qk_norm=True,
        feed_forward=_feed_forwards(hf_config, runtime, moe),
    )
