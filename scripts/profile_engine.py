"""Where does a step's time go? Time one in-process engine run, split into the target's forwards,
the draft's (forwards and the rest of drafting), sampling and acceptance, committing, and the rest
of the step (scheduling, bookkeeping, outputs).

    python scripts/profile_engine.py MODE CONCURRENCY NUM_DRAFT_TOKENS [--model-dir DIR] [--prompts FILE] [--chat] [--json OUT]

e.g. `python scripts/profile_engine.py sd 1 4 --model-dir model_repository/smollm2/1 --prompts
model_repository/smollm2/1/heldout_prompts.jsonl --chat` for the real pair. SD drafts inline, so
its drafting is inside the step; greedy, ignore_eos. Timers wrap the functions (they see the
drafter's thread, which cProfile does not); shares are of the steps' total time.
"""
import argparse
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

from minedraft import Engine, EngineConfig, sampler
from minedraft.config import DEFAULT_MODEL_DIR
from minedraft.tools.bench_engine import load_prompts, measure

SAMPLING = ("processed_probs", "greedy_tokens", "verify", "verify_greedy", "sample")


def timed(seconds: dict, name: str, fn, main_thread_only: bool = False):
    def wrapper(*args, **kwargs):
        if main_thread_only and threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
    return wrapper


def instrument(engine: Engine) -> dict:
    """Wrap the parts of a step with timers; returns the seconds they accumulate."""
    seconds = defaultdict(float)
    engine.target.forward = timed(seconds, "target forwards", engine.target.forward)
    drafter = engine.drafting.sequential_drafter
    if drafter is not None and hasattr(drafter, "draft_model"):
        model = drafter.draft_model
        model.runner.forward = timed(seconds, "draft forwards", model.runner.forward)
        model.run = timed(seconds, "drafting", model.run)
    for name in SAMPLING:  # the verification's; the drafter's thread samples as part of drafting
        if hasattr(sampler, name):  # older engines (a before/after comparison) lack some
            setattr(sampler, name, timed(seconds, "sampling and acceptance", getattr(sampler, name),
                                         main_thread_only=True))
    engine._commit = timed(seconds, "commit", engine._commit)
    engine.step = timed(seconds, "step", engine.step)
    return seconds


def breakdown(seconds: dict) -> dict:
    step = seconds["step"]
    parts = {"target forwards": seconds["target forwards"], "draft forwards": seconds["draft forwards"],
             "drafting besides forwards": seconds["drafting"] - seconds["draft forwards"],
             "sampling and acceptance": seconds["sampling and acceptance"], "commit": seconds["commit"]}
    parts["rest of the step"] = step - sum(parts.values())
    return {"step_seconds": round(step, 3), "shares": {k: round(v / step, 3) for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("num_draft_tokens", type=int)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--chat", action="store_true", help="send the prompts through the chat template")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    engine = Engine(EngineConfig(
        target_model=str(args.model_dir / "target"), draft_model=str(args.model_dir / "draft"), mode=args.mode,
        max_num_seqs=args.concurrency, num_draft_tokens=max(args.num_draft_tokens, 1),
        drafter="inline" if args.mode == "sd" else "auto"))
    prompts = load_prompts(args.prompts or args.model_dir / "prompts.jsonl")
    if args.chat:
        from minedraft.tools.bench_engine import chat_prompts
        prompts = chat_prompts(prompts, args.model_dir / "target")
    measure(engine, prompts, 2, args.num_draft_tokens, 8, 2)  # warm-up
    seconds = instrument(engine)
    run = measure(engine, prompts, args.concurrency, args.num_draft_tokens, args.max_tokens,
                  max(2 * args.concurrency, 8))
    engine.close()
    result = {"mode": args.mode, "concurrency": args.concurrency, **run, **breakdown(seconds)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
