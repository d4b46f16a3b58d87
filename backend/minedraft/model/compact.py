"""A compact forward for the Llama and Qwen2 families (the shipped pairs, the demo pair, SmolLM2),
written for torch.compile: one straight line over the HF model's own modules (embeddings, norms,
projections, MLPs, rotary table; quantized linears too) and a RowKVCache's tensors, with no
per-call Python state, so that `torch.compile(fullgraph=True)` takes it whole. transformers'
forward stays the reference in the tests and the path for other architectures, for tensor
parallelism and for `enforce_eager`.
"""
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
MIN_SIZE = 2  # rows and tokens fed are padded to at least this: dynamic shapes specialise sizes 0 and 1
RECOMPILE_LIMIT = 64


def is_supported(model) -> bool:
    config = model.config
    return (config.model_type in SUPPORTED_MODEL_TYPES and not getattr(config, "use_sliding_window", False)
            and getattr(config, "hidden_act", "silu") == "silu")


class CompactDecoder(nn.Module):
    """`forward` feeds b rows n tokens each (right-padded) and writes their keys and values at
    `write_positions` of the cache rows 0..b-1; row r's query at position p sees keys 0..p of its row."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.model = model
        self.decoder = model.get_decoder()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads

    def forward(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None, positions: torch.Tensor,
                write_positions: torch.Tensor, row_ids: torch.Tensor | None, visible_len: int,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Returns the last hidden states [b, n, H] (the LM head's input). `row_ids` [b]: the cache
        rows fed; None: rows 0..b-1, which attention reads in place (a step's rows always are)."""
        hidden = self.decoder.embed_tokens(input_ids) if embeds is None else embeds
        b, n = positions.shape
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        rows = (torch.arange(b, device=positions.device) if row_ids is None else row_ids)[:, None]
        # [b, 1, n, t]: key j is visible to a query at position p when j <= p.
        visible = torch.arange(visible_len, device=positions.device) <= positions[:, None, :, None]
        for layer, (layer_keys, layer_values) in enumerate(zip(keys, values)):
            block = self.decoder.layers[layer]
            attention = block.self_attn
            x = block.input_layernorm(hidden)
            q = attention.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            layer_keys[rows, :, write_positions] = k.transpose(1, 2)
            layer_values[rows, :, write_positions] = v.transpose(1, 2)
            if row_ids is None:
                seen_keys, seen_values = layer_keys[:b, :, :visible_len], layer_values[:b, :, :visible_len]
            else:
                seen_keys, seen_values = layer_keys[row_ids, :, :visible_len], layer_values[row_ids, :, :visible_len]
            out = F.scaled_dot_product_attention(q, seen_keys, seen_values, attn_mask=visible,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return self.decoder.norm(hidden)


def compile_decoder(decoder: CompactDecoder):
    """torch.compile over the whole forward (fullgraph: a graph break is a bug here). Inductor
    freezes the weights into its kernels (on CPU, prepacked oneDNN matmuls); dynamic shapes keep
    one graph for every row count, token count and cache length of at least MIN_SIZE, which the
    runner pads to."""
    torch._inductor.config.freezing = True
    # Equal sizes must not be taken for one symbol (rows and tokens are often both 2).
    torch.fx.experimental._config.use_duck_shape = False
    # Each model compiles its own graphs (its weights are frozen into them; a model takes two, for
    # a batch's first rows and for picked-out rows): the default limit of 8 per code object would
    # stop a test session's many models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           RECOMPILE_LIMIT * 8)
    return torch.compile(decoder, fullgraph=True, dynamic=True)
