"""Drafting: the drafter interface (`drafter`), the drafters (a draft model in the engine's
process, `inline`; in a worker process, `process` and `worker`; prompt lookup, `ngram`), a draft
model at work (`draft_model`, `proposers`, `vocabulary`), and the coordinator that owns every
piece of draft state (`coordinator.Drafting`: which drafter holds a batch's rows, each row's draft
cache length, drafts waiting for verification, row moves not yet applied to a draft cache).

May import the root's shared types and `model`; never `engine`, `policy` or `serving`.
"""
