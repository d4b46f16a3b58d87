"""Prompt-lookup (n-gram) drafting: the model-free draft that vLLM (`method: ngram`,
`prompt_lookup_min/max`), TensorRT-LLM, llama.cpp and HF (`prompt_lookup_num_tokens`) ship.

A row's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked up earlier in
its own context, prompt and output; the tokens that followed their latest earlier occurrence are the
draft. No forward pass, no cache: the drafter is fed each row's whole context every time. Its q is
one-hot at its proposal, so the engine's acceptance rule keeps it lossless as it keeps any draft.
It pays where answers repeat their context: summaries, code edits, retrieval-augmented answers.
"""
import time

import numpy as np
import torch

from minedraft.drafting.drafter import Drafts, DraftWork


def propose(context: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """The up to `num_tokens` tokens that followed the latest earlier occurrence of the context's
    last n tokens, for the longest n in [min_n, max_n] that occurs; [] if none does."""
    tokens = np.asarray(context)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        # Windows that start early enough to be followed by at least one token.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + num_tokens].tolist()
    return []


class NgramDrafter:
    """Same methods as the model drafters (drafter.py); `keeps_cache` False: fed whole contexts."""

    reads_features = False
    keeps_cache = False
    overlaps = False
    ready = True

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._drafts: Drafts | None = None
        self.last_span = (0.0, 0.0)

    def start(self, work: DraftWork) -> None:
        started = time.monotonic()
        proposals = [propose(row.feed, row.max_tokens, self.min_n, self.max_n) if row.max_tokens else []
                     for row in work.rows]
        steps = max(map(len, proposals), default=0)
        ids = torch.zeros(len(proposals), steps, dtype=torch.long)
        for row, proposal in enumerate(proposals):
            ids[row, :len(proposal)] = torch.tensor(proposal, dtype=torch.long)
        self._drafts = Drafts(ids, None, list(map(len, proposals)), 0.0, cached=0)
        self.last_span = (started, time.monotonic())

    def finish(self) -> Drafts:
        drafts, self._drafts = self._drafts, None
        return drafts

    def restart(self) -> None:
        """Nothing to restart: no model, no process."""

    def close(self) -> None:
        """Nothing to release."""
