"""Pure tensor functions: logits processing, sampling, and the speculative acceptance rule.

Every row carries its own temperature, top-k and top-p. The same processing is applied to
the draft's and the target's logits, so rejection sampling preserves the target's
*processed* distribution. Greedy rows (temperature 0) are an explicit exact path: their
distribution is the one-hot argmax, which makes acceptance an exact token match and the
residual the target's argmax, with no randomness involved.
"""
from dataclasses import dataclass, replace

import torch


@dataclass
class RowSampling:
    """Per-row processing settings as tensors, [b] each; `eos_blocked` is [b, n]."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    eos_blocked: torch.Tensor
    eos_token_ids: tuple[int, ...]

    @classmethod
    def for_rows(cls, rows, num_eos_blocked: list[int], num_positions: int, eos_token_ids) -> "RowSampling":
        """`rows`: anything with temperature, top_k and top_p (SamplingParams, DraftRow). Row r masks
        EOS at its first num_eos_blocked[r] positions (min_tokens)."""
        blocked = torch.tensor(num_eos_blocked)
        return cls(temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
                   top_k=torch.tensor([r.top_k for r in rows]),
                   top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32),
                   eos_blocked=torch.arange(num_positions) < blocked[:, None],
                   eos_token_ids=tuple(eos_token_ids))

    def to(self, device) -> "RowSampling":
        """The same settings on `device`: sampling runs where the logits are."""
        return replace(self, temperature=self.temperature.to(device), top_k=self.top_k.to(device),
                       top_p=self.top_p.to(device), eos_blocked=self.eos_blocked.to(device))

    def at(self, position: int) -> "RowSampling":
        """The same settings for the single position `position`."""
        return replace(self, eos_blocked=self.eos_blocked[:, position:position + 1])


def processed_probs(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """logits [b, n, V] -> probabilities [b, n, V] after min-tokens EOS masking, temperature,
    top-k and top-p; one-hot argmax for greedy rows."""
    logits = _eos_masked(logits, sampling)
    greedy = sampling.temperature == 0
    probs = torch.zeros_like(logits)
    if greedy.any():
        probs[greedy] = _one_hot_argmax(logits[greedy])
    if (~greedy).any():
        rows = ~greedy
        probs[rows] = _filtered_softmax(logits[rows] / sampling.temperature[rows, None, None],
                                        sampling.top_k[rows], sampling.top_p[rows])
    return probs


def greedy_tokens(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """logits [b, n, V] -> the argmax ids [b, n] after min-tokens EOS masking: what
    processed_probs' one-hot rows put their mass on, without building [b, n, V] probabilities."""
    return _eos_masked(logits, sampling).argmax(-1)


def _eos_masked(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """EOS at -inf where min_tokens blocks it, in a copy; the logits themselves when nothing is blocked."""
    if not (sampling.eos_token_ids and sampling.eos_blocked.any()):
        return logits
    logits = logits.clone()
    blocked = sampling.eos_blocked.to(logits.device)
    for eos in sampling.eos_token_ids:
        logits[..., eos].masked_fill_(blocked, float("-inf"))
    return logits


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def _filtered_softmax(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # logits [r, n, V]; top_k, top_p [r]
    vocab = logits.size(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks >= k[:, None, None]
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # top-p: drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
    # Only where top_p < 1: a float cumsum may reach 1.0 before the tail (at an order that depends
    # on the thread count), which would drop tail tokens that top_p = 1 keeps.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = drop | ((mass_before >= top_p[:, None, None]) & (top_p < 1)[:, None, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.zeros_like(logits).scatter_(-1, order, sorted_logits.softmax(-1))


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [..., V], uniforms [...] in [0, 1) -> token ids [...]."""
    cdf = probs.cumsum(-1)
    scaled = uniforms * cdf[..., -1]
    ids = torch.searchsorted(cdf, scaled.unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_(max=probs.size(-1) - 1)


def verify_greedy(target_ids: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor):
    """verify() for rows that are all greedy, on ids alone: target_ids [b, k+1] are the target's
    argmax tokens. A draft passes exactly when it equals the target's token (p(d) is 1 or 0 and
    q(d) is 1), and the next token is the target's own at the first mismatch, as verify() gives."""
    b, k = draft_ids.shape
    passes = (draft_ids == target_ids[:, :k]) & (torch.arange(k) < num_drafts[:, None])
    accepted = passes.long().cumprod(-1).sum(-1)
    return accepted, target_ids[torch.arange(b), accepted]


def verify(target_probs: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor,
           num_drafts: torch.Tensor, accept_uniforms: torch.Tensor, resample_uniforms: torch.Tensor):
    """Leviathan et al.'s rule, batched with ragged draft lengths.

    target_probs [b, k+1, V]: p_i, the target's distribution after i drafted tokens.
    draft_ids [b, k], draft_probs [b, k, V]: q_i and the token d_i drawn from it.
    num_drafts [b]: row r only proposes its first num_drafts[r] tokens.
    Returns (accepted [b], next_token [b]): the row keeps d_0..d_{accepted-1}, then next_token,
    drawn from the residual max(0, p - q) at the first rejection or from p_k when all pass.
    """
    b, k = draft_ids.shape
    device = target_probs.device
    draft_ids, draft_probs, num_drafts, accept_uniforms, resample_uniforms = (
        t.to(device) for t in (draft_ids, draft_probs, num_drafts, accept_uniforms, resample_uniforms))
    if k == 0:
        return torch.zeros(b, dtype=torch.long, device=device), sample(target_probs[:, 0], resample_uniforms)
    p_of_d = target_probs[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)
    q_of_d = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)
    # u < p/q, written without a division: q(d) > 0 because d was drawn from q.
    passes = accept_uniforms * q_of_d < p_of_d
    passes &= torch.arange(k, device=device) < num_drafts[:, None]
    accepted = passes.long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=device)
    p_next = target_probs[rows, accepted]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, accepted]
    rejected = accepted < num_drafts
    residual = torch.where(rejected[:, None], (p_next - q_next).clamp_(min=0), p_next)
    # A residual of zero mass cannot be drawn from; p itself is the right law there (p == q).
    empty = residual.sum(-1) <= 0
    residual[empty] = p_next[empty]
    return accepted, sample(residual, resample_uniforms)
