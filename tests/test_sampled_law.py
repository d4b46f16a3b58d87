"""Sampled output follows the target's law under speculation with k = 3 drafts per verification,
in SD, PSD and flex with confidence cuts, and after faults: a drafter killed mid-run and an
exception injected in the middle of a PSD step (which once left the drafter's replies one
step behind, for good).

Each test runs seeded requests (deterministic) whose first verification drafts 3 tokens, and
compares the joint law of the first two sampled tokens with the target's exact one (chi-square).
"""
import pytest
from engine_helpers import make_engine, two_token_pvalue

PROMPT = "def add(a, b):"
DRAWS = 3000
K = 3
# max_tokens 4 leaves room for 3 drafts at the first verification (it adds one token of its own).
PARAMS = {"max_tokens": K + 1, "temperature": 1.3, "top_k": 40, "top_p": 0.95, "ignore_eos": True}


def run_seeded(engine, fault=None):
    """First two tokens of DRAWS seeded requests. `fault(engine, step)` may break things at a step;
    a step that raises ends its running requests as the serving loop does (they are left out)."""
    for i in range(DRAWS):
        engine.submit(str(i), PROMPT, {**PARAMS, "seed": i})
    tokens, failed_steps, step = {}, 0, 0
    while engine.has_work():
        if fault is not None:
            fault(engine, step)
        step += 1
        try:
            outputs = engine.step()
        except RuntimeError:
            failed_steps += 1
            for batch in engine.scheduler.batches:
                for seq in batch.seqs:
                    engine.cancel(seq.request_id)
            continue
        for out in outputs:
            if out.finish_reason in ("cancelled", "error"):
                tokens.pop(out.request_id, None)
                continue
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    pairs = {}
    for ids in tokens.values():
        pairs[tuple(ids[:2])] = pairs.get(tuple(ids[:2]), 0) + 1
    return pairs, failed_steps


def assert_follows_law(pairs, target_model):
    model, tokenizer = target_model
    total = sum(pairs.values())
    assert total > 0.9 * DRAWS
    assert two_token_pvalue(pairs, model, tokenizer, PROMPT, PARAMS) > 0.01


def record_draft_lengths(engine):
    """Wrap verification to see how many drafts each row brought."""
    lengths = []
    verify = engine._verify

    def recording(batch, drafts):
        lengths.extend(drafts.lengths.tolist())
        return verify(batch, drafts)
    engine._verify = recording
    return lengths


@pytest.mark.parametrize("draft", ["noisy_draft", "parallel_draft", "feature_draft"])
@pytest.mark.parametrize("mode,drafter", [("sd", "inline"), ("psd", "process")])
def test_sampled_law_with_three_drafts(tiny_pair, target_model, mode, drafter, draft, request):
    """Sequential drafts, parallel ones (all k from one forward: q_i does not depend on the drafts
    before it, and the rule stays exact), and feature drafts (q from the target's states)."""
    engine = make_engine(tiny_pair[0], request.getfixturevalue(draft), mode=mode, drafter=drafter, max_num_seqs=32,
                         num_draft_tokens=K)
    lengths = record_draft_lengths(engine)
    try:
        pairs, _ = run_seeded(engine)
    finally:
        engine.close()
    # A feature draft drafts once the target has read the prompt: in SD (prompt read in the step
    # that verifies) from the second verification on, whose first draft decides the second token.
    assert max(lengths) == K or (draft == "feature_draft" and mode == "sd" and max(lengths) == K - 1)
    assert_follows_law(pairs, target_model)


def test_sampled_law_through_the_compiled_forward(tiny_pair, noisy_draft, target_model):
    """`enforce_eager: false`: both models' steps through the compiled forward and packed layers."""
    engine = make_engine(tiny_pair[0], noisy_draft, mode="sd", drafter="inline", max_num_seqs=32,
                         num_draft_tokens=K, enforce_eager=False)
    assert engine.target.compiled is not None and engine.drafter.draft_model.runner.compiled is not None
    lengths = record_draft_lengths(engine)
    try:
        pairs, _ = run_seeded(engine)
    finally:
        engine.close()
    assert max(lengths) == K
    assert_follows_law(pairs, target_model)


def test_sampled_law_under_flex_with_confidence_cuts(tiny_pair, noisy_draft, target_model):
    from test_flex import scripted_choices
    engine = make_engine(tiny_pair[0], noisy_draft, mode="flex", drafter="inline", max_num_seqs=32,
                         num_draft_tokens=K, draft_confidence_threshold=0.5)
    scripted_choices(engine, every=2)
    runs = []
    run = engine.drafter.draft_model.run

    def recording(work):
        drafts = run(work)
        runs.extend(zip(drafts.lengths, (row.max_tokens for row in work.rows)))
        return drafts
    engine.drafter.draft_model.run = recording
    try:
        pairs, _ = run_seeded(engine)
    finally:
        engine.close()
    assert any(length < cap for length, cap in runs), "the confidence threshold never cut a draft"
    assert any(length == K for length, _ in runs)
    assert_follows_law(pairs, target_model)


def test_sampled_law_after_the_drafter_is_killed(tiny_pair, noisy_draft, target_model):
    engine = make_engine(tiny_pair[0], noisy_draft, mode="psd", drafter="process", max_num_seqs=32,
                         num_draft_tokens=K)

    def kill(engine, step):
        if step == 6:
            engine.drafter.process.kill()
    try:
        pairs, _ = run_seeded(engine, kill)
        assert engine.num_drafter_failures >= 1
    finally:
        engine.close()
    assert_follows_law(pairs, target_model)


def test_sampled_law_after_an_exception_in_the_middle_of_a_psd_step(tiny_pair, noisy_draft, target_model):
    """Verification raises while the other batch's drafts are in flight; later steps must pair every
    batch with its own drafts (work items are numbered; the engine forgets uncollected drafts)."""
    engine = make_engine(tiny_pair[0], noisy_draft, mode="psd", drafter="process", max_num_seqs=32,
                         num_draft_tokens=K)
    verify = engine._verify
    calls = {"n": 0}

    def failing_once(batch, drafts):
        calls["n"] += 1
        if calls["n"] in (5, 9):
            raise RuntimeError("injected: out of memory")
        return verify(batch, drafts)
    engine._verify = failing_once
    try:
        pairs, failed_steps = run_seeded(engine)
        overlapped = sum(1 for record in engine.step_log if record.draft_slot is not None)
    finally:
        engine.close()
    assert failed_steps == 2
    assert overlapped > 0
    assert_follows_law(pairs, target_model)
