"""`scripts/gpu_check.sh`: what a CUDA machine tells us about the engine, in one command, in minutes.

Needs PyTorch with CUDA and transformers; no tritonserver, no hub. Its inputs are this checkout
and the toy pair (model_repository/minedraft/1, 15 MB); the realistic sizes get random weights.

  1. losslessness on the device: greedy output of AR, SD and PSD equals HF greedy decoding of the
     target alone, and sampled output follows the target's law (chi-square of the first two
     sampled tokens, SD and PSD, k = 3);
  2. an in-process AR/SD/PSD sweep with the toy pair, the drafter inline on its own CUDA stream;
  3. forward costs t_verify(b, k) and t_draft(b) of two pairs of realistic sizes with random
     weights (costs do not depend on the weights): a 1B/68M Llama pair in float16 and the shipped
     Qwen2.5-Coder 1.5B/0.5B pair's shapes in bfloat16, each fed to `minedraft simulate` for
     predicted AR/SD/PSD/flex throughput.

On a GPU, losslessness and the Qwen-shaped pair's costs are checked again with `enforce_eager`
false: the compact forward compiled, its steps replayed as CUDA graphs (model/cuda_graphs.py).

It writes a markdown report (docs/gpu.md). `--dry-run` runs the same code on the CPU at toy
sizes, so the tests can check the script without a GPU.
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from minedraft.config import DEFAULT_MODEL_DIR, EngineConfig
from minedraft.engine.llm_engine import Engine
from minedraft.policy.calibration import measure_step_costs
from minedraft.prompts import PROMPT_SETS

from .bench_engine import load_prompts, ratio_table, sweep
from .law import reference_greedy, two_token_pvalue
from .simulate import predict, prediction_table

GREEDY_PROMPTS = ["def add(a, b):", "class Point:\n", "import os", "for i in range(10):", "print(", "while True:\n"]
LAW_PROMPT = "def add(a, b):"
LAW_DRAFTS = 3
LAW_PARAMS = {"max_tokens": LAW_DRAFTS + 1, "temperature": 1.3, "top_k": 40, "top_p": 0.95, "ignore_eos": True}


@dataclass(frozen=True)
class CostPair:
    """A target and a draft of given shapes (transformers config keys), timed with random weights."""
    name: str
    model_type: str
    dtype: str
    target_shape: dict
    draft_shape: dict


@dataclass(frozen=True)
class Plan:
    """How big each part is: the real check, or the CPU dry run the tests execute."""
    device: str
    law_draws: int
    sweep_concurrency: tuple[int, ...]
    sweep_draft_lengths: tuple[int, ...]
    sweep_max_tokens: int
    cost_pairs: tuple[CostPair, ...]
    cost_batch: int
    cost_max_k: int
    simulate_concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    simulate_alphas: tuple[float, ...] = (0.6, 0.8)
    # Checked again with enforce_eager false (on a GPU: compiled, steps as CUDA graphs).
    compiled_greedy_modes: tuple[str, ...] = ()
    compiled_cost_pairs: tuple[CostPair, ...] = ()


# 1B target (Llama-3.2-1B's shape with a 32k vocabulary) and a 68M draft (llama-68m's shape); the
# shipped pair's shapes (Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct's config.json).
LLAMA_1B_68M = CostPair("Llama 1B / 68M", "llama", "float16",
                        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
                        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                             num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False))
QWEN_CODER_PAIR = CostPair("Qwen2.5-Coder 1.5B / 0.5B shapes", "qwen2", "bfloat16",
                           dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
                           dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True))
GPU_PLAN = Plan("cuda", 3000, (1, 2, 4, 8, 16, 32), (2, 4, 6), 64, (LLAMA_1B_68M, QWEN_CODER_PAIR),
                cost_batch=32, cost_max_k=8, compiled_greedy_modes=("ar", "sd", "psd"),
                compiled_cost_pairs=(QWEN_CODER_PAIR,))
TOY_SHAPES = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False))
DRY_RUN_PLAN = Plan("cpu", 400, (1, 2), (2,), 8,
                    (CostPair("toy llama", "llama", "float32", *TOY_SHAPES),
                     CostPair("toy qwen2", "qwen2", "float32", *TOY_SHAPES)),
                    cost_batch=4, cost_max_k=3, simulate_concurrency=(1, 4))


def toy_engine(plan: Plan, mode: str, **overrides) -> Engine:
    return Engine(EngineConfig(
        target_model=str(DEFAULT_MODEL_DIR / "target"), draft_model=str(DEFAULT_MODEL_DIR / "draft"), mode=mode,
        num_draft_tokens=0 if mode == "ar" else LAW_DRAFTS, target_device=plan.device, draft_device=plan.device,
        drafter="inline", max_model_len=256, **overrides))


def toy_target(plan: Plan):
    """The toy pair's target alone, in HF, on the device: the reference for both checks."""
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR / "target").to(plan.device).eval()
    return model, AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "target")


