"""Probe drafts made from the target itself, without training, against the shipped token draft:
the target's weights in int8 (dynamic quantization per tensor and per output channel, and
weight-only) and the target with layers skipped
(self-speculation). For each, in one run: top-1 agreement with the target on the target's own
greedy answers to held-out prompts (teacher-forced, so it is the acceptance of the first draft of a
chain), and the cost of one forward at batch 1 after 64 cached tokens on one core, as a fraction of
the target's. It asks whether any draft this cheap can keep the target's choices.

  python scripts/probe_self_drafts.py --out docs/self-draft-probe.json
"""
import argparse
import copy
import json
from pathlib import Path

import torch
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoModelForCausalLM, AutoTokenizer

from minedraft.drafter import DraftVocabulary

from eval_draft import model_forward_seconds

VERSION_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1"


def greedy_answers(target, tokenizer, prompts: list[dict], max_tokens: int) -> list[tuple[str, int, torch.Tensor]]:
    """(category, prompt length, prompt + the target's greedy answer) per prompt."""
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt["prompt"]}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        answer = target.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        answers.append((prompt["category"], ids.shape[1], answer))
    return answers


def agreement(model, answers, vocabulary: DraftVocabulary) -> dict:
    """Share of answer positions where the model's top-1, given the target's own prefix, is the
    target's token; by category too."""
    by_category = {}
    for category, prompt_len, ids in answers:
        logits = model(torch.tensor([vocabulary.to_draft(ids[0].tolist())]), use_cache=False).logits[0]
        guesses = vocabulary.to_target(vocabulary.proposable(logits[prompt_len - 1:-1]).argmax(-1))
        hits, total = by_category.get(category, (0, 0))
        by_category[category] = (hits + int((guesses == ids[0, prompt_len:]).sum()), total + ids.shape[1] - prompt_len)
    hits = sum(h for h, _ in by_category.values())
    total = sum(t for _, t in by_category.values())
    return {"agreement": round(hits / total, 4),
            "by_category": {c: round(h / t, 4) for c, (h, t) in sorted(by_category.items())}}


class WeightOnlyInt8Linear(torch.nn.Module):
    """A linear layer whose weights are int8 per output channel and whose inputs stay float32
    (torch's CPU kernel; dynamic quantization also rounds the inputs, which SmolLM2's outlier
    dimensions do not survive)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        scales = linear.weight.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (linear.weight / scales[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def with_int8_weights(target):
    model = copy.deepcopy(target)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, WeightOnlyInt8Linear(child))
    return model


def without_layers(target, keep: list[int]):
    """The target with only the layers in `keep` (renumbered, so the KV cache indexes them)."""
    model = copy.deepcopy(target)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(VERSION_DIR / "target"))
    parser.add_argument("--draft", default=str(VERSION_DIR / "draft"))
    parser.add_argument("--prompts", type=Path, default=VERSION_DIR / "heldout_prompts.jsonl")
    parser.add_argument("--every", type=int, default=2, help="use every n-th prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    vocab_size = target.config.vocab_size
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()][::args.every]
    answers = greedy_answers(target, tokenizer, prompts, args.max_tokens)
    layers = target.config.num_hidden_layers
    candidates = {
        "target (float32)": (target, DraftVocabulary(None, vocab_size)),
        "shipped token draft (4 layers, 8k vocabulary)":
            (AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval(),
             DraftVocabulary.load(args.draft, vocab_size)),
        "target, int8 weights per tensor": (quantize_dynamic(target, {torch.nn.Linear}, dtype=torch.qint8),
                                            DraftVocabulary(None, vocab_size)),
        "target, int8 weights per channel":
            (quantize_dynamic(target, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8),
             DraftVocabulary(None, vocab_size)),
        "target, int8 weights only": (with_int8_weights(target), DraftVocabulary(None, vocab_size)),
        f"target without its middle layers 12-23 ({layers - 12} of {layers})":
            (without_layers(target, list(range(12)) + list(range(24, layers))), DraftVocabulary(None, vocab_size)),
        f"target, every other layer (15 of {layers})":
            (without_layers(target, list(range(0, layers, 2))), DraftVocabulary(None, vocab_size)),
    }
    target_ms = 1000 * model_forward_seconds(target)
    rows = {}
    for name, (model, vocabulary) in candidates.items():
        ms = 1000 * model_forward_seconds(model)
        rows[name] = {"forward_ms": round(ms, 2), "cost_vs_target": round(ms / target_ms, 3),
                      **agreement(model, answers, vocabulary)}
        print(f"{name}: cost {rows[name]['cost_vs_target']}, agreement {rows[name]['agreement']} "
              f"{rows[name]['by_category']}", flush=True)
    report = {"prompts": len(prompts), "max_tokens": args.max_tokens, "target_forward_ms": round(target_ms, 2),
              "threads": 1, "candidates": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
