"""Loading one HF causal LM, its config and tokenizer, from a model directory or a .gguf file."""
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from minedraft.config import DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def _location(path: str) -> tuple[str, dict]:
    """An HF model directory, or a .gguf file that transformers reads through `gguf_file`."""
    if path.endswith(".gguf"):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def load_model(path: str, device: str, dtype: str):
    where, extra = _location(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa", **extra)
    return model.to(device).eval()


def load_config(path: str):
    where, extra = _location(path)
    return AutoConfig.from_pretrained(where, **extra)


def load_tokenizer(path: str):
    where, extra = _location(path)
    return AutoTokenizer.from_pretrained(where, **extra)
