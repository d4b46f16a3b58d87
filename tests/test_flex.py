"""Flex: its choices under synthetic costs, confidence-truncated drafts, and losslessness
whatever it chooses."""
import itertools
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import PROMPTS, make_engine, reference_greedy, run_staggered
from minedraft.drafting.draft_model import build_draft_model
from minedraft.drafting.drafter import DraftRow, DraftWork
from minedraft.policy.cost_model import Choice, StepCosts, expected_tokens
from minedraft.policy.flex import FlexPolicy, OnlineCosts, arms
from minedraft.scheduler import Batch
from minedraft.sequence import AcceptanceEstimate

SIZES = [1, 2, 4, 8, 16, 32]


def costs(draft_step: float, verify_fixed: float = 0.010, per_token: float = 0.0002, max_k: int = 8) -> StepCosts:
    """Verification: a fixed cost plus a little per scored token (rows x (1 + k)), as on a GPU."""
    verify = [[verify_fixed + per_token * b * (1 + k) for k in range(max_k + 1)] for b in SIZES]
    return StepCosts(SIZES, verify, [draft_step] * len(SIZES))


class FakeSeq:
    def __init__(self, alpha: float, prompt_tokens: int = 0, max_tokens: int = 16):
        self.acceptance = AcceptanceEstimate(alpha, prior_trials=1e9)  # pinned at alpha
        self.num_prompt_tokens = prompt_tokens
        self.token_ids = [0] * prompt_tokens
        self.num_drafted_tokens = 0
        self.params = SimpleNamespace(max_tokens=max_tokens)


def batches_with(num_requests: int, alpha: float, prompt_tokens: int = 0, max_tokens: int = 16) -> list[Batch]:
    batches = [Batch(0, 64), Batch(1, 64)]
    for i in range(num_requests):
        batches[i % 2].add(FakeSeq(alpha, prompt_tokens, max_tokens))
    return batches


def pick(step_costs: StepCosts, num_requests: int, alpha: float) -> Choice:
    policy = FlexPolicy(8, step_costs, batch_capacity=64)
    return policy.plan(batches_with(num_requests, alpha), set()) and policy.choice


def test_one_request_with_a_cheap_draft_gets_sd():
    choice = pick(costs(draft_step=0.0005), 1, alpha=0.8)
    assert choice.mode == "sd" and choice.k >= 3


def test_many_requests_whose_drafting_costs_a_fair_share_get_psd():
    # 32 rows: verifying half of them is clearly cheaper than all, and drafting k tokens costs a
    # fair share of a verification, which SD pays and PSD hides.
    choice = pick(costs(draft_step=0.002, verify_fixed=0.004, per_token=0.0001), 32, alpha=0.9)
    assert choice.mode == "psd"


def test_a_low_acceptance_gets_ar():
    assert pick(costs(draft_step=0.0005), 16, alpha=0.05).mode == "ar"


def test_a_draft_nearly_as_costly_as_the_target_gets_ar():
    # Each draft step costs 90 % of a whole verification; overlap cannot hide k of them.
    assert pick(costs(draft_step=0.009), 1, alpha=0.7).mode == "ar"
    assert pick(costs(draft_step=0.009), 16, alpha=0.7).mode == "ar"


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def drive(policy: FlexPolicy, batches, alpha: float, seconds_of, steps: int) -> list[Choice]:
    """Run the policy for `steps` steps in a measured world that the calibrated costs need not
    match: a step of choice c over `rows` verified rows takes seconds_of(c, rows) and commits
    E(alpha, k) tokens per row."""
    chosen = []
    for _ in range(steps):
        plan = policy.plan(batches, set())
        chosen.append(policy.choice)
        rows = len(plan.verify)
        seconds = seconds_of(policy.choice, rows)
        policy.observe(SimpleNamespace(
            verify_size=rows, verified_drafts=plan.num_draft_tokens, draft_slot=plan.overlap.slot if plan.overlap else None,
            verify_span=(0.0, seconds / 2), draft_runs=[], commit_seconds=0.0, seconds=seconds, prefill_seconds=0.0,
            gap_seconds=0.0, num_tokens=rows * expected_tokens(alpha, plan.num_draft_tokens)))
    return chosen


