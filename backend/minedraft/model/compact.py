"""A compact forward for the Llama and Qwen2 families (the shipped pairs, the demo pair, SmolLM2),
written for torch.compile: one straight line over the HF model's own modules (embeddings, norms,
projections, MLPs, rotary table; quantized linears too) and a KV pool's tensors, with no
per-call Python state, so that `torch.compile(fullgraph=True)` takes it whole. transformers'
forward stays the reference in the tests and the path for other architectures, for tensor
parallelism and for `enforce_eager`.
"""
import copy
import functools

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# oneDNN's CPU matmul streams packed weights slower for 1 to 3 input rows than for 4
# (docs/benchmarks.md): a forward of packed layers feeds at least 4 tokens, padded.
MIN_TOKENS_PER_FORWARD = 4
# A row count and a token count of 1 each take a graph of their own (dynamic shapes specialise
# sizes 0 and 1): these feeds of (rows, tokens) compile every graph a model's steps can take.
WARM_UP_SHAPES = ((1, 1), (1, 3), (MIN_TOKENS_PER_FORWARD, 1), (MIN_TOKENS_PER_FORWARD, 3))
RECOMPILE_LIMIT = 64


def is_supported(model) -> bool:
    config = model.config
    return (config.model_type in SUPPORTED_MODEL_TYPES and not getattr(config, "use_sliding_window", False)
            and getattr(config, "hidden_act", "silu") == "silu")


