"""How a draft model proposes, one small class per kind, under DraftModel's one sampling loop.

Each proposer gives the logits of draft position 1 (`begin`) and of position j + 1 once position
j's tokens are drawn (`next`); `cached_drafts` says how many of a drafting's tokens its cache then
holds (the rest are refed after verification). Adding a kind means one new class here.
"""
import torch

from minedraft.drafting.drafter import DraftRow
from minedraft.model.runner import ModelRunner


class SequentialProposer:
    """The classic draft: one forward per token, each feeding the token drawn before it."""

    reads_features = False

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def prepare(self, rows: list[DraftRow]) -> None:
        """Per-drafting inputs beyond the token ids: none."""

    def catch_up_embeds(self, row: int, feed: list[int]) -> torch.Tensor | None:
        """The inputs of a row's long catch-up feed, if not its tokens' embeddings: none."""
        return None

    def begin(self, cache, lens: list[int], feeds: list[list[int]], num_tokens: int) -> torch.Tensor:
        self._cache = cache
        logits = self.runner.forward(cache, slice(0, len(feeds)), lens, feeds, last_only=True)
        self._lens = [n + len(f) for n, f in zip(lens, feeds)]
        return logits

    def next(self, position: int, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.runner.forward(self._cache, slice(0, len(self._lens)), self._lens,
                                     [[t] for t in tokens.tolist()], last_only=True)
        self._lens = [n + 1 for n in self._lens]
        return logits

    def cached_drafts(self, steps: int) -> int:
        return steps - 1  # every draft but the last was fed


class ParallelProposer(SequentialProposer):
    """PARD: each row feeds its pending tokens and k - 1 mask tokens in one forward; the logits at its
    last pending token and at each mask are q_1..q_k. None of them depends on the drafts drawn before
    it, which is still a proposal the rejection rule is exact for."""

    def __init__(self, runner: ModelRunner, mask_token_id: int):
        super().__init__(runner)
        self.mask_token_id = mask_token_id

    def begin(self, cache, lens: list[int], feeds: list[list[int]], num_tokens: int) -> torch.Tensor:
        padded = [f + [self.mask_token_id] * (num_tokens - 1) for f in feeds]
        logits = self.runner.forward(cache, slice(0, len(feeds)), lens, padded)
        device = logits.device
        first = torch.tensor([len(f) - 1 for f in feeds], device=device)
        positions = first[:, None] + torch.arange(num_tokens, device=device)
        self._every_position = logits[torch.arange(len(feeds), device=device)[:, None], positions]
        return self._every_position[:, 0]

    def next(self, position: int, tokens: torch.Tensor) -> torch.Tensor:
        return self._every_position[:, position]

    def cached_drafts(self, steps: int) -> int:
        return 0  # the cache holds masks at the drafts' positions


class FeatureProposer(SequentialProposer):
    """EAGLE: each row feeds its pending tokens, each paired with the target's state at the position
    before; the draft's output state at the last one is its guess of the target's state there, whose
    logits give the first draft, and which is fed back with that draft to guess the next one."""

    reads_features = True

    def __init__(self, runner: ModelRunner, projection: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(runner)
        self.projection = projection  # (weight [H, H + H_target], bias [H])

    def prepare(self, rows: list[DraftRow]) -> None:
        self._rows = rows
        self._states = [self._row_states(r) for r in rows]

    def catch_up_embeds(self, row: int, feed: list[int]) -> torch.Tensor:
        return self._pair_embeds(feed, self._states[row][:len(feed)])

    def begin(self, cache, lens: list[int], feeds: list[list[int]], num_tokens: int) -> torch.Tensor:
        self._cache = cache
        states = [row_states[len(r.feed) - len(f):] for r, f, row_states in zip(self._rows, feeds, self._states)]
        feeds = [f or [0] for f in feeds]  # a placeholder row's token (see _row_states)
        logits, self._hidden = self.runner.forward(cache, slice(0, len(feeds)), lens, feeds, last_only=True,
                                                   with_hidden=True,
                                                   embeds=list(map(self._pair_embeds, feeds, states)))
        self._lens = [n + len(f) for n, f in zip(lens, feeds)]
        return logits

    def next(self, position: int, tokens: torch.Tensor) -> torch.Tensor:
        pairs = self._pair_embeds(tokens, self._hidden)
        # The feeds give only the rows' lengths here: the inputs are the pairs.
        logits, self._hidden = self.runner.forward(self._cache, slice(0, len(self._lens)), self._lens,
                                                   [[0]] * len(self._lens), last_only=True, with_hidden=True,
                                                   embeds=list(pairs[:, None]))
        self._lens = [n + 1 for n in self._lens]
        return logits

    def cached_drafts(self, steps: int) -> int:
        return 0  # it fed its own guesses of the target's states, which the real ones replace

    def _row_states(self, row: DraftRow) -> torch.Tensor:
        """A row's states, one per fed token: [len(feed), H] (zeros before position 0). A row with
        nothing to feed (a newcomer whose prompt the target has not read yet; its cap is 0) feeds a
        placeholder, one zero state, that its cache length, kept by the engine, does not count."""
        model = self.runner.model
        state_size = self.projection[0].size(1) - model.config.hidden_size  # the target's
        zeros = torch.zeros(1, state_size, device=self.runner.device, dtype=model.dtype)
        if row.features is None:
            return zeros
        states = torch.from_numpy(row.features).to(self.runner.device, model.dtype)
        if row.cached_len == 0:  # (a one-token prompt brings an empty array of no shape)
            states = torch.cat([zeros, states.reshape(-1, state_size)])
        return states

    def _pair_embeds(self, tokens, features: torch.Tensor) -> torch.Tensor:
        """A feature draft's input for (token, the target's state at the position before it): [n, H]."""
        tokens = torch.as_tensor(tokens, device=self.runner.device)
        weight, bias = self.projection
        return torch.nn.functional.linear(torch.cat([self.runner.model.get_input_embeddings()(tokens), features], -1),
                                          weight, bias)
