"""Faults found by review (issue 14), each pinned by a test: the drafter protocol after a failed
step, the draft cache's capacity under padding, bounded inputs, float32-safe parameters,
per-request seeds, drafter restarts, and the ways a request may end."""
import json
import shutil
import signal
import time

import pytest
import torch

from engine_helpers import PROMPTS, make_engine, reference_greedy
from minedraft import InvalidRequest
from minedraft.draft_model import build_draft_model
from minedraft.drafter import DraftRow, DraftWork
from minedraft.process_drafter import ProcessDrafter
from minedraft.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams


def draft_work(tokenizer, slot, prompts, k=3):
    rows = [DraftRow(0, tokenizer(p).input_ids, 1.0, 0, 1.0, 0, [0.3] * k, k) for p in prompts]
    return DraftWork(slot, [], rows, k)


# -- 1. the drafter's replies stay matched to their work ------------------------------------------
def test_an_unread_reply_is_skipped_not_taken_for_the_next_work(tiny_pair):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    vocab = len(tokenizer)
    eos = (tokenizer.eos_token_id,)
    worker = ProcessDrafter(tiny_pair[1], "cpu", "float32", 4, 128, eos, vocab, 3, set())
    reference = build_draft_model(tiny_pair[1], "cpu", "float32", 4, 128, eos, vocab)
    try:
        first = draft_work(tokenizer, 0, PROMPTS[:2])
        second = draft_work(tokenizer, 1, PROMPTS[2:5])
        worker.start(first)  # its reply is never read, as when verification raised mid-step
        worker.start(second)
        drafts = worker.finish()
        expected = reference.run(second)
        assert drafts.lengths == expected.lengths
        assert torch.equal(drafts.ids, expected.ids)
        assert torch.allclose(drafts.probs, expected.probs)
    finally:
        worker.close()


def test_an_unread_error_reply_does_not_fail_the_next_work(tiny_pair):
    """Work that failed in the worker, whose reply was never read (its step raised first), is
    skipped by number like any stale reply: the next work's drafts come back, no restart."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    eos = (tokenizer.eos_token_id,)
    worker = ProcessDrafter(tiny_pair[1], "cpu", "float32", 4, 128, eos, len(tokenizer), 3, set())
    try:
        worker.start(draft_work(tokenizer, 7, PROMPTS[:2]))  # no batch slot 7: the worker replies with an error
        second = draft_work(tokenizer, 1, PROMPTS[2:5])
        worker.start(second)
        drafts = worker.finish()
        assert drafts.lengths == [3, 3, 3] and drafts.ids.shape == (3, 3)
    finally:
        worker.close()


def test_sampled_drafts_are_copied_out_of_the_drafters_buffer(tiny_pair):
    engine = make_engine(*tiny_pair, mode="psd", drafter="process", max_num_seqs=4)
    try:
        for i in range(8):
            engine.submit(str(i), PROMPTS[i], {"max_tokens": 20, "temperature": 1.0, "seed": i})
        checked = 0
        for _ in range(12):
            engine.step()
            for batch in engine.scheduler.batches:
                for seq in batch.seqs:
                    if seq.draft_probs is not None:
                        shared = engine.drafter.probs.untyped_storage().data_ptr()
                        assert seq.draft_probs.untyped_storage().data_ptr() != shared
                        checked += 1
        assert checked > 0
    finally:
        engine.close()


# -- 3. padding never writes past the draft cache -------------------------------------------------
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


# -- 5. bounded inputs ----------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_before_it_is_tokenized(tiny_pair):
    engine = make_engine(*tiny_pair, mode="ar")
    try:
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match="characters"):
            engine.submit("huge", "x" * 4_000_000, {})
        assert time.monotonic() - started < 0.5
    finally:
        engine.close()


@pytest.mark.parametrize("stop,message", [
    (["a"] * (MAX_STOP_STRINGS + 1), "at most"), (["a" * (MAX_STOP_CHARS + 1)], "characters")])
def test_stop_strings_are_bounded(stop, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams.from_dict({"stop": stop})
    assert SamplingParams.from_dict({"stop": ["a" * MAX_STOP_CHARS] * MAX_STOP_STRINGS}).stop


# -- 6. parameters float32 sampling can honour --------------------------------------------------
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


# -- 8. a seed gives the same output whatever runs beside it -----------------------------------
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


# -- 9. drafter restarts do not stall decoding ------------------------------------------------------
def test_a_restarting_drafter_does_not_stall_the_target(tiny_pair, target_model, monkeypatch):
    """The new worker loads in the background while the target decodes alone."""
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="psd", drafter="process")
    slow_spawn = engine.drafter._spawn

    def spawn_slowly():  # a model that takes 3 s to load
        slow_spawn()
        engine.drafter.process.send_signal(signal.SIGSTOP)
        resume_at.append(time.monotonic() + 3)
    resume_at = []
    monkeypatch.setattr(engine.drafter, "_spawn", spawn_slowly)
    try:
        for i in range(4):
            engine.submit(str(i), PROMPTS[i], {"max_tokens": 30, "temperature": 0, "ignore_eos": True})
        results, longest_step = {}, 0.0
        for step in range(300):
            if step == 3:
                engine.drafter.process.kill()
            if resume_at and time.monotonic() > resume_at[0]:
                engine.drafter.process.send_signal(signal.SIGCONT)
            started = time.monotonic()
            for out in engine.step():
                results.setdefault(out.request_id, []).extend(out.new_token_ids)
            longest_step = max(longest_step, time.monotonic() - started)
            if not engine.has_work():
                break
        assert engine.num_drafter_failures == 1
        assert longest_step < 1.0
        for i in range(4):
            assert results[str(i)] == reference_greedy(model, tokenizer, PROMPTS[i], 30, ignore_eos=True)[1]
    finally:
        if resume_at:
            engine.drafter.process.send_signal(signal.SIGCONT)
        engine.close()


def test_a_hung_drafter_times_out_and_is_replaced(tiny_pair, target_model):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="psd", drafter="process")
    engine.drafter.reply_timeout = 1.0
    try:
        for i in range(4):
            engine.submit(str(i), PROMPTS[i], {"max_tokens": 24, "temperature": 0, "ignore_eos": True})
        results = {}
        for step in range(300):
            if step == 3:
                hung = engine.drafter.process
                hung.send_signal(signal.SIGSTOP)  # alive, but never answers
            for out in engine.step():
                results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if not engine.has_work():
                break
        assert engine.num_drafter_failures == 1
        assert hung.poll() is not None  # killed, not left behind
        for i in range(4):
            assert results[str(i)] == reference_greedy(model, tokenizer, PROMPTS[i], 24, ignore_eos=True)[1]
    finally:
        engine.close()


def test_a_drafter_that_cannot_start_leaves_target_only_decoding(tiny_pair, target_model, monkeypatch):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="psd", drafter="process")
    monkeypatch.setattr("minedraft.process_drafter.python_executable", lambda: "/bin/false")  # every respawn dies
    try:
        engine.drafter.process.kill()
        outs = engine.generate(PROMPTS[:4], {"max_tokens": 20, "temperature": 0, "ignore_eos": True})
        for prompt, out in zip(PROMPTS, outs):
            assert out.new_token_ids == reference_greedy(model, tokenizer, prompt, 20, ignore_eos=True)[1]
        assert engine.num_drafter_failures >= 2  # the kill, then a respawn that died while starting
        assert engine.num_drafter_failures < 10  # respawns back off instead of spinning
    finally:
        engine.close()


# -- 10. how a request may end ----------------------------------------------------------------------
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