def test_flex_measures_every_choice_then_runs_the_fastest_measured():
    """The calibration says SD with long drafts; the measured steps say AR is twice as fast as
    anything else. Flex tries each choice once, then stays with what was measured fastest."""
    policy = FlexPolicy(4, costs(draft_step=0.0005), batch_capacity=64)
    batches = batches_with(4, alpha=0.8)
    policy.plan(batches, set())
    assert policy.choice.mode == "sd"  # the model's favourite is tried first

    def seconds_of(choice, rows):  # 1 ms per token with AR, 2 ms with anything else
        return 0.001 * rows * (1 if choice.mode == "ar" else 2 * expected_tokens(0.8, choice.k))
    chosen = drive(policy, batches, 0.8, seconds_of, 600)
    assert set(chosen) == {Choice("ar", 0)} | {Choice(m, k) for m in ("sd", "psd") for k in (1, 2, 4)}
    assert set(chosen[-100:]) == {Choice("ar", 0)}
    assert policy.rates.rate(Choice("ar", 0), 4) == pytest.approx(1000.0)
    assert policy.rates.rate(Choice("sd", 2), 4) == pytest.approx(500.0)


def test_flex_switches_only_for_a_clear_measured_gain():
    policy = FlexPolicy(4, costs(draft_step=0.0005), batch_capacity=64, hysteresis=0.05)
    batches = batches_with(1, alpha=0.5)
    # Tokens per second: SD(2) 3 % ahead of AR, within the hysteresis: whichever runs keeps running.
    rates = {Choice("ar", 0): 100.0, Choice("sd", 1): 80.0, Choice("sd", 2): 103.0, Choice("sd", 4): 70.0}

    def seconds_of(choice, rows):
        return rows * expected_tokens(0.5, choice.k) / rates[choice]
    drive(policy, batches, 0.5, seconds_of, 300)
    settled = policy.choice
    assert settled in (Choice("ar", 0), Choice("sd", 2))
    assert set(drive(policy, batches, 0.5, seconds_of, 300)) == {settled}
    # The other one becomes clearly faster: its next measurement (after `refresh` steps) wins it over.
    other = Choice("sd", 2) if settled.mode == "ar" else Choice("ar", 0)
    rates[other] = 150.0
    policy.refresh = 200
    chosen = drive(policy, batches, 0.5, seconds_of, 600)
    assert max(set(chosen[-300:]), key=chosen[-300:].count) == other


def test_flex_completes_a_measurement_that_a_passing_load_interrupts():
    """Two requests, one of which ends every 20 steps (a single row for 4 steps: no PSD then). Each
    try at measuring PSD is cut short; its samples must add up, not start over, or flex explores
    PSD forever (seen through the server at c = 2 on the real pair: flex 0.70x of SD)."""
    policy = FlexPolicy(1, costs(draft_step=0.0005), batch_capacity=64)
    two, one = batches_with(2, alpha=0.5), batches_with(1, alpha=0.5)
    rates = {Choice("ar", 0): 100.0, Choice("sd", 1): 150.0, Choice("psd", 1): 120.0}

    def seconds_of(choice, rows):
        return rows * expected_tokens(0.5, choice.k) / rates[choice]
    chosen = []
    for _ in range(40):
        chosen += drive(policy, two, 0.5, seconds_of, 20)
        drive(policy, one, 0.5, seconds_of, 4)
    assert policy.rates.samples(Choice("psd", 1), 2) >= policy.min_samples
    assert chosen[-200:].count(Choice("sd", 1)) > 0.8 * 200


def test_flex_bounds_the_steps_it_spends_measuring():
    """Once every choice is measured, re-measuring the others costs about (min_dwell +
    min_samples) steps each per `refresh` steps."""
    policy = FlexPolicy(4, costs(draft_step=0.0005), batch_capacity=64)
    batches = batches_with(4, alpha=0.8)
    best = Choice("psd", 2)
    chosen = drive(policy, batches, 0.8, lambda c, rows: 0.001 if c == best else 0.004, 3 * policy.refresh)
    away = sum(c != best for c in chosen[policy.refresh:]) / (2 * policy.refresh)
    others = 6  # AR, SD(1, 2, 4), PSD(1, 4)
    assert 0 < away <= 1.1 * others * (policy.min_dwell + policy.min_samples) / policy.refresh
    assert away < 0.05


