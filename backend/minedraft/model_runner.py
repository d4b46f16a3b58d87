"""Loads one HF causal LM and runs batched forwards over rows of a RowKVCache."""
import inspect
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .kv_cache import RowKVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _location(path: str) -> tuple[str, dict]:
    """An HF model directory, or a .gguf file that transformers reads through `gguf_file`."""
    if path.endswith(".gguf"):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def load_model(path: str, device: str, dtype: str):
    where, extra = _location(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], attn_implementation="sdpa", **extra)
    return model.to(device).eval()


def load_config(path: str):
    where, extra = _location(path)
    return AutoConfig.from_pretrained(where, **extra)


def load_tokenizer(path: str):
    where, extra = _location(path)
    return AutoTokenizer.from_pretrained(where, **extra)


class ModelRunner:
    """Turns rows of token ids into one padded forward pass; never decides who runs."""

    def __init__(self, model, num_rows: int, capacity: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.num_rows = num_rows
        self.capacity = capacity
        self.vocab_size = model.config.vocab_size
        # transformers 5 renamed past_key_values to cache (the old name goes in 5.40); 4.x knows only the old one.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def new_cache(self) -> RowKVCache:
        return RowKVCache(self.num_rows, self.capacity)

    def close(self) -> None:
        """Nothing to stop: the model lives in this process (TensorParallelRunner's has workers)."""

    @torch.inference_mode()
    def fill(self, cache: RowKVCache, rows, start_lens: list[int], feeds: list[list[int]], with_hidden: bool = False,
             embeds: list[torch.Tensor] | None = None):
        """Write the feeds' keys and values to the cache (a prefill). No logits are wanted, so the LM
        head runs at one position only; `with_hidden` returns the last hidden states [b, n, H]
        instead (what a feature draft reads) and runs no LM head at all."""
        inputs = self._inputs(cache, rows, start_lens, feeds, embeds)
        if with_hidden:
            return self.model.get_decoder()(**inputs).last_hidden_state
        self.model(**inputs, logits_to_keep=1)
        return None

    @torch.inference_mode()
    def forward(self, cache: RowKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                last_only: bool = False, with_hidden: bool = False, embeds: list[torch.Tensor] | None = None):
        """Feed each row its tokens, written after its first `start_lens[r]` cached positions.

        Returns float32 logits, [b, n, V], or [b, V] at each row's last real token when `last_only`.
        `with_hidden` returns (logits, last hidden states) alike: the states are the LM head's
        input, which a feature draft reads. `embeds` (a feature draft's inputs, [n_r, H] per row)
        replaces the feeds' token embeddings; the feeds still give the rows' lengths.
        """
        inputs = self._inputs(cache, rows, start_lens, feeds, embeds)
        last = torch.tensor([len(f) - 1 for f in feeds], device=self.device) if last_only else None
        if with_hidden:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            if last_only:
                hidden = hidden[torch.arange(len(feeds), device=self.device), last]
            return self.model.get_output_embeddings()(hidden).float(), hidden
        if not last_only:
            return self.model(**inputs).logits.float()
        # The LM head runs only at the rows' last real positions (a prefill's other positions need
        # no logits: for a 49k vocabulary that is a fifth of the work).
        keep = torch.unique(last)  # sorted
        logits = self.model(**inputs, logits_to_keep=keep).logits
        return logits[torch.arange(len(feeds), device=self.device), torch.searchsorted(keep, last)].float()

    def _inputs(self, cache: RowKVCache, rows, start_lens: list[int], feeds: list[list[int]],
                embeds: list[torch.Tensor] | None = None) -> dict:
        """The model's keyword arguments for these rows, with the cache aimed at them. Rows are
        right-padded to the longest feed; padding writes only to the cache's scratch slot and its
        outputs are garbage that no caller reads."""
        num_new = max(len(f) for f in feeds)
        if embeds is None:
            tokens = {"input_ids": torch.tensor([f + [0] * (num_new - len(f)) for f in feeds], device=self.device)}
        else:
            tokens = {"inputs_embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)}
        starts = torch.tensor(start_lens, device=self.device)
        lengths = torch.tensor([len(f) for f in feeds], device=self.device)
        if isinstance(rows, list):
            rows = torch.tensor(rows, device=self.device)
        cache.prepare(rows, starts, lengths, num_new)
        # Padding repeats its row's last real position: it must not run past the model's position table.
        positions = starts[:, None] + torch.minimum(torch.arange(num_new, device=self.device), lengths[:, None] - 1)
        return dict(**tokens, position_ids=positions, use_cache=True,
                    attention_mask=self._mask(positions, cache._visible_len), **{self._cache_arg: cache})

    def _mask(self, positions: torch.Tensor, visible_len: int) -> torch.Tensor:
        """Additive [b, 1, n, t] mask: a query at position p sees keys 0..p of its own row."""
        keys = torch.arange(visible_len, device=self.device)
        visible = keys[None, None, :] <= positions[:, :, None]
        dtype = self.model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]