def decoder_layer(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor,
                  write_slots: torch.Tensor, slot_table: torch.Tensor, layer_keys: torch.Tensor,
                  layer_values: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
                  grouped: bool) -> torch.Tensor:
    """One decoder layer over `hidden` [b, n, H]; writes the layer's new keys and values in place.
    `grouped`: fewer key/value heads than query heads (a bool, so a compiled graph takes it as a
    constant; the head counts are symbolic sizes there)."""
    b, n = hidden.shape[:2]
    attention = block.self_attn
    x = block.input_layernorm(hidden)
    q = attention.q_proj(x).view(b, n, num_heads, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(b, n, num_kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    layer_keys[write_slots] = k.transpose(1, 2)
    layer_values[write_slots] = v.transpose(1, 2)
    # The rows' positions gathered from their blocks: [b, kv heads, t, head dim].
    seen_keys, seen_values = layer_keys[slot_table].transpose(1, 2), layer_values[slot_table].transpose(1, 2)
    if grouped:
        # The query heads that share a key/value head go in as more queries of that head, [b, kv
        # heads, group * n, head dim]: attention then reads each key once, where SDPA's GQA copies
        # the keys and values once per query head (the copy grew with the context).
        group = num_heads // num_kv_heads
        q = q.reshape(b, num_kv_heads, group * n, head_dim)
        visible = visible.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(q, seen_keys, seen_values, attn_mask=visible)
    hidden = hidden + attention.o_proj(out.reshape(b, num_heads, n, head_dim).transpose(1, 2).reshape(b, n, -1))
    return hidden + block.mlp(block.post_attention_layernorm(hidden))


class CompactDecoder(nn.Module):
    """`forward` feeds b rows n tokens each (right-padded), writes their keys and values at
    `write_slots` of the pool and reads row r's positions 0..t-1 at `slot_table[r]`; a query at
    position p sees keys 0..p of its row."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.model = model
        self.decoder = model.get_decoder()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layer = functools.partial(decoder_layer, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                       head_dim=self.head_dim, grouped=self.num_kv_heads != self.num_heads)

    def forward(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None, positions: torch.Tensor,
                write_slots: torch.Tensor, slot_table: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """Returns the last hidden states [b, n, H] (the LM head's input)."""
        hidden = self.decoder.embed_tokens(input_ids) if embeds is None else embeds
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        # [b, 1, n, t]: key j is visible to a query at position p when j <= p.
        visible = torch.arange(slot_table.shape[1], device=positions.device) <= positions[:, None, :, None]
        for block, layer_keys, layer_values in zip(self.decoder.layers, keys, values):
            hidden = self.layer(block, hidden, cos, sin, visible, write_slots, slot_table, layer_keys, layer_values)
        return self.decoder.norm(hidden)


def compile_decoder(decoder: CompactDecoder) -> CompactDecoder:
    """torch.compile over one decoder layer (fullgraph: a graph break is a bug here), the regional
    compilation torch recommends for a stack of like blocks: the layers' modules are inputs to one
    graph, so tracing and compiling happen once for all of them (and for every model of the
    architecture) and inductor's on-disk cache serves a restart. On CPU the runner has packed the
    weights already (model/packed_linear.py). Dynamic shapes keep one graph for every row count
    and token count of at least 2 (see WARM_UP_SHAPES) and every cache length."""
    # Equal sizes must not be taken for one symbol (rows and tokens are often both 2).
    torch.fx.experimental._config.use_duck_shape = False
    # Models of other sizes and dtypes guard differently and compile graphs of their own: the
    # default limit of 8 per code object would stop a test session's many models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           RECOMPILE_LIMIT * 8)
    decoder.layer = torch.compile(decoder.layer, fullgraph=True, dynamic=True)
    return decoder


class CompactLM(nn.Module):
    """The compact decoder and the LM head in one forward: float32 logits [b, n, V]."""

    def __init__(self, model):
        super().__init__()
        self.decoder = CompactDecoder(model)
        self.head = model.get_output_embeddings()

    def forward(self, input_ids, positions, write_slots, slot_table, keys, values) -> torch.Tensor:
        return self.head(self.decoder(input_ids, None, positions, write_slots, slot_table, keys, values)).float()


# The settings a static step graph compiles under, and only it: freezing puts the weights in the
# graph as constants, which lets max-autotune's C++ GEMM template pack them once for its own
# micro-kernel, which streams a one-row bf16 product from memory faster than oneDNN's packed
# matmul (docs/benchmarks.md, "Static step graphs"). The regional graph must not freeze: its
# layers' weights are its inputs.
STATIC_STEP_INDUCTOR_CONFIG = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def _tensor_attributes(model):
    """Tensors modules hold as plain attributes (a packed layer's opaque oneDNN weight)."""
    return (value for module in model.modules() for value in vars(module).values() if isinstance(value, torch.Tensor))


class StaticSteps:
    """vLLM's `compile_sizes` on CPU: for a few (rows, tokens) shapes of the steps that repeat (an AR
    step, a verification of k + 1, a draft's one-token step), one static-shape graph of the whole
    model, LM head included, with its weights frozen in (a quantized layer's codes, and the packed
    dense weights it keeps for wide inputs). Only the attention's context length stays symbolic, so a step at
    any cache length replays the same graph. The graphs run a structural copy of the model (its
    modules, sharing its weights): the runner then packs the model's own linear layers for the
    regional graph, which would otherwise change what these graphs were traced over."""

    def __init__(self, model, shapes):
        self.shapes = sorted(set(shapes))
        shared = {id(t): t for t in (*model.parameters(), *model.buffers(), *_tensor_attributes(model))}
        self._compiled = torch.compile(CompactLM(copy.deepcopy(model, memo=shared)), fullgraph=True, dynamic=False)

    def shape_for(self, num_rows: int, num_tokens: int) -> tuple[int, int] | None:
        """The compiled shape of this many rows that holds this many tokens a row, if any."""
        return next(((rows, tokens) for rows, tokens in self.shapes if rows == num_rows and tokens >= num_tokens),
                    None)

    def __call__(self, input_ids, positions, write_slots, slot_table, keys, values) -> torch.Tensor:
        torch._dynamo.mark_dynamic(slot_table, 1)
        with torch._inductor.config.patch(STATIC_STEP_INDUCTOR_CONFIG):
            return self._compiled(input_ids, positions, write_slots, slot_table, keys, values)
