"""Write a tiny test Llama (and its byte-level BPE tokenizer) as a GGUF file that transformers can load back.

Lets tests exercise the `gguf_file=` loading path without downloading a real GGUF checkpoint.
"""
import json
from pathlib import Path

import gguf
import numpy as np


def _permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf interleaves the two rotary halves of each head of q/k; transformers'
    # LlamaTensorProcessor undoes exactly this on load, so a file without it would come back scrambled.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, path: Path, quantized: dict[str, gguf.GGMLQuantizationType] | None = None) -> Path:
    """Write `model` (a LlamaForCausalLM) with `tokenizer` to `path` as a GGUF, in float32 except the
    tensors `quantized` names by their GGUF kind ("attn_q", "ffn_down", ...), which gguf-py quantizes."""
    path = Path(path)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)

    writer = gguf.GGUFWriter(path, "llama")
    # These are the llama.* keys transformers' GGUF_CONFIG_MAPPING turns back into a LlamaConfig.
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)  # read back as head_dim
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Byte-level BPE: transformers rebuilds a GPT2Tokenizer from tokens + merges, and only keeps
    # tokens whole (not split into bytes) if they are typed CONTROL.
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the plain GPT-2 split regex, which our ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    # Older `tokenizers` serialise merges as "a b" strings, newer ones as [a, b] pairs; GGUF wants strings.
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)  # the source tokenizer prepends nothing; keep encodings identical

    # Use gguf's own HF->GGUF name map: it is the very table transformers inverts when loading.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a missing output.weight is how GGUF says "tied"
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        w = tensor.detach().to("cpu").float().numpy()
        if name.endswith("attn_q.weight"):
            w = _permute_for_rope(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _permute_for_rope(w, cfg.num_key_value_heads)
        kind = name.split(".")[-2]
        if quantized and kind in quantized:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w), quantized[kind]),
                              raw_dtype=quantized[kind])
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
