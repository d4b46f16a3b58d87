"""The drafter in its own worker process (ProcessDrafter): its replies stay matched to their work
after a failed step, sampled drafts are copied out of its shared buffer, and when it dies, hangs or
cannot start, the target decodes alone (losslessly, without stalling) while it is replaced."""
import signal
import time

import torch
from engine_helpers import PROMPTS, make_engine, reference_greedy
from minedraft.drafting.draft_model import build_draft_model
from minedraft.drafting.drafter import DraftRow, DraftWork
from minedraft.drafting.process import ProcessDrafter


def draft_work(tokenizer, slot, prompts, k=3):
    rows = [DraftRow(0, tokenizer(p).input_ids, 1.0, 0, 1.0, 0, [0.3] * k, k) for p in prompts]
    return DraftWork(slot, [], rows, k)


# -- the drafter's replies stay matched to their work ---------------------------------------------
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
        verify, verified = engine._verify, []

        def checking(batch, drafts):
            if drafts.probs is not None:
                assert drafts.probs.untyped_storage().data_ptr() != engine.drafter.probs.untyped_storage().data_ptr()
                verified.append(batch.slot)
            return verify(batch, drafts)
        engine._verify = checking
        for _ in range(12):
            engine.step()
        assert verified
    finally:
        engine.close()


# -- restarts do not stall decoding --------------------------------------------------------------
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
    monkeypatch.setattr("minedraft.drafting.process.python_executable", lambda: "/bin/false")  # every respawn dies
    try:
        engine.drafter.process.kill()
        outs = engine.generate(PROMPTS[:4], {"max_tokens": 20, "temperature": 0, "ignore_eos": True})
        for prompt, out in zip(PROMPTS, outs):
            assert out.new_token_ids == reference_greedy(model, tokenizer, prompt, 20, ignore_eos=True)[1]
        assert engine.num_drafter_failures >= 2  # the kill, then a respawn that died while starting
        assert engine.num_drafter_failures < 10  # respawns back off instead of spinning
    finally:
        engine.close()
