"""The Llama decoder, also the base of Mistral and Qwen2: our own implementation, paged attention.

Projections that read the same input are fused (q/k/v into one matmul, gate/up into another); the
checkpoint's separate matrices are concatenated at load time.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers.attention import AttentionBackend, AttentionMetadata, AttentionParams, LayerKVCache
from ..layers.embedding import Embedding
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.ops import Ops
from ..layers.rotary import RopeConfig, RotaryEmbedding
from ..weights import CheckpointWeights


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf_config(
        cls,
        hf_config: dict[str, Any],
        qkv_bias: bool | None = None,
        sliding_window: int | None = None,
    ) -> "LlamaConfig":
        """Reads a Hugging Face config.json; architectures built on Llama pass what differs."""
        activation = hf_config.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"unsupported hidden_act {activation!r}; only silu is implemented")
        num_heads = int(hf_config["num_attention_heads"])
        attention_bias = bool(hf_config.get("attention_bias", False))
        max_positions = int(hf_config.get("max_position_embeddings", 2048))
        if sliding_window is not None:
            # We attend over the full context; capping sequences at the window keeps that exact.
            max_positions = min(max_positions, sliding_window)
        return cls(
            model_type=str(hf_config["model_type"]),
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=int(hf_config["hidden_size"]),
            intermediate_size=int(hf_config["intermediate_size"]),
            num_layers=int(hf_config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
            head_dim=int(hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf_config(hf_config),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_proj_bias=attention_bias,
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,
        backend: AttentionBackend,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.ops = ops
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias, ops, dtype, device
        )
        self.o_proj = Linear(
            self.q_size, config.hidden_size, config.o_proj_bias, ops, dtype, device
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query_key, value = self.qkv_proj(hidden).split(
            [self.q_size + self.kv_size, self.kv_size], dim=-1
        )
        # Queries and keys rotate by the same angles: one rotation over both, in place.
        heads = query_key.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        self.ops.rotary_(heads, cos, sin)
        query, key = heads.split([self.num_heads, self.num_kv_heads], dim=1)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write(cache, key, value, metadata.slot_mapping)
        attended = self.backend.attend(
            query, key, value, cache, metadata, AttentionParams(scale=self.scale)
        )
        return self.o_proj(attended.view(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, config: LlamaConfig, ops: Ops, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, ops, dtype, device
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, config.mlp_bias, ops, dtype, device
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,
        backend: AttentionBackend,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.self_attn = LlamaAttention(config, backend, ops, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.mlp = LlamaMLP(config, ops, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it).

        The residual add is deferred into the next norm, which fuses the two; the first layer
        starts the stream from the embeddings.
        """
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, cache, metadata)
        hidden = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,
        backend: AttentionBackend,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, ops, dtype, device) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, ops, dtype, device)

    @classmethod
    def config_from_hf(cls, hf_config: dict[str, Any]) -> LlamaConfig:
        return LlamaConfig.from_hf_config(hf_config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: Sequence[LayerKVCache],
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [len(logits_rows), vocab], in the model's dtype, for the flat batch rows that
        sample a token (the sampler widens them to float32 where it computes on them).

        input_ids and positions are [T]; only the rows in `logits_rows` go through the LM head,
        which is the single largest matmul for small models.
        """
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions)
        residual = None
        for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, layer_cache, metadata)
        assert residual is not None, "a model has at least one layer"
        final = self.norm(hidden[logits_rows], residual[logits_rows])
        return self.lm_head(final)

    def prepack_for_cpu(self) -> None:
        """Packs every projection for its matmul once the weights are loaded."""
        tied = self.lm_head.weight is self.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack_for_cpu(release_weight=not (tied and module is self.lm_head))

    @torch.no_grad()
    def load_weights(self, weights: CheckpointWeights) -> None:
        config = self.config
        _copy(self.embed_tokens.weight, weights.get("embed_tokens.weight"), "embed_tokens.weight")
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}"
            attention, mlp = layer.self_attn, layer.mlp
            _copy_concatenated(
                attention.qkv_proj.weight,
                weights,
                [f"{prefix}.self_attn.{name}_proj.weight" for name in ("q", "k", "v")],
            )
            if config.qkv_bias:
                _copy_concatenated(
                    attention.qkv_proj.bias,
                    weights,
                    [f"{prefix}.self_attn.{name}_proj.bias" for name in ("q", "k", "v")],
                )
            _copy_named(attention.o_proj.weight, weights, f"{prefix}.self_attn.o_proj.weight")
            if config.o_proj_bias:
                _copy_named(attention.o_proj.bias, weights, f"{prefix}.self_attn.o_proj.bias")
            _copy_concatenated(
                mlp.gate_up_proj.weight,
                weights,
                [f"{prefix}.mlp.{name}_proj.weight" for name in ("gate", "up")],
            )
            _copy_named(mlp.down_proj.weight, weights, f"{prefix}.mlp.down_proj.weight")
            if config.mlp_bias:
                _copy_concatenated(
                    mlp.gate_up_proj.bias,
                    weights,
                    [f"{prefix}.mlp.{name}_proj.bias" for name in ("gate", "up")],
                )
                _copy_named(mlp.down_proj.bias, weights, f"{prefix}.mlp.down_proj.bias")
            _copy_named(layer.input_layernorm.weight, weights, f"{prefix}.input_layernorm.weight")
            _copy_named(
                layer.post_attention_layernorm.weight,
                weights,
                f"{prefix}.post_attention_layernorm.weight",
            )
        _copy_named(self.norm.weight, weights, "norm.weight")
        if weights.lm_head_is_tied(config.tie_word_embeddings):
            self.lm_head.weight = self.embed_tokens.weight
        else:
            _copy_named(self.lm_head.weight, weights, "lm_head.weight")


def _copy(parameter: torch.Tensor | None, tensor: torch.Tensor, name: str) -> None:
    assert parameter is not None, f"{name}: the model has no parameter for it"
    if parameter.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)}, "
            f"model expects {tuple(parameter.shape)}"
        )
    parameter.copy_(tensor)


def _copy_named(parameter: torch.Tensor | None, weights: CheckpointWeights, name: str) -> None:
    _copy(parameter, weights.get(name), name)


def _copy_concatenated(
    parameter: torch.Tensor | None, weights: CheckpointWeights, names: list[str]
) -> None:
    """Fills a fused parameter with the checkpoint's tensors stacked along the output dim."""
    _copy(parameter, torch.cat([weights.get(name) for name in names], dim=0), " + ".join(names))
