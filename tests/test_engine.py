"""The engine without Triton: losslessness in every mode and with per-request draft counts, overlap,
per-request seeds, float32-safe sampling parameters, request handling: bounded inputs and the ways a
request ends."""
import json
import shutil
import time

import pytest
import torch
from engine_helpers import PROMPTS, make_engine, reference_greedy, run_staggered
from minedraft import ConfigError, EngineConfig, InvalidRequest

MODES = [("ar", "auto"), ("sd", "inline"), ("psd", "process"), ("psd", "inline")]
# The lossless matrix: every mode and drafter with the toy draft, and prompt lookup (no draft model).
LOSSLESS = [(mode, drafter, "model") for mode, drafter in MODES] + [("sd", "auto", "ngram")]


def top2_gap(model, context):
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("mode,drafter,draft_method", LOSSLESS)
def test_greedy_output_is_token_identical_to_the_target(tiny_pair, target_model, mode, drafter, draft_method):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode=mode, drafter=drafter, draft_method=draft_method)
    try:
        results = run_staggered(engine, PROMPTS, {"max_tokens": 24, "temperature": 0})
        accepted = engine.spec_stats.num_accepted_tokens
    finally:
        engine.close()
    if mode != "ar":
        assert accepted > 0  # (prompt lookup: the repetitive prompts and answers)
    divergences = []
    for i, prompt in enumerate(PROMPTS):
        prompt_ids, expected = reference_greedy(model, tokenizer, prompt, 24)
        got = results[str(i)][0]
        if got != expected:
            at = next(j for j, (a, b) in enumerate(zip(got + [None], expected + [None])) if a != b)
            gap = top2_gap(model, prompt_ids + expected[:at])
            divergences.append((prompt, at, gap))
    print(f"{mode}/{drafter}: {len(PROMPTS)} prompts compared, divergences: {divergences}")
    assert all(gap < 1e-3 for _, _, gap in divergences), divergences


def test_identical_draft_is_always_accepted(tiny_pair):
    engine = make_engine(tiny_pair[0], tiny_pair[0], mode="sd")
    outs = engine.generate(PROMPTS[:8], {"max_tokens": 20, "temperature": 0, "ignore_eos": True})
    engine.close()
    assert sum(o.num_drafted_tokens for o in outs) > 0
    assert all(o.num_accepted_tokens == o.num_drafted_tokens for o in outs)
    # The per-step count behind minedraft_generation_tokens_total adds up to what the requests got.
    assert engine.num_generated_tokens == sum(o.num_output_tokens for o in outs) == 8 * 20


NEWCOMER = "def add(a, b):\n    return a + b\n" * 2  # 42 tokens with the tiny tokenizer


def test_per_request_zero_drafts_beside_newcomers_is_lossless(tiny_pair, target_model):
    """The reported path: a request with num_draft_tokens 0 builds a backlog in the draft cache."""
    model, tokenizer = target_model
    assert 30 < len(tokenizer(NEWCOMER).input_ids) < 56
    # Capacity 64 + 3 + 2 = 69, as in the report. "quiet" drafts nothing; the drafter catches its
    # cache up when new10 drafts beside it, and new45's prompt arrives when quiet has a backlog
    # again and sits near the end of its cache.
    engine = make_engine(*tiny_pair, mode="sd", max_model_len=64, num_draft_tokens=3, max_num_seqs=4)
    try:
        engine.submit("quiet", PROMPTS[0], {"max_tokens": 56, "temperature": 0, "num_draft_tokens": 0,
                                            "ignore_eos": True})
        results = {}
        for step in range(200):
            if step in (35, 45):
                engine.submit(f"new{step}", NEWCOMER, {"max_tokens": 8, "temperature": 0, "ignore_eos": True})
            for out in engine.step():
                results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if not engine.has_work():
                break
        assert engine.num_drafter_failures == 0
        quiet = results["quiet"]  # ends at max_model_len, a few tokens short of max_tokens
        assert len(quiet) > 50 and quiet == reference_greedy(model, tokenizer, PROMPTS[0], 56, ignore_eos=True)[1][:len(quiet)]
        assert results["new35"] == reference_greedy(model, tokenizer, NEWCOMER, 8, ignore_eos=True)[1]
        assert results["new45"] == reference_greedy(model, tokenizer, NEWCOMER, 8, ignore_eos=True)[1]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A target big enough that one verification outlasts the drafter's IPC round trip."""
    from conftest import build_llama, build_tokenizer
    root = tmp_path_factory.mktemp("mid")
    build_llama(root, build_tokenizer(root), hidden=256, layers=4, seed=5)
    return str(root)


