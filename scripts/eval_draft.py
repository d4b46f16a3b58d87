"""Measure a draft against its target, in one run: greedy acceptance per draft token at k drafts
per verification on held-out prompts (by category, through the chat template), and the cost of
one draft forward against one target forward at batch 1 on one core.

  python scripts/eval_draft.py --out model_repository/smollm2/1/draft/eval.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minedraft import Engine, EngineConfig
from minedraft.drafter import DraftRow, DraftWork, build_draft_model, is_feature_draft
from minedraft.model_runner import ModelRunner, load_config, load_model

ROOT = Path(__file__).resolve().parents[1]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"


def acceptance(target: str, draft: str, prompts: list[dict], k: int, max_tokens: int) -> dict:
    engine = Engine(EngineConfig(target_model=target, draft_model=draft, mode="sd", drafter="inline",
                                 num_draft_tokens=k, max_num_seqs=8, max_model_len=2048))
    texts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    # Acceptance by draft position: wrap verification to see each row's drafts and its accepted count.
    by_position = [[0, 0] for _ in range(k)]
    verify = engine._verify

    def recording(batch):
        verdict = verify(batch)
        for seq, n in zip(batch.seqs, verdict.accepted.tolist()):
            for position in range(len(seq.draft_ids)):
                by_position[position][0] += 1
                by_position[position][1] += position < n
        return verdict
    engine._verify = recording
    outputs = engine.generate(texts, {"max_tokens": max_tokens, "temperature": 0})
    engine.close()
    categories = {}
    for prompt, out in zip(prompts, outputs):
        drafted, accepted = categories.get(prompt["category"], (0, 0))
        categories[prompt["category"]] = (drafted + out.num_drafted_tokens, accepted + out.num_accepted_tokens)
    drafted = sum(d for d, _ in categories.values())
    accepted = sum(a for _, a in categories.values())
    return {"k": k, "max_tokens": max_tokens, "prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "alpha": round(accepted / drafted, 4),
            "alpha_by_category": {c: round(a / d, 4) for c, (d, a) in sorted(categories.items())},
            "acceptance_by_position": [round(a / n, 4) if n else None for n, a in by_position],
            "sample_answer": {"prompt": prompts[0]["prompt"], "answer": outputs[0].text_delta}}


def forward_seconds(path: str, target_vocab_size: int, context: int = 64, repeats: int = 60) -> float:
    """Median time of one single-token forward at batch 1 after `context` cached tokens (for a
    feature draft, with its input projection)."""
    if not is_feature_draft(path):
        return model_forward_seconds(load_model(path, "cpu", "float32"), context, repeats)
    draft = build_draft_model(path, "cpu", "float32", 1, context + 8, (), target_vocab_size)
    state = torch.randn(1, draft.runner.model.config.hidden_size)
    return model_forward_seconds(draft.runner.model, context, repeats, with_hidden=True,
                                 embeds=[draft._pair_embeds([7], state)])


def model_forward_seconds(model, context: int = 64, repeats: int = 60, **step_inputs) -> float:
    """The same for a model in memory, run by the engine's ModelRunner; `step_inputs` go to the
    timed forward."""
    runner = ModelRunner(model, 1, context + 8)
    cache = runner.new_cache()
    runner.forward(cache, [0], [0], [list(range(5, 5 + context))], last_only=True)
    return median_seconds(lambda: runner.forward(cache, [0], [context], [[7]], last_only=True, **step_inputs), repeats)


def median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def drafting_seconds(path: str, target_vocab_size: int, k: int, context: int = 64, repeats: int = 30) -> float:
    """Median time of one whole drafting of k tokens at batch 1 after `context` cached tokens: k draft
    forwards for a sequential draft or a feature draft (whose first feeds the pairs of the last
    verification, two here), one for a parallel draft."""
    draft = build_draft_model(path, "cpu", "float32", 1, context + k + 8, (), target_vocab_size)
    hidden_size = draft.runner.model.config.hidden_size

    def work(cached_len, feed):
        # A feature draft reads the target's state before each fed token (none before position 0).
        states = (np.random.randn(len(feed) - (cached_len == 0), hidden_size).astype(np.float32)
                  if draft.projection is not None else None)
        return DraftWork(0, [], [DraftRow(cached_len, feed, 0.0, 0, 1.0, 0, [0.5] * k, k, states)], k)
    draft.run(work(0, list(range(5, 5 + context))))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        draft.run(work(context, [7, 8]))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(VERSION_DIR / "target"))
    parser.add_argument("--draft", default=str(VERSION_DIR / "draft"))
    parser.add_argument("--prompts", type=Path, default=VERSION_DIR / "heldout_prompts.jsonl")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompts = [json.loads(line) for line in args.prompts.open()]
    torch.set_num_threads(1)
    # Interleaved, so that both models see the same machine state.
    target_vocab_size = load_config(args.target).vocab_size
    target_times, draft_times, drafting_times = [], [], []
    for _ in range(3):
        target_times.append(forward_seconds(args.target, target_vocab_size))
        draft_times.append(forward_seconds(args.draft, target_vocab_size))
        drafting_times.append(drafting_seconds(args.draft, target_vocab_size, args.k))
    cost = {"target_forward_ms": round(1000 * min(target_times), 2), "draft_forward_ms": round(1000 * min(draft_times), 2),
            "draft_over_target": round(min(draft_times) / min(target_times), 4),
            f"drafting_{args.k}_tokens_ms": round(1000 * min(drafting_times), 2),
            "how": "batch 1, one new token after 64 cached, one core, float32, median of 60, best of 3 interleaved; "
                   "a drafting is k tokens (k forwards, or one for a parallel draft), median of 30"}
    torch.set_num_threads(2)
    report = {"cost": cost, "greedy": acceptance(args.target, args.draft, prompts, args.k, args.max_tokens)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