def test_online_costs_follow_measurements_per_bucket():
    online = OnlineCosts(costs(draft_step=0.001), weight=0.5)
    base = online.verify_seconds(8, 2)
    online.observe_verify(8, 2, False, 2 * base)
    assert online.verify_seconds(8, 2) == pytest.approx(2 * base)
    assert online.verify_seconds(5, 3) == pytest.approx(2 * online.table.verify_seconds(5, 3))  # same bucket
    # An unseen bucket borrows the mean correction; overlapped steps are kept apart.
    assert online.verify_seconds(32, 1) == pytest.approx(2 * online.table.verify_seconds(32, 1))
    online.observe_verify(8, 2, True, 3 * base)
    assert online.verify_seconds(8, 2, overlapped=True) == pytest.approx(3 * base)
    assert online.verify_seconds(8, 2) == pytest.approx(2 * base)


def test_acceptance_estimate_converges_to_the_geometric_rate():
    generator = torch.Generator().manual_seed(0)
    estimate = AcceptanceEstimate(prior=0.5, decay=0.995)  # ~200 verifications of memory
    for _ in range(2000):
        passes = (torch.rand(4, generator=generator) < 0.7).long()
        estimate.update(4, int(passes.cumprod(0).sum()))
    assert estimate.value == pytest.approx(0.7, abs=0.05)


# -- confidence-truncated drafts ------------------------------------------------------------------
def draft_rows(prompts_ids, caps):
    # Temperature 1 without filtering: the processed distribution is the draft's softmax, so
    # the test can recompute the confidence from the returned probabilities.
    return [DraftRow(0, ids, 1.0, 0, 1.0, 0, [0.5] * max(caps), cap) for ids, cap in zip(prompts_ids, caps)]


def test_truncation_cuts_each_row_where_its_cumulative_confidence_falls_below_tau(tiny_pair):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[1])
    ids = [tokenizer(p).input_ids for p in PROMPTS[:6]]
    caps = [6, 6, 3, 6, 1, 6]
    model = build_draft_model(tiny_pair[1], "cpu", "float32", 8, 128, (tokenizer.eos_token_id,), len(tokenizer))
    full = model.run(DraftWork(0, [], draft_rows(ids, caps), 6, 0.0))
    assert full.lengths == caps  # tau 0: every row drafts to its cap
    confidence = full.probs.amax(-1).cumprod(-1)
    for tau in (0.3, 0.6, 0.9):
        cut = model.run(DraftWork(0, [], draft_rows(ids, caps), 6, tau))
        for row, cap in enumerate(caps):
            confident = int((confidence[row, :cap] >= tau).long().cumprod(0).sum())
            assert cut.lengths[row] == max(1, confident), (tau, row)
            # The same draws: truncation only shortens a row's draft.
            assert cut.ids[row, :cut.lengths[row]].tolist() == full.ids[row, :cut.lengths[row]].tolist()
        assert cut.ids.size(1) == max(cut.lengths)
    assert cut.lengths != caps  # the thresholds above did cut something


# -- losslessness whatever flex chooses -------------------------------------------------------------
CHOICES = [Choice("psd", 3), Choice("sd", 2), Choice("ar", 0), Choice("psd", 1), Choice("sd", 3), Choice("psd", 2)]


def scripted_choices(engine, every: int = 3):
    """Replace flex's judgement with a rotation through every mode and several k, switching every
    few steps: the layout moves, drafter changes and ragged drafts all get exercised."""
    rotation = itertools.cycle(CHOICES)
    state = {"choice": next(rotation), "steps": 0}

    def choose(alphas):
        state["steps"] += 1
        if state["steps"] % every == 0:
            state["choice"] = next(rotation)
        engine.policy.choice = state["choice"]
        return engine.policy.choice

    engine.policy.choose = choose


