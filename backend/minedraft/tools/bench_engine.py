"""In-process benchmark: AR vs SD vs PSD output-token throughput, closed loop, no Triton.

    python -m minedraft.tools.bench_engine [--concurrency 1 2 4 8 16 32] [--draft-lengths 2 4 6 8] [--chat]
        [--modes ar sd psd] [--compiled [--compile-sizes 1]] [--dtype float32] [--out FILE]

Each mode gets one engine; concurrency is the number of requests kept in flight, and the
draft length is set per request (num_draft_tokens), so one engine serves the whole sweep.
SD and PSD are compared at their best draft length per concurrency. Prints JSON.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

from minedraft.config import DEFAULT_MODEL_DIR, MODE_TRAITS, EngineConfig
from minedraft.engine.llm_engine import Engine
from minedraft.prompts import PROMPT_SETS, prompts_path

from .setups import best_by_tokens_per_s


def load_prompts(path: Path, limit: int | None = None) -> list[str]:
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    return prompts[:limit] if limit else prompts


def chat_prompts(prompts: list[str], target: Path) -> list[str]:
    """Each prompt as a user turn through the target's chat template, as a chat client sends it."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(target)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def measure(engine: Engine, prompts: list[str], concurrency: int, num_draft_tokens: int, max_tokens: int,
            num_requests: int) -> dict:
    """Keep `concurrency` requests in flight until `num_requests` finished; time the whole run."""
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "num_draft_tokens": num_draft_tokens}
    submitted = finished = tokens = drafted = accepted = 0
    started = time.perf_counter()
    while finished < num_requests:
        while submitted < num_requests and submitted - finished < concurrency:
            engine.submit(f"b{submitted}", prompts[submitted % len(prompts)], params)
            submitted += 1
        for out in engine.step():
            if out.finished:
                finished += 1
                tokens += out.num_output_tokens
                drafted += out.num_drafted_tokens
                accepted += out.num_accepted_tokens
    elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "num_draft_tokens": num_draft_tokens, "requests": num_requests,
            "output_tokens": tokens, "drafted_tokens": drafted, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None}


def engine_for(mode: str, max_concurrency: int, max_draft: int, model_dir: Path, **overrides) -> Engine:
    per_batch = math.ceil(max_concurrency / 2) if MODE_TRAITS[mode].two_batches else max_concurrency
    weights = {"target_model": str(model_dir / "target"), "draft_model": str(model_dir / "draft"), **overrides}
    return Engine(EngineConfig(mode=mode, num_draft_tokens=max_draft if mode != "ar" else 0, max_num_seqs=per_batch,
                               **weights))


def sweep(concurrencies, draft_lengths, max_tokens, model_dir: Path, prompts, requests_per_level=2, progress=print,
          modes=("ar", "sd", "psd"), **overrides):
    """`overrides`: EngineConfig fields for every engine (devices, drafter kind, another draft)."""
    results = {mode: [] for mode in modes}
    for mode in results:
        engine = engine_for(mode, max(concurrencies), max(draft_lengths), model_dir, **overrides)
        lengths = [0] if mode == "ar" else draft_lengths
        measure(engine, prompts, 2, lengths[0], 8, 2)  # warm-up
        for c in concurrencies:
            for k in lengths:
                row = measure(engine, prompts, c, k, max_tokens, max(requests_per_level * c, 8))
                progress(f"{mode:>3} c={c:<3} k={k} {row['tokens_per_s']:8.1f} tok/s  acceptance={row['acceptance_rate']}")
                results[mode].append(row)
        engine.close()
    return results


def best_by_concurrency(rows: list[dict]) -> dict[int, dict]:
    """The fastest row at each concurrency, in the order the concurrencies first appear."""
    concurrencies = dict.fromkeys(row["concurrency"] for row in rows)
    return {c: best_by_tokens_per_s([r for r in rows if r["concurrency"] == c]) for c in concurrencies}


def ratio_table(results: dict) -> list[dict]:
    ar, sd, psd = (best_by_concurrency(results[m]) for m in ("ar", "sd", "psd"))
    return [{"concurrency": c, "ar_tok_s": ar[c]["tokens_per_s"], "sd_tok_s": sd[c]["tokens_per_s"],
             "sd_k": sd[c]["num_draft_tokens"], "psd_tok_s": psd[c]["tokens_per_s"], "psd_k": psd[c]["num_draft_tokens"],
             "sd_over_ar": round(sd[c]["tokens_per_s"] / ar[c]["tokens_per_s"], 3),
             "psd_over_ar": round(psd[c]["tokens_per_s"] / ar[c]["tokens_per_s"], 3),
             "psd_over_sd": round(psd[c]["tokens_per_s"] / sd[c]["tokens_per_s"], 3)}
            for c in sorted(ar)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--draft-lengths", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompts", default="demo_pair",
                        help=f"a prompt set ({', '.join(PROMPT_SETS)}) or a JSONL of {{\"prompt\": ...}} (default: demo_pair)")
    parser.add_argument("--chat", action="store_true", help="send the prompts through the target's chat template")
    parser.add_argument("--draft", help="another draft for the same target (default: the model dir's draft)")
    parser.add_argument("--compiled", action="store_true", help="enforce_eager false: the compiled forward")
    parser.add_argument("--compile-sizes", default="",
                        help="with --compiled: the static step graphs of the target and draft (compile_sizes, e.g. 1)")
    parser.add_argument("--modes", nargs="+", default=["ar", "sd", "psd"], choices=["ar", "sd", "psd"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--draft-quantization", default="none")
    parser.add_argument("--target-quantization", default="none")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    prompts = load_prompts(prompts_path(args.prompts))
    if args.chat:
        prompts = chat_prompts(prompts, args.model_dir / "target")
    overrides = {"draft_model": args.draft} if args.draft else {}
    overrides.update(enforce_eager=not args.compiled, dtype=args.dtype, draft_quantization=args.draft_quantization,
                     target_quantization=args.target_quantization, compile_sizes=args.compile_sizes)
    results = sweep(args.concurrency, args.draft_lengths, args.max_tokens, args.model_dir, prompts, modes=args.modes,
                    **overrides)
    report = {"cpus": len(os.sched_getaffinity(0)), "max_tokens": args.max_tokens, "compiled": args.compiled,
              "compile_sizes": args.compile_sizes, "target_quantization": args.target_quantization, "dtype": args.dtype,
              "results": results}
    if set(args.modes) == {"ar", "sd", "psd"}:
        report["ratios"] = ratio_table(results)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(json.dumps(report.get("ratios", results), indent=2))


if __name__ == "__main__":
    main()