def test_psd_drafting_overlaps_verification(mid_model):
    engine = make_engine(mid_model, mid_model, mode="psd", drafter="process", max_num_seqs=8)
    engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(32)], {"max_tokens": 40, "temperature": 0,
                                                                      "ignore_eos": True})
    engine.close()
    paired = [r for r in engine.step_log if r.draft_slot is not None and r.draft_span]
    overlapping = [r for r in paired if r.draft_span[0] < r.verify_span[1] and r.verify_span[0] < r.draft_span[1]]
    print(f"{len(overlapping)}/{len(paired)} paired steps overlap, of {len(engine.step_log)} steps")
    assert len(paired) > 10
    assert len(overlapping) > 0.5 * len(paired)


def test_stream_deltas_concatenate_to_the_full_text(tiny_pair):
    engine = make_engine(*tiny_pair, mode="sd")
    tokenizer = engine.tokenizer
    results = run_staggered(engine, PROMPTS[:12], {"max_tokens": 30, "temperature": 0.9, "seed": 7})
    engine.close()
    for i in range(12):
        tokens, text = results[str(i)]
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_max_tokens_eos_min_tokens_and_stop(tiny_pair):
    engine = make_engine(*tiny_pair, mode="sd")
    eos = engine.eos_token_ids[0]
    free = engine.generate(PROMPTS[:6], {"max_tokens": 64, "temperature": 0})
    assert {o.finish_reason for o in free} <= {"eos", "length"}
    ended = [o for o in free if o.finish_reason == "eos"]
    assert ended, "the tiny target should end some prompts with EOS"
    assert all(o.new_token_ids[-1] == eos and eos not in o.new_token_ids[:-1] for o in ended)
    assert all(len(o.new_token_ids) == 64 for o in free if o.finish_reason == "length")
    prompt = next(p for p, o in zip(PROMPTS, free) if o.finish_reason == "eos")
    shortest = min(len(o.new_token_ids) for o in ended)
    held = engine.generate([prompt], {"max_tokens": 64, "temperature": 0, "min_tokens": shortest + 5})[0]
    assert eos not in held.new_token_ids[:shortest + 5]
    ignored = engine.generate([prompt], {"max_tokens": 40, "temperature": 0, "ignore_eos": True})[0]
    assert len(ignored.new_token_ids) == 40 and ignored.finish_reason == "length"
    text = free[0].text_delta
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) > 4 else None
    if stop:
        stopped = engine.generate([PROMPTS[0]], {"max_tokens": 64, "temperature": 0, "stop": [stop]})[0]
        assert stopped.finish_reason == "stop" and stopped.text_delta == text[:text.find(stop)]
    engine.close()


