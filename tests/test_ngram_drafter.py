"""Prompt-lookup (n-gram) drafting: what it proposes, its configuration, and the sampled law at
k = 3 (its greedy identity is in test_engine.py's lossless matrix)."""
import pytest
from engine_helpers import make_engine, two_token_pvalue
from minedraft import ConfigError, EngineConfig
from minedraft.drafting.ngram import propose
from test_sampled_law import record_draft_lengths


@pytest.mark.parametrize("context,expected", [
    ([1, 2, 3, 9, 1, 2, 3], [9, 1, 2]),  # the longest n (3) that occurs
    ([1, 2, 7, 5, 2, 8, 2], [8, 2]),  # n = 1, its latest earlier occurrence
    ([4, 5, 6], []),  # nothing repeats
    ([3, 3], [3]),  # the continuation may run into the end of the context
    ([7], []),
])
def test_propose_follows_the_latest_longest_match(context, expected):
    assert propose(context, 3, 1, 3) == expected


def test_propose_respects_the_cap_and_the_shortest_n():
    context = [1, 2, 3, 4, 5, 6, 1]
    assert propose(context, 2, 1, 3) == [2, 3]
    assert propose(context, 2, 2, 3) == []


def test_ngram_drafting_needs_mode_sd_and_no_draft_model(tiny_pair):
    target, _ = tiny_pair
    config = EngineConfig(target_model=target, draft_model="/nowhere", mode="sd", draft_method="ngram")
    config.validate()
    for bad in ({"mode": "psd"}, {"draft_method": "lookup"}, {"prompt_lookup_min": 3, "prompt_lookup_max": 2}):
        with pytest.raises(ConfigError):
            EngineConfig.from_dict({"target_model": target, "mode": "sd", "draft_method": "ngram", **bad})


def test_sampled_output_follows_the_targets_law(tiny_pair, target_model):
    """A prompt whose last tokens occur earlier, so that the first verification brings 3 drafts."""
    model, tokenizer = target_model
    prompt = "x = 1\ny = 2\nx = 1\ny = 2\nx ="
    params = {"max_tokens": 4, "temperature": 1.3, "top_k": 40, "top_p": 0.95, "ignore_eos": True}
    engine = make_engine(tiny_pair[0], "", mode="sd", draft_method="ngram", num_draft_tokens=3, max_num_seqs=16)
    lengths = record_draft_lengths(engine)
    try:
        outs = engine.generate([prompt] * 3000, [{**params, "seed": i} for i in range(3000)])
    finally:
        engine.close()
    assert lengths.count(3) >= 3000
    pairs = {}
    for out in outs:
        pairs[tuple(out.new_token_ids[:2])] = pairs.get(tuple(out.new_token_ids[:2]), 0) + 1
    assert two_token_pvalue(pairs, model, tokenizer, prompt, params) > 0.01