def check_greedy(plan: Plan, model, tokenizer) -> dict:
    """Each mode's greedy output against HF's greedy decoding of the target alone, on the device."""
    expected = [reference_greedy(model, tokenizer, p, 32, ignore_eos=True)[1] for p in GREEDY_PROMPTS]
    results = {}
    runs = [(mode, True) for mode in ("ar", "sd", "psd")] + [(mode, False) for mode in plan.compiled_greedy_modes]
    for mode, enforce_eager in runs:
        engine = toy_engine(plan, mode, max_num_seqs=4, enforce_eager=enforce_eager)
        try:
            outputs = engine.generate(GREEDY_PROMPTS, {"max_tokens": 32, "temperature": 0, "ignore_eos": True})
        finally:
            engine.close()
        results[mode if enforce_eager else f"{mode} compiled"] = sum(o.new_token_ids == e
                                                                     for o, e in zip(outputs, expected))
    return {"prompts": len(GREEDY_PROMPTS), "identical": results,
            "passed": all(n == len(GREEDY_PROMPTS) for n in results.values())}


def check_law(plan: Plan, model, tokenizer) -> dict:
    """Seeded sampled requests whose first verification carries 3 drafts: the joint law of their
    first two tokens against the target's exact one."""
    pvalues = {}
    for mode in ("sd", "psd"):
        engine = toy_engine(plan, mode, max_num_seqs=32)
        try:
            outputs = engine.generate([LAW_PROMPT] * plan.law_draws,
                                      [{**LAW_PARAMS, "seed": i} for i in range(plan.law_draws)])
        finally:
            engine.close()
        pairs = {}
        for o in outputs:
            pairs[tuple(o.new_token_ids[:2])] = pairs.get(tuple(o.new_token_ids[:2]), 0) + 1
        pvalues[mode] = two_token_pvalue(pairs, model, tokenizer, LAW_PROMPT, LAW_PARAMS)
    return {"draws": plan.law_draws, "k": LAW_DRAFTS, "pvalues": pvalues, "passed": min(pvalues.values()) > 0.01}


def toy_sweep(plan: Plan) -> list[dict]:
    prompts = load_prompts(PROMPT_SETS["demo_pair"])
    results = sweep(plan.sweep_concurrency, plan.sweep_draft_lengths, plan.sweep_max_tokens, DEFAULT_MODEL_DIR,
                    prompts, progress=lambda line: print(line, flush=True),
                    target_device=plan.device, draft_device=plan.device, drafter="inline")
    return ratio_table(results)