def test_every_eos_id_of_the_generation_config_ends_a_request(tiny_pair, tmp_path, target_model):
    model, tokenizer = target_model
    target = tmp_path / "target"
    shutil.copytree(tiny_pair[0], target)
    greedy = reference_greedy(model, tokenizer, PROMPTS[0], 12)[1]
    extra_eos = greedy[1]
    assert extra_eos != tokenizer.eos_token_id and extra_eos not in greedy[:1]
    config = json.loads((target / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, extra_eos]
    (target / "generation_config.json").write_text(json.dumps(config))
    engine = make_engine(str(target), tiny_pair[1], mode="sd")
    try:
        out = engine.generate([PROMPTS[0]], {"max_tokens": 12, "temperature": 0})[0]
    finally:
        engine.close()
    assert out.finish_reason == "eos"
    assert out.new_token_ids == greedy[:greedy.index(extra_eos) + 1]


def test_a_stop_string_waits_for_min_tokens(tiny_pair):
    engine = make_engine(*tiny_pair, mode="sd")
    try:
        free = engine.generate([PROMPTS[0]], {"max_tokens": 20, "temperature": 0, "ignore_eos": True})[0]
        stop = free.text_delta[:2]
        assert stop.strip()
        early = engine.generate([PROMPTS[0]], {"max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                               "stop": [stop]})[0]
        held = engine.generate([PROMPTS[0]], {"max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                              "stop": [stop], "min_tokens": 6})[0]
    finally:
        engine.close()
    assert early.finish_reason == "stop" and early.num_output_tokens < 6
    assert held.num_output_tokens >= 6


def test_mixed_sampling_parameters_in_one_batch(tiny_pair, target_model):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="psd", drafter="inline")
    params = [{"max_tokens": 16, "temperature": 0},
              {"max_tokens": 16, "temperature": 1.0, "top_p": 0.8, "seed": 1},
              {"max_tokens": 16, "temperature": 0.7, "top_k": 5, "seed": 2},
              {"max_tokens": 16, "temperature": 0, "num_draft_tokens": 1},
              {"max_tokens": 16, "temperature": 0, "num_draft_tokens": 0}] * 2
    outs = engine.generate(PROMPTS[:10], params)
    again = engine.generate(PROMPTS[:10], params)
    engine.close()
    for prompt, p, out, out2 in zip(PROMPTS, params, outs, again):
        if p["temperature"] == 0:
            assert out.new_token_ids == reference_greedy(model, tokenizer, prompt, 16)[1]
        else:
            assert out.new_token_ids == out2.new_token_ids  # same seed, same tokens
    assert outs[4].num_drafted_tokens == 0


def test_extreme_parameters_are_greedy_or_refused(tiny_pair, target_model):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="sd")
    try:
        greedy = reference_greedy(model, tokenizer, PROMPTS[0], 12, ignore_eos=True)[1]
        base = {"max_tokens": 12, "ignore_eos": True}
        for extreme in ({"temperature": 1e-39}, {"temperature": 0.7, "top_p": 1e-50}):
            out = engine.generate([PROMPTS[0]], {**base, **extreme})[0]
            assert out.new_token_ids == greedy, extreme
        with pytest.raises(InvalidRequest, match="temperature"):
            engine.submit("hot", PROMPTS[0], {**base, "temperature": 1e39, "min_tokens": 4})
    finally:
        engine.close()


@pytest.mark.parametrize("mode,drafter", [("sd", "inline"), ("psd", "process")])
def test_a_seeded_request_does_not_depend_on_its_neighbours(tiny_pair, noisy_draft, mode, drafter):
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    engine = make_engine(tiny_pair[0], noisy_draft, mode=mode, drafter=drafter, max_num_seqs=8)
    try:
        alone = engine.generate([PROMPTS[3]], params)[0].new_token_ids
        crowd = [PROMPTS[3]] + PROMPTS[10:17]
        crowd_params = [params] + [{"max_tokens": 5 + 3 * i, "temperature": 0.9, "ignore_eos": True}
                                   for i in range(7)]
        crowded = engine.generate(crowd, crowd_params)[0].new_token_ids
    finally:
        engine.close()
    assert crowded == alone


def test_cancel_frees_the_slot(tiny_pair):
    engine = make_engine(*tiny_pair, mode="psd", drafter="inline", max_num_seqs=2)
    for i in range(4):
        engine.submit(f"r{i}", PROMPTS[i], {"max_tokens": 200, "temperature": 0, "ignore_eos": True})
    for _ in range(3):
        engine.step()
    assert engine.num_free_slots == 0
    engine.cancel("r1")
    engine.cancel("r3")
    outs = engine.step()
    assert {o.request_id for o in outs if o.finish_reason == "cancelled"} == {"r1", "r3"}
    assert engine.num_free_slots == 2
    engine.submit("next", PROMPTS[5], {"max_tokens": 5, "temperature": 0})
    finished = {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o.finish_reason
        if "next" in finished:
            break
    assert finished["next"] == "length"
    engine.close()


@pytest.mark.parametrize("params,message", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"bogus": 1}, "unknown"), ({"max_tokens": "three"}, "integer"),
    ({"stop": [1]}, "stop"), ({"min_tokens": 99, "max_tokens": 4}, "min_tokens"),
])
def test_invalid_requests_are_rejected_at_submit(tiny_pair, params, message):
    engine = make_engine(*tiny_pair, mode="ar")
    with pytest.raises(InvalidRequest, match=message):
        engine.submit("bad", "x", params)
    with pytest.raises(InvalidRequest, match="max_model_len"):
        engine.submit("long", list(range(1, 10)) * 40, {})
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit("empty", "", {})
    assert engine.generate(["x"], {"max_tokens": 2})[0].num_output_tokens == 2
    engine.close()


def test_a_huge_prompt_is_refused_before_it_is_tokenized(tiny_pair):
    engine = make_engine(*tiny_pair, mode="ar")
    try:
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match="characters"):
            engine.submit("huge", "x" * 4_000_000, {})
        assert time.monotonic() - started < 0.5
    finally:
        engine.close()


