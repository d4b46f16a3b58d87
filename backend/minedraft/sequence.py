"""Per-request state: tokens, cache extents, counters and the text streamed so far."""
from dataclasses import dataclass

import torch

from minedraft.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has `finished` set."""
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    num_drafted_tokens: int
    num_accepted_tokens: int
    error: str | None = None
    # With the `logprobs` parameter: per new token, {token id: {"logprob", "rank", "decoded_token"}}
    # for the emitted token and the top alternatives, from the target's verification pass.
    logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None


class AcceptanceEstimate:
    """A request's per-draft-token acceptance rate alpha, as a moving average.

    Under the usual geometric model a verification of n drafts with a accepted saw a
    successes in a + 1 trials (a trials when all n passed). Successes and trials are decayed
    sums, started with `prior_trials` pseudo-trials at the engine's running mean: a newcomer's
    few verifications are noisy, and goodput is convex in alpha, so unshrunk estimates
    would over-reward long drafts."""

    def __init__(self, prior: float, prior_trials: float = 4.0, decay: float = 0.8):
        self.successes = prior * prior_trials
        self.trials = prior_trials
        self.decay = decay

    def update(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.successes = self.decay * self.successes + num_accepted
        self.trials = self.decay * self.trials + num_accepted + (num_accepted < num_drafted)

    @property
    def value(self) -> float:
        return self.successes / self.trials


class FeatureBuffer:
    """The target's last hidden state at positions 0, 1, ... of a request, for a feature draft
    (EAGLE), which reads them as its input. Grows by doubling: a step appends a few positions,
    and a draft whose cache was reset reads them all again from position 0."""

    def __init__(self):
        self._data: torch.Tensor | None = None
        self.length = 0

    def append(self, features: torch.Tensor) -> None:
        end = self.length + features.size(0)
        if self._data is None or end > self._data.size(0):
            grown = features.new_empty(max(end, 2 * (0 if self._data is None else self._data.size(0)), 64),
                                       features.size(1))
            if self._data is not None:
                grown[:self.length] = self._data[:self.length]
            self._data = grown
        self._data[self.length:end] = features
        self.length = end

    def span(self, start: int, end: int) -> torch.Tensor:
        return self._data[start:end] if self._data is not None else torch.zeros(0, 0)


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, num_draft_tokens: int,
                 generator: torch.Generator, acceptance_prior: float = 0.5):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_draft_tokens = num_draft_tokens
        self.generator = generator
        # How many of token_ids the target's KV cache holds: all but one pending token, fed at the
        # next verification. (The draft cache's extent is drafting's: drafting.coordinator.)
        self.num_target_cached_tokens = 0
        # The target's hidden states at the positions its cache holds (kept only for a feature draft).
        self.target_features = FeatureBuffer()
        self.num_drafted_tokens = 0
        self.num_accepted_tokens = 0
        self.cumulative_logprob = 0.0
        self.acceptance = AcceptanceEstimate(acceptance_prior)
        self.finish_reason: str | None = None
        self.text = ""
        self.num_text_sent = 0
        self.detokenizer = None  # engine.output.IncrementalDetokenizer, made at the first output
        self.arrival = 0  # the engine's arrival number

    def preempted(self) -> None:
        """Its cache is gone: the target reads every token again when it is next admitted."""
        self.num_target_cached_tokens = 0
        self.target_features = FeatureBuffer()

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def draft_budget(self, max_model_len: int, step_cap: int) -> int:
        """Drafts worth proposing this step: verification always adds one token of its own, so no
        more than the room left before max_tokens or the context limit, minus one."""
        room = min(self.params.max_tokens - self.num_generated, max_model_len - len(self.token_ids))
        return max(0, min(self.num_draft_tokens, step_cap, room - 1))

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def uniforms(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)
