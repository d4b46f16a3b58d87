"""Loads one HF causal LM and runs batched forwards over rows of a RowKVCache."""
import torch
from transformers import AutoModelForCausalLM

from .kv_cache import RowKVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(path: str, device: str, dtype: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    return model.to(device).eval()


class ModelRunner:
    """Turns rows of token ids into one padded forward pass; never decides who runs."""

    def __init__(self, model, num_rows: int, capacity: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.num_rows = num_rows
        self.capacity = capacity
        self.vocab_size = model.config.vocab_size

    def new_cache(self) -> RowKVCache:
        return RowKVCache(self.num_rows, self.capacity)

    @torch.inference_mode()
    def forward(self, cache: RowKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                last_only: bool = False) -> torch.Tensor:
        """Feed each row its tokens, written after its first `start_lens[r]` cached positions.

        Rows are right-padded to the longest feed; padded positions write garbage past the row's
        valid length, which the mask hides and later writes overwrite. Returns float32 logits,
        [b, n, V], or [b, V] at each row's last real token when `last_only`.
        """
        num_new = max(len(f) for f in feeds)
        input_ids = torch.tensor([f + [0] * (num_new - len(f)) for f in feeds], device=self.device)
        starts = torch.tensor(start_lens, device=self.device)
        if isinstance(rows, list):
            rows = torch.tensor(rows, device=self.device)
        cache.prepare(rows, starts, num_new)
        positions = starts[:, None] + torch.arange(num_new, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         attention_mask=self._mask(positions, cache._visible_len))
        logits = out.logits.float()
        if last_only:
            last = torch.tensor([len(f) - 1 for f in feeds], device=self.device)
            return logits[torch.arange(len(feeds), device=self.device), last]
        return logits

    def _mask(self, positions: torch.Tensor, visible_len: int) -> torch.Tensor:
        """Additive [b, 1, n, t] mask: a query at position p sees keys 0..p of its own row."""
        keys = torch.arange(visible_len, device=self.device)
        visible = keys[None, None, :] <= positions[:, :, None]
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