def test_a_prompt_that_tokenizes_to_nothing_is_refused(tiny_pair, monkeypatch):
    engine = make_engine(*tiny_pair, mode="ar")
    try:
        tokenize = engine.tokenizer.__class__.__call__
        monkeypatch.setattr(engine.tokenizer.__class__, "__call__",
                            lambda self, text, **kw: tokenize(self, "" if text == "\u200b" else text, **kw))
        with pytest.raises(InvalidRequest, match="no tokens"):
            engine.submit("blank", "\u200b", {})
    finally:
        engine.close()


def test_mismatched_vocabularies_are_refused(tiny_pair, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="vocabulary"):
        make_engine(tiny_pair[0], str(tmp_path), mode="sd")


def test_a_reduced_vocabulary_may_add_a_mask_token_only_in_a_parallel_draft(tmp_path):
    """d2t maps N draft ids: the draft may have N + 1 ids (the unmapped-token input), and a parallel
    draft one more for its mask token."""
    from minedraft.engine.builder import check_vocabularies
    (tmp_path / "d2t.json").write_text(json.dumps(list(range(10))))
    check_vocabularies(None, str(tmp_path), 100, 11)
    check_vocabularies(None, str(tmp_path), 100, 12, is_parallel=True)
    with pytest.raises(ConfigError, match="maps 10 ids"):
        check_vocabularies(None, str(tmp_path), 100, 12)


def test_config_rejects_unknown_and_invalid_keys(tiny_pair):
    with pytest.raises(ConfigError, match="bogus"):
        EngineConfig.from_dict({"bogus": "1"})
    with pytest.raises(ConfigError, match="mode"):
        EngineConfig.from_dict({"mode": "fast"})
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig.from_dict({"max_num_seqs": "many"})


def test_drafter_process_death_falls_back_losslessly_and_restarts(tiny_pair, target_model):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="psd", drafter="process")
    for i in range(8):
        engine.submit(str(i), PROMPTS[i], {"max_tokens": 30, "temperature": 0})
    results = {}
    for step in range(400):
        if step == 4:
            engine.drafter.process.kill()
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
        if not engine.has_work():
            break
    assert engine.num_drafter_failures >= 1
    assert engine.drafter.process.poll() is None  # restarted
    for i in range(8):
        assert results[str(i)] == reference_greedy(model, tokenizer, PROMPTS[i], 30)[1]
    while not engine.drafter.ready:  # the new worker loads in the background
        time.sleep(0.05)
    after = engine.generate(PROMPTS[:2], {"max_tokens": 10, "temperature": 0})
    assert sum(o.num_drafted_tokens for o in after) > 0  # speculating again
    engine.close()


def test_a_failing_request_does_not_disturb_its_batch(tiny_pair):
    engine = make_engine(*tiny_pair, mode="sd")

    append = engine.outputs.append

    def failing_append(seq, tokens):
        if seq.request_id == "gen-1" and seq.num_generated > 3:
            raise RuntimeError("injected")
        return append(seq, tokens)
    engine.outputs.append = failing_append
    outs = engine.generate(PROMPTS[:4], {"max_tokens": 12, "temperature": 0, "ignore_eos": True})
    engine.close()
    assert outs[1].finish_reason == "error" and "injected" in outs[1].error
    assert all(o.finish_reason == "length" and o.num_output_tokens == 12 for i, o in enumerate(outs) if i != 1)