def forward_costs(plan: Plan, pair: CostPair, workdir: Path, enforce_eager: bool = True):
    """t_verify(b, k) and t_draft(b) of a random-weight pair, timed by the engine's own calibration
    (the same code flex runs at start-up)."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "target")
    for name, shape in (("target", pair.target_shape), ("draft", pair.draft_shape)):
        config = AutoConfig.for_model(pair.model_type, **shape, max_position_embeddings=2048)
        with torch.device(plan.device):
            model = AutoModelForCausalLM.from_config(config).to(getattr(torch, pair.dtype))
        model.save_pretrained(workdir / name)
        tokenizer.save_pretrained(workdir / name)
        del model
    engine = Engine(EngineConfig(target_model=str(workdir / "target"), draft_model=str(workdir / "draft"), mode="sd",
                                 num_draft_tokens=plan.cost_max_k, max_num_seqs=plan.cost_batch, max_model_len=256,
                                 target_device=plan.device, draft_device=plan.device, dtype=pair.dtype,
                                 drafter="inline", enforce_eager=enforce_eager))
    try:
        return measure_step_costs(engine.target, engine.target_caches[0], engine.drafting.sequential_drafter,
                                  plan.cost_max_k, plan.cost_batch, engine.eos_token_ids)
    finally:
        engine.close()


def predictions(plan: Plan, costs) -> dict[float, str]:
    k_values = list(range(1, plan.cost_max_k + 1))
    return {alpha: prediction_table([r for c in plan.simulate_concurrency
                                     for r in predict(costs, alpha, c, 128, 64, k_values, plan.cost_batch)])
            for alpha in plan.simulate_alphas}


def environment(plan: Plan) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": plan.device}
    if plan.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def report(plan: Plan, env: dict, greedy: dict, law: dict, ratios: list[dict], measured: list, seconds: float) -> str:
    """`measured`: (pair, forward path, costs, predictions) for each cost pair and path."""
    verdict = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    lines = ["# GPU check", "",
             f"Written by `bash scripts/gpu_check.sh{' --dry-run' if plan.device == 'cpu' else ''}` "
             f"in {seconds:.0f} s. Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
             "## Losslessness on the device", "",
             f"- Greedy identity with HF greedy decoding of the target alone ({greedy['prompts']} prompts, 32 tokens): "
             + ", ".join(f"{m} {n}/{greedy['prompts']}" for m, n in greedy["identical"].items())
             + f": **{verdict(greedy['passed'])}**",
             f"- Sampled law, first two tokens of {law['draws']} seeded requests, k = {law['k']}: "
             + ", ".join(f"{m} p = {p:.3g}" for m, p in law["pvalues"].items())
             + f" (pass: p > 0.01): **{verdict(law['passed'])}**", "",
             "## Toy pair in-process sweep (drafter inline, its own CUDA stream on a GPU)", "",
             "| c | AR tok/s | SD tok/s (k) | PSD tok/s (k) | SD/AR | PSD/AR | PSD/SD |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['ar_tok_s']} | {r['sd_tok_s']} ({r['sd_k']}) | {r['psd_tok_s']} ({r['psd_k']}) "
              f"| {r['sd_over_ar']} | {r['psd_over_ar']} | {r['psd_over_sd']} |" for r in ratios]
    shape = lambda s: f"{s['num_hidden_layers']} layers x {s['hidden_size']}, vocabulary {s['vocab_size']}"  # noqa: E731
    for pair, path, costs, predicted in measured:
        lines += ["", f"## Forward costs: {pair.name}, random weights, {pair.dtype}, {path}", "",
                  f"Target: {shape(pair.target_shape)}; draft: {shape(pair.draft_shape)}. Milliseconds, context 64.",
                  "", "| rows | " + " | ".join(f"verify k={k}" for k in range(costs.max_k + 1)) + " | draft step |",
                  "|---" * (costs.max_k + 3) + "|"]
        lines += [f"| {b} | " + " | ".join(f"{1e3 * t:.2f}" for t in costs.verify[i])
                  + f" | {1e3 * costs.draft[i]:.2f} |" for i, b in enumerate(costs.batch_sizes)]
        lines += ["", "Costs as JSON (`minedraft simulate --costs`):", "", "```json", costs.to_json(), "```", ""]
        for alpha, text in predicted.items():
            lines += [f"### {pair.name} ({path}): `minedraft simulate` on these costs, alpha {alpha}, "
                      "128 output tokens after 64 prompt tokens", "", "```", text, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes (what the tests run)")
    parser.add_argument("--out", type=Path, default=Path("docs/gpu.md"))
    args = parser.parse_args(argv)
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to PyTorch; --dry-run runs it on the CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    env = environment(plan)
    print(json.dumps(env), flush=True)
    model, tokenizer = toy_target(plan)
    greedy = check_greedy(plan, model, tokenizer)
    print(f"greedy identity: {greedy}", flush=True)
    law = check_law(plan, model, tokenizer)
    del model
    print(f"sampled law: {law}", flush=True)
    ratios = toy_sweep(plan)
    measured = []
    runs = [(pair, True) for pair in plan.cost_pairs] + [(pair, False) for pair in plan.compiled_cost_pairs]
    for pair, enforce_eager in runs:
        with tempfile.TemporaryDirectory() as workdir:
            costs = forward_costs(plan, pair, Path(workdir), enforce_eager)
        path = "eager" if enforce_eager else "compiled, steps as CUDA graphs"
        print(f"{pair.name} ({path}): {costs.to_json()}", flush=True)
        measured.append((pair, path, costs, predictions(plan, costs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(plan, env, greedy, law, ratios, measured, time.monotonic() - started))
    print(f"wrote {args.out}", flush=True)
    return 0 if greedy["passed"] and law["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
