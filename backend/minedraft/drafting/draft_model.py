"""A draft model at work: its caches, the catch-up of rows that fell behind, and the one sampling
loop that draws every kind of draft (the kinds are proposers.py's)."""
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from minedraft.drafting.drafter import NUM_BATCH_SLOTS, DraftRow, Drafts, DraftWork
from minedraft.drafting.proposers import (
    FeatureProposer,
    ParallelProposer,
    SequentialProposer,
)
from minedraft.drafting.vocabulary import DraftVocabulary
from minedraft.model import sampler
from minedraft.model.kv_cache import PoolSpec
from minedraft.model.loading import load_model
from minedraft.model.quantization import quantize_linears
from minedraft.model.runner import ModelRunner

# In a draft's directory: what makes it a feature draft (EAGLE), the projection of [token embedding;
# the target's last hidden state] to the draft's input, `weight` [H, H + H_target] and `bias` [H].
FEATURE_PROJECTION_FILE = "feature_projection.safetensors"
PARALLEL_DRAFT_KEY = "pard_token"  # in a draft's config.json: the mask token id of a parallel draft


class DraftModel:
    """Draft model plus one cache per internal batch, over its KV pool."""

    def __init__(self, runner: ModelRunner, eos_token_ids: tuple[int, ...], vocabulary: DraftVocabulary,
                 proposer: SequentialProposer):
        self.runner = runner
        self.vocabulary = vocabulary
        vocabulary.place(runner.device)
        self.proposer = proposer
        self.eos_token_ids = tuple(filter(lambda i: i is not None, map(vocabulary.draft_id, eos_token_ids)))
        self.caches = [runner.new_cache() for _ in range(NUM_BATCH_SLOTS)]
        self.last_span = (0.0, 0.0)  # monotonic start and end of the last run (shared clock across processes)

    @property
    def reads_features(self) -> bool:
        return self.proposer.reads_features

    def run(self, work: DraftWork) -> Drafts:
        """Drafts every row up to its cap, or until its confidence runs out; `last_span` times it."""
        started = time.monotonic()
        drafts = self._draft(work)
        self.last_span = (started, time.monotonic())
        return drafts

    def _draft(self, work: DraftWork) -> Drafts:
        cache = self.caches[work.batch_slot]
        for src, dst in work.moves:
            cache.move_row(src, dst)
        rows, k = work.rows, work.num_tokens
        # Rows past the batch's belong to requests that left since its last drafting.
        cache.release_rows(range(len(rows), cache.num_rows))
        for i, row in enumerate(rows):
            cache.commit(i, row.cached_len)
        catch_up_started = time.monotonic()
        self.proposer.prepare(rows)
        lens = self._prefill_long_feeds(cache, rows)
        catch_up_seconds = time.monotonic() - catch_up_started
        feeds = [self.vocabulary.to_draft(r.feed[len(r.feed) - min(len(r.feed), 2):]) for r in rows]
        logits = self.proposer.begin(cache, lens, feeds, k)
        sampling = sampler.RowSampling.for_rows(rows, [r.num_eos_blocked for r in rows], k, self.eos_token_ids)
        # Each row brings uniforms for its own cap only: its draws never depend on its neighbours.
        uniforms = torch.tensor([r.uniforms[:k] + [0.0] * (k - len(r.uniforms[:k])) for r in rows],
                                dtype=torch.float32)
        caps = torch.tensor([r.max_tokens for r in rows])
        lengths = torch.zeros(len(rows), dtype=torch.long)
        confidence = torch.ones(len(rows))
        drafting = caps > 0
        all_greedy = bool((sampling.temperature == 0).all())
        ids, probs = [], []
        # Sampling runs on the draft's device; only ids (and sampled rows' q) leave it.
        device = self.runner.device
        device_sampling, uniforms = sampling.to(device), uniforms.to(device)
        for j in range(k):
            logits = self.vocabulary.proposable(logits)
            if all_greedy:  # ids suffice: no [b, V] probabilities to build and hand over
                tokens = sampler.greedy_tokens(logits[:, None], device_sampling.at(j))[:, 0]
            else:
                step_probs = sampler.processed_probs(logits[:, None], device_sampling.at(j))[:, 0]
                tokens = sampler.sample(step_probs, uniforms[:, j])
                probs.append(self.vocabulary.expand(step_probs))
            ids.append(self.vocabulary.to_target(tokens))
            # FlexDraft's cut on the draft's own (untempered) top-1 probabilities, so that greedy
            # rows, whose processed distribution is one-hot, are cut alike. Every row keeps its first
            # token: the step that drew it is paid for. Any cut is lossless: it depends on the
            # draft alone, and the target then samples the next token itself.
            if work.confidence_threshold > 0:  # with no cut, every confidence passes: skip the softmax
                confidence *= logits.softmax(-1).amax(-1).cpu()
                drafting &= (confidence >= work.confidence_threshold) | (j == 0)
            lengths[drafting] = j + 1
            drafting &= caps > j + 1
            if not drafting.any():  # the last draft never needs to be fed: its successor is the target's
                break
            logits = self.proposer.next(j + 1, tokens)
        steps = int(lengths.max())  # a token drawn after every row stopped is no one's draft
        return Drafts(torch.stack(ids, 1)[:, :steps].cpu(), torch.stack(probs, 1)[:, :steps] if probs else None,
                      lengths.tolist(), catch_up_seconds, self.proposer.cached_drafts(steps))

    def _prefill_long_feeds(self, cache, rows: list[DraftRow]) -> list[int]:
        """Rows that just joined feed their whole context: run it as a sub-batch so that the
        common one-or-two-token feeds of everyone else carry no padding. A row that starts from
        nothing first takes what the prefix cache holds of it (not a feature draft: its inputs are
        the target's states too)."""
        long_rows = [i for i, r in enumerate(rows) if len(r.feed) > 2]
        lens = [r.cached_len for r in rows]
        if not long_rows:
            return lens
        feeds = {i: self.vocabulary.to_draft(rows[i].feed[:-2]) for i in long_rows}
        if not self.proposer.reads_features:
            for i in long_rows:
                if lens[i] == 0:
                    matched = cache.attach_prefix(i, feeds[i], len(feeds[i]))
                    lens[i], feeds[i] = matched, feeds[i][matched:]
        fed = [i for i in long_rows if feeds[i]]
        if fed:
            embeds = [self.proposer.catch_up_embeds(i, feeds[i]) for i in fed]
            self.runner.fill(cache, fed, [lens[i] for i in fed], [feeds[i] for i in fed],
                             embeds=None if embeds[0] is None else embeds)
        for i in long_rows:
            lens[i] += len(feeds[i])
        return lens


