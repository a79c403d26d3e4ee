"""The decoder-only causal LM every architecture is built from: embeddings, a stack of decoder
layers, a final norm and the LM head. Architectures differ in which layers they stack (see
`PreNormLayer`, `SandwichNormLayer`) and how those are configured; each architecture module only
reads its config.json into these parts.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..layers.attention import AttentionMetadata, LayerKVCache
from ..layers.embedding import Embedding
from ..layers.linear import ColumnParallelLinear, Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import RopeConfig, RotaryEmbedding
from ..layers.runtime import LayerRuntime
from ..layers.self_attention import SelfAttention
from ..weights import CheckpointWeights

# cos and sin of a step's positions, per rotation a model uses (most use one, "default").
RopeTables = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
DEFAULT_ROPE = "default"

# The layer loop as one call (see compiled_stack.py): (hidden, rope tables, the layers' caches,
# the step's attention metadata, the rows that are a prompt's tokens or None) -> (the last
# block's output, the residual stream before it).
LayerStack = Callable[
    [torch.Tensor, RopeTables, Sequence[LayerKVCache], AttentionMetadata, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a model: what the engine sizes the KV cache and the limits by."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> "ModelConfig":
        num_heads = int(hf_config["num_attention_heads"])
        return cls(
            model_type=str(hf_config["model_type"]),
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=int(hf_config["hidden_size"]),
            num_layers=int(hf_config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
            head_dim=int(hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )


class FeedForward(Protocol):
    """A dense MLP or a mixture of experts."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load(self, weights: CheckpointWeights, prefix: str) -> None: ...


class DecoderLayer(nn.Module):
    """One block of the stack. The residual add is deferred into the next norm, which fuses the
    two: a layer takes and returns (its block's output, the residual stream before it), and the
    first layer starts the stream from the embeddings (residual None)."""

    rope: str
    input_layernorm: RMSNorm
    self_attn: SelfAttention

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope_tables: RopeTables,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        raise NotImplementedError

    def attend(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope_tables: RopeTables,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention block on norm(stream): (its output, the stream), the stream started
        from `hidden` in the first layer and added into otherwise."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden = self.input_layernorm(hidden, residual)
        return self.self_attn(hidden, *rope_tables[self.rope], cache, metadata), residual


class PreNormLayer(DecoderLayer):
    """x + attn(norm(x)), then x + ffn(norm(x)): Llama and most decoders since."""

    def __init__(
        self,
        attention: SelfAttention,
        feed_forward: FeedForward,
        feed_forward_name: str,
        config: ModelConfig,
        runtime: LayerRuntime,
        rope: str = DEFAULT_ROPE,
    ) -> None:
        super().__init__()
        self.rope = rope
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime)
        self.feed_forward = feed_forward
        # Where the checkpoint keeps it: "mlp", or Mixtral's "block_sparse_moe".
        self.feed_forward_name = feed_forward_name

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope_tables: RopeTables,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.attend(hidden, residual, rope_tables, cache, metadata)
        hidden = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        self.input_layernorm.load(weights.get(f"{prefix}.input_layernorm.weight"))
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(weights.get(f"{prefix}.post_attention_layernorm.weight"))
        self.feed_forward.load(weights, f"{prefix}.{self.feed_forward_name}")


class SandwichNormLayer(DecoderLayer):
    """Gemma 2 and 3: each block's output is normalised too before it joins the residual,
    x + norm(attn(norm(x))), then x + norm(ffn(norm(x)))."""

    def __init__(
        self,
        attention: SelfAttention,
        feed_forward: FeedForward,
        config: ModelConfig,
        runtime: LayerRuntime,
        rope: str,
        norm_weight_offset: float,
    ) -> None:
        super().__init__()
        self.rope = rope

        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, runtime, norm_weight_offset)

        self.input_layernorm = norm()
        self.self_attn = attention
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.feed_forward = feed_forward
        self.post_feedforward_layernorm = norm()

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope_tables: RopeTables,
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.attend(hidden, residual, rope_tables, cache, metadata)
        hidden = self.post_attention_layernorm(hidden)
        hidden = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.feed_forward(hidden)), residual

    def load(self, weights: CheckpointWeights, prefix: str) -> None:
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            norm = getattr(self, name)
            norm.load(weights.get(f"{prefix}.{name}.weight"))
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.feed_forward.load(weights, f"{prefix}.mlp")


class CausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layers: Sequence[DecoderLayer],
        ropes: Mapping[str, RopeConfig],
        runtime: LayerRuntime,
        embedding_scale: float | None = None,
        final_logit_softcap: float | None = None,
        norm_weight_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, runtime, embedding_scale
        )
        self.rotaries = nn.ModuleDict(
            {
                name: RotaryEmbedding(config.head_dim, rope, runtime.device)
                for name, rope in ropes.items()
            }
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime, norm_weight_offset)
        # Each rank's share of the vocabulary's logits, gathered into the whole in `forward`.
        self.lm_head = ColumnParallelLinear(
            config.hidden_size, [runtime.shards.padded(config.vocab_size)], False, runtime
        )
        self.shards = runtime.shards
        self.final_logit_softcap = final_logit_softcap
        # Runs the layers in one call where set (`models.compiled_stack`); None: layer by layer.
        self.compiled_stack: LayerStack | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: Sequence[LayerKVCache],
        logits_rows: torch.Tensor,
        prompt_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [len(logits_rows), vocab], in the model's dtype, for the flat batch rows that
        sample a token (the sampler widens them to float32 where it computes on them).

        input_ids and positions are [T]; only the rows in `logits_rows` go through the LM head,
        which is the single largest matmul for small models. `prompt_rows` lists the rows that
        are a prompt's tokens: the compiled stack's quantized projections multiply them by the
        weight dequantized to bfloat16 (kernels/csrc/linear_quantized.cpp).
        """
        hidden = self.embed_tokens(input_ids)
        rope_tables = {name: rotary.cos_sin(positions) for name, rotary in self.rotaries.items()}
        residual = None
        if self.compiled_stack is not None:
            hidden, residual = self.compiled_stack(
                hidden, rope_tables, kv_cache, metadata, prompt_rows
            )
        else:
            for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
                hidden, residual = layer(hidden, residual, rope_tables, layer_cache, metadata)
        assert residual is not None, "a model has at least one layer"
        logits = self.lm_head(self.norm(hidden[logits_rows], residual[logits_rows]))
        logits = self.shards.all_gather_last_dim(logits)
        if logits.shape[-1] != self.config.vocab_size:  # the last rank's padding
            logits = logits[:, : self.config.vocab_size].contiguous()
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_cache_scales(self) -> list[tuple[float, float]]:
        """Each layer's (key, value) scales for an 8-bit KV cache: the checkpoint's, 1 where it
        has none."""
        return [(layer.self_attn.key_scale, layer.self_attn.value_scale) for layer in self.layers]

    def prepack_for_cpu(self) -> None:
        """Packs every projection for its matmul once the weights are loaded."""
        tied = self.lm_head.weight is self.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack_for_cpu(release_weight=not (tied and module is self.lm_head))

    @torch.no_grad()
    def load_weights(self, weights: CheckpointWeights) -> None:
        self.embed_tokens.load(weights, "embed_tokens.weight")
        for index, layer in enumerate(self.layers):
            layer.load(weights, f"layers.{index}")
        self.norm.load(weights.get("norm.weight"))
        tied = weights.lm_head_is_tied(self.config.tie_word_embeddings)
        if tied and not weights.holds_quantized("lm_head.weight"):
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.load(weights, ["lm_head"])