@pytest.mark.parametrize("tau,scripted", [(0.0, False), (0.3, False), (0.0, True), (0.3, True)])
def test_flex_greedy_output_is_token_identical_to_the_target(tiny_pair, target_model, tau, scripted):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="flex", drafter="process", draft_confidence_threshold=tau)
    if scripted:
        scripted_choices(engine)
    try:
        results = run_staggered(engine, PROMPTS, {"max_tokens": 24, "temperature": 0})
        modes = {mode for mode, n in engine.steps_by_mode.items() if n}
    finally:
        engine.close()
    mismatches = [p for i, p in enumerate(PROMPTS) if results[str(i)][0] != reference_greedy(model, tokenizer, p, 24)[1]]
    print(f"flex tau={tau} scripted={scripted}: modes {engine.steps_by_mode}, mismatches {mismatches}")
    assert not mismatches
    if scripted:
        assert modes == {"ar", "sd", "psd"}


def test_truncation_drafts_less_and_keeps_the_output(tiny_pair):
    params = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    outputs = {}
    for tau in (0.0, 0.3):
        engine = make_engine(*tiny_pair, mode="sd", drafter="inline", draft_confidence_threshold=tau)
        outputs[tau] = engine.generate(PROMPTS[:12], params)
        engine.close()
    drafted = {tau: sum(o.num_drafted_tokens for o in outs) for tau, outs in outputs.items()}
    print(f"drafted tokens: {drafted}")
    assert 0 < drafted[0.3] < drafted[0.0]
    assert [o.new_token_ids for o in outputs[0.3]] == [o.new_token_ids for o in outputs[0.0]]


# -- auto: FlexDraft's batch-size switch ------------------------------------------------------------
def test_auto_reads_its_rule_off_the_calibrated_costs_by_running_requests():
    from minedraft.policy.auto import AutoPolicy
    rule = AutoPolicy(8, costs(draft_step=0.0005, verify_fixed=0.010, per_token=0.00005), batch_capacity=32,
                         max_running=64)
    rule.plan(batches_with(1, alpha=0.9), set())
    assert rule.choice.mode == "sd"  # one request: nothing to overlap
    rule.plan(batches_with(64, alpha=0.9), set())
    assert rule.choice.mode == "psd"
    modes = [c.mode for _, c in rule.thresholds()]
    assert [m for i, m in enumerate(modes) if i == 0 or m != modes[i - 1]][:2] == ["sd", "psd"]  # SD, then PSD
    rule.plan(batches_with(16, alpha=0.05), set())  # a draft that is never accepted: AR at every size
    assert {c.mode for c in rule.rule} == {"ar"}
    # ... but one SD step every 8 keeps the acceptance estimates alive.
    probes = []
    for _ in range(18):
        plan = rule.plan(batches_with(16, alpha=0.05), set())
        probes.append(plan.probe)
        rule.observe(SimpleNamespace(draft_runs=[(16, 1, 0.01, False)] if plan.probe else []))
    assert probes.count(True) == 2 and rule.choice.mode == "ar"
    # ... unless the probe would make the draft read long contexts it never read (a chat turn's
    # history): 16 rows of 400 tokens at 0.5 ms a token, 3.2 s, against 8 AR steps of 13 ms each.
    rule.costs = replace(rule.costs, draft_prefill_per_token=0.0005)
    rule.steps_since_draft = 8
    assert not rule.plan(batches_with(16, alpha=0.05, prompt_tokens=400), set()).probe
    assert rule.plan(batches_with(16, alpha=0.05, prompt_tokens=2), set()).probe
    # A rule that says AR only under load does not probe: it drafts again once the load falls.
    loaded_rule = AutoPolicy(8, costs(draft_step=0.001, verify_fixed=0.010, per_token=0.0005), batch_capacity=32,
                                max_running=64, overlaps=False)
    loaded_rule.steps_since_draft = 100
    plan = loaded_rule.plan(batches_with(64, alpha=0.5), set())
    assert loaded_rule.choice.mode == "ar" and not plan.probe
    assert loaded_rule.plan(batches_with(1, alpha=0.5), set()).mode == "sd"
    assert {c.mode for c in loaded_rule.rule} == {"ar", "sd"}  # no PSD without a drafter beside the target