@pytest.mark.parametrize("mode,drafter", [("sd", "inline"), ("psd", "process")])
def test_a_parallel_draft_drafts_in_one_forward_and_stays_lossless(tiny_pair, parallel_draft, target_model, mode,
                                                                    drafter):
    """A draft whose config names a mask token (`pard_token`) drafts all k tokens in one forward:
    its pending tokens and k - 1 masks. Greedy output still equals the target's."""
    model, tokenizer = target_model
    engine = make_engine(tiny_pair[0], parallel_draft, mode=mode, drafter=drafter)
    draftings = []
    if drafter == "inline":  # count the draft model's forwards per drafting, in this process
        draft_model = engine.drafting.drafter.draft_model
        forward, run = draft_model.runner.forward, draft_model.run
        calls = []
        draft_model.runner.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
        draft_model.run = lambda work: (calls.clear(), run(work), draftings.append(len(calls)))[1]
    try:
        results = run_staggered(engine, PROMPTS, {"max_tokens": 24, "temperature": 0})
        drafted = engine.spec_stats.num_drafted_tokens
    finally:
        engine.close()
    for i, prompt in enumerate(PROMPTS):
        assert results[str(i)][0] == reference_greedy(model, tokenizer, prompt, 24)[1], prompt
    assert drafted > 0
    if drafter == "inline":
        assert draftings and set(draftings) == {1}, draftings


@pytest.mark.parametrize("mode,drafter", [("sd", "inline"), ("psd", "process")])
def test_a_feature_draft_reads_the_targets_states_and_stays_lossless(tiny_pair, feature_draft, target_model, mode,
                                                                     drafter):
    """A feature draft (EAGLE: `feature_projection.safetensors` in its directory) drafts from the
    target's last hidden states. The engine keeps them per request; at every commit they equal a
    fresh forward of the target over the tokens its cache holds, and the fixture's draft, which
    proposes the target's argmax from the state it reads, always proposes the row's last generated
    token: states and tokens are paired at the right positions. Greedy output equals the target's."""
    model, tokenizer = target_model
    engine = make_engine(tiny_pair[0], feature_draft, mode=mode, drafter=drafter)
    checked, first_drafts = [], []

    verify, append = engine._verify, engine.outputs.append

    def check_drafts(batch, drafts):
        for seq, ids, n in zip(batch.seqs, drafts.ids.tolist(), drafts.lengths.tolist()):
            if n and seq.num_generated:  # a prompt's last token need not be the target's argmax
                first_drafts.append((ids[0], seq.token_ids[-1]))
        return verify(batch, drafts)

    def check_states(seq, tokens):  # at each commit, once the verification is booked
        appended = append(seq, tokens)
        cached = seq.num_target_cached_tokens
        if len(seq.token_ids) < cached:  # finished inside the accepted drafts: the cache holds more than the output
            return appended
        with torch.no_grad():
            states = model.model(input_ids=torch.tensor([seq.token_ids[:cached]])).last_hidden_state[0]
        torch.testing.assert_close(seq.target_features.span(0, cached), states, atol=1e-4, rtol=1e-4)
        checked.append(cached)
        return appended
    engine._verify, engine.outputs.append = check_drafts, check_states
    try:
        results = run_staggered(engine, PROMPTS, {"max_tokens": 24, "temperature": 0})
        stats = engine.spec_stats
    finally:
        engine.close()
    for i, prompt in enumerate(PROMPTS):
        assert results[str(i)][0] == reference_greedy(model, tokenizer, prompt, 24)[1], prompt
    assert len(checked) > len(PROMPTS) and len(first_drafts) > len(PROMPTS)
    assert all(draft == last for draft, last in first_drafts)
    assert 0 < stats.num_accepted_tokens < stats.num_drafted_tokens
