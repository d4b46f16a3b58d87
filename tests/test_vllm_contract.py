"""vllm_backend's sampling keys and outputs in the engine: log-probabilities exact under
speculation, stop_token_ids, include_stop_str_in_output, skip_special_tokens."""
import pytest
import torch

from engine_helpers import PROMPTS, make_engine, reference_greedy


@pytest.mark.parametrize("mode,drafter", [("sd", "inline"), ("psd", "process")])
def test_logprobs_are_the_targets_own_under_speculation(tiny_pair, noisy_draft, target_model, mode, drafter):
    """Each emitted token's log-probability and top alternatives equal the target's log-softmax on
    exactly the tokens before it, whether the token was an accepted draft or the target's own."""
    model, tokenizer = target_model
    engine = make_engine(tiny_pair[0], noisy_draft, mode=mode, drafter=drafter)
    try:
        outs = engine.generate(PROMPTS[:4], {"max_tokens": 16, "temperature": 0.8, "seed": 3, "logprobs": 3,
                                             "ignore_eos": True})
    finally:
        engine.close()
    assert sum(o.num_accepted_tokens for o in outs) > 0
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt).input_ids + out.new_token_ids
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert len(out.logprobs) == len(out.new_token_ids)
        total = 0.0
        for i, (token, entry) in enumerate(zip(out.new_token_ids, out.logprobs)):
            expected = reference[len(ids) - len(out.new_token_ids) - 1 + i]
            assert entry[token]["logprob"] == pytest.approx(float(expected[token]), abs=1e-4)
            assert entry[token]["rank"] == int((expected > expected[token]).sum()) + 1
            top = expected.topk(3).indices.tolist()
            assert set(top) <= set(entry)
            total += entry[token]["logprob"]
        assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_stop_token_ids_end_a_request(tiny_pair, target_model):
    model, tokenizer = target_model
    greedy = reference_greedy(model, tokenizer, PROMPTS[3], 20, ignore_eos=True)[1]
    stop_id = greedy[4]
    engine = make_engine(*tiny_pair, mode="sd")
    try:
        out = engine.generate([PROMPTS[3]], {"max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                             "stop_token_ids": [stop_id]})[0]
    finally:
        engine.close()
    cut = greedy.index(stop_id) + 1
    assert out.finish_reason == "stop" and out.new_token_ids == greedy[:cut]
    assert out.text_delta == tokenizer.decode(greedy[:cut - 1], skip_special_tokens=True)


def test_include_stop_str_in_output_and_skip_special_tokens(tiny_pair):
    engine = make_engine(*tiny_pair, mode="sd")
    try:
        free = engine.generate([PROMPTS[0]], {"max_tokens": 24, "temperature": 0, "ignore_eos": True})[0]
        text = free.text_delta
        stop = text[len(text) // 2:len(text) // 2 + 2]
        assert stop.strip()
        kept = engine.generate([PROMPTS[0]], {"max_tokens": 24, "temperature": 0, "ignore_eos": True,
                                              "stop": [stop], "include_stop_str_in_output": True})[0]
        cut = engine.generate([PROMPTS[0]], {"max_tokens": 24, "temperature": 0, "ignore_eos": True,
                                             "stop": [stop]})[0]
        specials = engine.generate([PROMPTS[0]], {"max_tokens": 24, "temperature": 0, "ignore_eos": True,
                                                  "skip_special_tokens": False})[0]
        eos_text = engine.tokenizer.eos_token
    finally:
        engine.close()
    assert cut.text_delta == text[:text.find(stop)]
    assert kept.text_delta == text[:text.find(stop) + len(stop)]
    assert eos_text not in free.text_delta and free.new_token_ids == specials.new_token_ids
    assert (eos_text in specials.text_delta) == (engine.eos_token_ids[0] in free.new_token_ids)