def is_feature_draft(path: str) -> bool:
    return (Path(path) / FEATURE_PROJECTION_FILE).is_file()


def build_draft_model(path: str, device: str, dtype: str, num_rows: int, capacity: int, eos_token_ids,
                      target_vocab_size: int, quantization: str = "none", enforce_eager: bool = True,
                      pool: PoolSpec | None = None, static_step_rows: tuple[int, ...] = ()) -> DraftModel:
    """`static_step_rows` (`compile_sizes`): row counts whose one-token draft steps run as static-shape
    graphs with frozen weights (a sequential draft on CPU; the others feed wider shapes). A
    drafting's first forward feeds two tokens only after a verification accepted every draft: it
    keeps the regional graph."""
    # torch's CPU weight-only kernels have fast code for bfloat16 activations only.
    dtype = "bfloat16" if quantization != "none" and device == "cpu" else dtype
    model = quantize_linears(load_model(path, device, dtype), quantization)
    mask_token_id = getattr(model.config, PARALLEL_DRAFT_KEY, None)  # as vLLM's parallel drafting reads it
    feature_draft = is_feature_draft(path)
    sequential = not feature_draft and mask_token_id is None
    static_shapes = tuple((rows, 1) for rows in static_step_rows) if sequential else ()
    runner = ModelRunner(model, num_rows, capacity, enforce_eager=enforce_eager, pool=pool,
                         static_shapes=static_shapes)
    if feature_draft:
        weights = load_file(Path(path) / FEATURE_PROJECTION_FILE, device=str(model.device))
        proposer = FeatureProposer(runner, (weights["weight"].to(model.dtype), weights["bias"].to(model.dtype)))
    elif mask_token_id is not None:
        proposer = ParallelProposer(runner, mask_token_id)
    else:
        proposer = SequentialProposer(runner)
    return DraftModel(runner, eos_token_ids, DraftVocabulary.load(path, target_vocab_size), proposer)
