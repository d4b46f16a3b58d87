"""The engine: `LLMEngine`-style step loop (`llm_engine.Engine`), the builder that assembles its
parts from an `EngineConfig`, the output builder (finishing, detokenising, log-probabilities), the
step records that policies and metrics read, and the step thread's cores.

Owns: the requests' lifecycle from submit to their last output, and the target's KV caches of the
internal batches. May import the root's shared types and `model`, `drafting` and `policy`; nothing
here imports Triton or `serving`.
"""
