"""`minedraft eval-draft`: measure a draft against its target, in one run, in-process: greedy
acceptance per draft token at k drafts per verification on held-out prompts (by category, through
the chat template), and the cost of one draft forward and of one drafting of k tokens against one
target forward at batch 1, for each draft quantization asked for.

  minedraft eval-draft --model-dir model_repository/qwen-coder/1 --dtype bfloat16 \
      --quantization none int8 int4 --out docs/bench/qwen-coder/draft-eval.json
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
from minedraft.config import QUANTIZATIONS
from minedraft.drafting.draft_model import build_draft_model, is_feature_draft
from minedraft.drafting.drafter import DraftRow, DraftWork
from minedraft.model.loading import load_config, load_model
from minedraft.model.quantization import quantize_linears
from minedraft.model.runner import ModelRunner
from minedraft.prompts import PROMPT_SETS, prompts_path

ROOT = Path(__file__).resolve().parents[3]


def acceptance(target: str, draft: str, prompts: list[dict], k: int, max_tokens: int, dtype: str = "float32",
               quantization: str = "none", batch: int = 8) -> dict:
    engine = Engine(EngineConfig(target_model=target, draft_model=draft, mode="sd", drafter="inline",
                                 num_draft_tokens=k, max_num_seqs=batch, max_model_len=2048, dtype=dtype,
                                 draft_quantization=quantization))
    texts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    # Acceptance by draft position: wrap verification to see each row's drafts and its accepted count.
    by_position = [[0, 0] for _ in range(k)]
    verify = engine._verify

    def recording(batch, drafts):
        verdict = verify(batch, drafts)
        for num_drafted, n in zip(drafts.lengths.tolist(), verdict.accepted.tolist()):
            for position in range(num_drafted):
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


def forward_seconds(path: str, target_vocab_size: int, context: int = 64, repeats: int = 60,
                    dtype: str = "float32", quantization: str = "none") -> float:
    """Median time of one single-token forward at batch 1 after `context` cached tokens (for a
    feature draft, with its input projection)."""
    if not is_feature_draft(path):
        return model_forward_seconds(quantize_linears(load_model(path, "cpu", dtype), quantization), context, repeats)
    draft = build_draft_model(path, "cpu", dtype, 1, context + 8, (), target_vocab_size, quantization)
    state = torch.randn(1, draft.runner.model.config.hidden_size, dtype=draft.runner.model.dtype)
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


def drafting_seconds(path: str, target_vocab_size: int, k: int, context: int = 64, repeats: int = 30,
                     dtype: str = "float32", quantization: str = "none") -> float:
    """Median time of one whole drafting of k tokens at batch 1 after `context` cached tokens: k draft
    forwards for a sequential draft or a feature draft (whose first feeds the pairs of the last
    verification, two here), one for a parallel draft."""
    draft = build_draft_model(path, "cpu", dtype, 1, context + k + 8, (), target_vocab_size, quantization)
    hidden_size = draft.runner.model.config.hidden_size

    def work(cached_len, feed):
        # A feature draft reads the target's state before each fed token (none before position 0).
        states = (np.random.randn(len(feed) - (cached_len == 0), hidden_size).astype(np.float32)
                  if draft.reads_features else None)
        return DraftWork(0, [], [DraftRow(cached_len, feed, 0.0, 0, 1.0, 0, [0.5] * k, k, states)], k)
    draft.run(work(0, list(range(5, 5 + context))))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        draft.run(work(context, [7, 8]))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def evaluate(args) -> int:
    prompts = [json.loads(line) for line in prompts_path(args.prompts).open()]
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    target, draft = str(args.model_dir / "target"), str(args.model_dir / "draft")
    target_vocab_size = load_config(target).vocab_size
    report = {"model_dir": str(args.model_dir), "dtype": args.dtype, "k": args.k, "cost": {}, "greedy": {}}
    for threads in [] if args.skip_costs else args.threads:
        torch.set_num_threads(threads)
        # Interleaved, so that every model sees the same machine state; the best of three rounds.
        times = {"target": [], **{q: [] for q in args.quantization}, **{f"drafting {q}": [] for q in args.quantization}}
        for _ in range(3):
            times["target"].append(forward_seconds(target, target_vocab_size, dtype=args.dtype))
            for q in args.quantization:
                times[q].append(forward_seconds(draft, target_vocab_size, dtype=args.dtype, quantization=q))
                times[f"drafting {q}"].append(drafting_seconds(draft, target_vocab_size, args.k, dtype=args.dtype,
                                                               quantization=q))
        best = {name: min(values) for name, values in times.items()}
        report["cost"][f"{threads} threads"] = {
            "target_forward_ms": round(1000 * best["target"], 2),
            **{f"draft_{q}": {"forward_ms": round(1000 * best[q], 2),
                              "over_target": round(best[q] / best["target"], 4),
                              f"drafting_{args.k}_tokens_ms": round(1000 * best[f"drafting {q}"], 2)}
               for q in args.quantization}}
        print(json.dumps(report["cost"][f"{threads} threads"]), flush=True)
    report["cost"]["how"] = None if args.skip_costs else (f"batch 1, one new token after 64 cached, {args.dtype}, median of 60, best of 3 "
                             f"interleaved; a drafting is {args.k} tokens (k forwards), median of 30")
    torch.set_num_threads(max(args.threads))
    for q in args.quantization:
        report["greedy"][q] = acceptance(target, draft, prompts, args.k, args.max_tokens, args.dtype, q, args.batch)
        print(q, json.dumps({key: report["greedy"][q][key] for key in ("alpha", "alpha_by_category")}), flush=True)
        if args.out:  # partial results as they come: each option takes minutes
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def main_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=ROOT / "model_repository" / "qwen-coder" / "1",
                        help="a version directory with target/ and draft/")
    parser.add_argument("--prompts", default="heldout",
                        help=f"a prompt set ({', '.join(PROMPT_SETS)}) or JSON lines of category, prompt (default: heldout)")
    parser.add_argument("--num-prompts", type=int, default=0, help="the first N prompts only (0: all)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=QUANTIZATIONS)
    parser.add_argument("--batch", type=int, default=8, help="requests drafted and verified together (a quantized "
                        "draft runs its quantized kernels at up to 4 rows, its bfloat16 weights above)")
    parser.add_argument("--skip-costs", action="store_true", help="measure acceptance only")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time at")
    parser.add_argument("--out", type=Path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    main_args(parser)
    return evaluate(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