def test_calibration_times_the_drafts_prefill_of_contexts_it_has_not_cached(tiny_pair):
    """A calibration prefill that the draft's prefix cache answered would time only its tail."""
    engine = make_engine(*tiny_pair, mode="auto", drafter="inline")
    try:
        pool = engine.drafter.draft_model.runner.pool
        assert pool.prefix_queries > 0 and pool.prefix_hits == 0
    finally:
        engine.close()


def test_speculation_pays_the_drafts_prefill_of_newcomers():
    from minedraft.policy.cost_model import estimate
    step_costs = costs(draft_step=0.001)
    step_costs.draft_prefill_per_token = 0.0005
    sd, ar = Choice("sd", 2), Choice("ar", 0)
    # 4 rows yielding 8 tokens a step, requests of 2 prompt tokens per output token: 16 prompt
    # tokens of newcomers for the draft to prefill per step.
    plain, charged = (estimate(sd, 8.0, 4, step_costs, prompt_per_output=p) for p in (0.0, 2.0))
    assert charged.step_seconds == pytest.approx(plain.step_seconds + 16 * 0.0005)
    assert estimate(ar, 4.0, 4, step_costs, prompt_per_output=2.0) == estimate(ar, 4.0, 4, step_costs)
    psd = estimate(Choice("psd", 2), 8.0, 4, step_costs, prompt_per_output=2.0)
    assert psd.step_seconds >= step_costs.draft_seconds(2, 2) + 8 * 0.0005  # the drafter's side pays it


def test_auto_reads_its_rule_at_the_running_requests_prompt_per_output():
    from minedraft.policy.auto import AutoPolicy
    step_costs = costs(draft_step=0.001, verify_fixed=0.010, per_token=0.0002)
    step_costs.draft_prefill_per_token = 0.001
    rule = AutoPolicy(4, step_costs, batch_capacity=32, max_running=32, overlaps=False)
    short = rule.plan(batches_with(8, alpha=0.7, prompt_tokens=8, max_tokens=64), set())
    assert short.mode == "sd" and rule.rule_key == (pytest.approx(0.7), pytest.approx(2 ** -3))
    # Long prompts for short answers: the draft's prefill of each newcomer outweighs the drafts.
    long = rule.plan(batches_with(8, alpha=0.7, prompt_tokens=512, max_tokens=16), set())
    assert long.mode == "ar" and rule.rule_key == (pytest.approx(0.7), pytest.approx(32.0))


def test_auto_speculates_only_past_its_margin_over_ar():
    from minedraft.policy.auto import SPECULATION_MARGIN, pick
    ar, sd, psd = Choice("ar", 0), Choice("sd", 2), Choice("psd", 2)
    assert pick({ar: 100.0, sd: 105.0, psd: 108.0}) == ar  # predicted gains inside the margin
    assert pick({ar: 100.0, sd: 100.0 * SPECULATION_MARGIN, psd: 108.0}) == sd
    assert pick({ar: 100.0, sd: 90.0, psd: 150.0}) == psd
    assert pick({ar: 100.0, sd: 60.0}) == ar


def test_auto_greedy_output_is_token_identical_to_the_target(tiny_pair, target_model):
    model, tokenizer = target_model
    engine = make_engine(*tiny_pair, mode="auto", drafter="process")
    try:
        results = run_staggered(engine, PROMPTS, {"max_tokens": 24, "temperature": 0})
    finally:
        engine.close()
    assert all(results[str(i)][0] == reference_greedy(model, tokenizer, p, 24)[1] for i, p in enumerate(PROMPTS))
    assert sum(engine.steps_by_mode.values()) > 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_flex_measures_draft_lengths_in_powers_of_two():
    assert arms(1) == [1] and arms(2) == [1, 2] and arms(4) == [1, 2, 4] and arms(6) == [1, 2, 4, 6]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_flex_keeps_the_target_pinned_to_its_cores(tiny_pair):
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    engine = make_engine(*tiny_pair, mode="flex", drafter="process", target_cpus="0", draft_cpus="1")
    try:
        assert os.sched_getaffinity(0) == affinity  # building leaves the calling thread as it was
        engine.submit("r", PROMPTS[0], {"max_tokens": 2})
        engine.step()  # the thread that steps runs on the target's cores
        assert os.sched_getaffinity(0) == {0} and torch.get_num_threads() == 1
    finally:
        engine.close()
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
