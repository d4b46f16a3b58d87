"""A draft's vocabulary in the target's ids (FR-Spec, EAGLE-3): `d2t.json` in a draft's directory."""
import json
from pathlib import Path

import torch

D2T_FILE = "d2t.json"


class DraftVocabulary:
    """The draft's token ids in the target's vocabulary, for a draft with a reduced vocabulary
    (FR-Spec, EAGLE-3): `d2t.json` in the draft's directory lists, for each draft id, its target id.
    Target tokens outside it are fed as the draft's extra last id and are never proposed: their q is
    0, which keeps rejection sampling lossless. Without `d2t.json` the two vocabularies are one."""

    def __init__(self, d2t: list[int] | None, target_vocab_size: int):
        self.target_vocab_size = target_vocab_size
        self.d2t = None if d2t is None else torch.tensor(d2t, dtype=torch.long)
        if self.d2t is not None:
            self.size = len(d2t)
            self.t2d = torch.full((target_vocab_size,), self.size, dtype=torch.long)
            self.t2d[self.d2t] = torch.arange(self.size)

    @classmethod
    def load(cls, model_path: str, target_vocab_size: int) -> "DraftVocabulary":
        path = Path(model_path) / D2T_FILE
        return cls(json.loads(path.read_text()) if path.is_file() else None, target_vocab_size)

    def to_draft(self, ids: list[int]) -> list[int]:
        return ids if self.d2t is None else self.t2d[torch.tensor(ids, dtype=torch.long)].tolist()

    def draft_id(self, target_id: int | None) -> int | None:
        if self.d2t is None or target_id is None:
            return target_id
        draft_id = int(self.t2d[target_id])
        return draft_id if draft_id < self.size else None

    def proposable(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.d2t is None else logits[..., :self.size]

    def to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.d2t is None else self.d2t[ids]

    def expand(self, probs: torch.Tensor) -> torch.Tensor:
        """[b, draft vocab] -> [b, target vocab], zero outside the draft's vocabulary."""
        if self.d2t is None:
            return probs
        full = probs.new_zeros(probs.size(0), self.target_vocab_size)
        return full.index_copy_(1, self.d2t, probs)

    def place(self, device) -> None:
        """Keep the draft-to-target map where the drafts are drawn (t2d serves CPU id lists)."""
        if self.d2t is not None:
            self.d2t = self.d2t.to(device)
