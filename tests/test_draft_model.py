"""The draft model alone (build_draft_model): padding a drafting's rows to one feed stays within the
draft cache, and all-greedy work hands over ids only, the same ids as beside a sampled row."""
import torch
from engine_helpers import PROMPTS
from minedraft.drafting.draft_model import build_draft_model
from minedraft.drafting.drafter import DraftRow, DraftWork


# -- padding never writes past the draft cache ----------------------------------------------------
def test_a_backlog_beside_a_long_prompt_stays_within_the_cache(tiny_pair):
    """A row near the end of its cache with a 4-token backlog shares a drafting with a newcomer's
    long prompt: padding both to the longer feed once overflowed the cache ("index 69 is out of
    bounds ... size 69"). Drafts must equal those of each row drafted alone."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    eos = (tokenizer.eos_token_id,)
    capacity = 69
    model = build_draft_model(tiny_pair[1], "cpu", "float32", 2, capacity, eos, len(tokenizer))
    alone = build_draft_model(tiny_pair[1], "cpu", "float32", 2, capacity, eos, len(tokenizer))
    context = (tokenizer(PROMPTS[17]).input_ids * 8)[:capacity - 6]
    newcomer = (tokenizer(PROMPTS[10]).input_ids * 4)[:40]

    def greedy_row(cached, feed):
        return DraftRow(cached, feed, 0.0, 0, 1.0, 0, [0.5] * 2, 2)
    for m in (model, alone):  # the old row's first 59 positions are cached
        m.run(DraftWork(0, [], [greedy_row(0, context[:-4])], 1))
    both = model.run(DraftWork(0, [], [greedy_row(len(context) - 5, context[-5:]), greedy_row(0, newcomer)], 2))
    only_old = alone.run(DraftWork(0, [], [greedy_row(len(context) - 5, context[-5:])], 2))
    assert both.ids[0].tolist() == only_old.ids[0].tolist()
    fresh = build_draft_model(tiny_pair[1], "cpu", "float32", 2, capacity, eos, len(tokenizer))
    only_new = fresh.run(DraftWork(0, [], [greedy_row(0, newcomer)], 2))
    assert both.ids[1].tolist() == only_new.ids[0].tolist()


# -- greedy work builds no probabilities -----------------------------------------------------------
def test_greedy_drafts_hand_over_ids_only(tiny_pair):
    """All-greedy work builds no [b, k, V] probabilities; its ids are those the same rows get
    beside a sampled row (which takes the general path)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    model = build_draft_model(tiny_pair[1], "cpu", "float32", 4, 128, (tokenizer.eos_token_id,), len(tokenizer))
    greedy = [DraftRow(0, tokenizer(p).input_ids, 0.0, 0, 1.0, 0, [0.3] * 3, 3) for p in PROMPTS[:3]]
    sampled = DraftRow(0, tokenizer(PROMPTS[3]).input_ids, 1.0, 0, 1.0, 0, [0.3] * 3, 3)
    alone = model.run(DraftWork(0, [], greedy, 3))
    mixed = model.run(DraftWork(1, [], greedy + [sampled], 3))
    assert alone.probs is None and mixed.probs is not None
    assert torch.equal(alone.ids, mixed.ids[:3])
