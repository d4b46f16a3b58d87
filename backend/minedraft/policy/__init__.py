"""Policies over the one step loop: which batch each step verifies, which it drafts beside it,
and how many drafts a row may propose. `fixed` (AR, SD, PSD), `auto` (FlexDraft's batch-size
rule), `flex` (the per-load bandit), the cost model they share and the start-up calibration that
times the steps.

Owns: the choice of each step, as an immutable `StepPlan`. May import the root's shared types
and, for calibration only, `model.sampler` and `drafting.drafter`'s work types; never the engine.
"""
