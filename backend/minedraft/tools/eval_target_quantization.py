"""How far a quantized target departs from the model it was quantized from (issue 39's Q3).

    python -m minedraft.tools.eval_target_quantization [--model model_repository/qwen-coder/1/target]
        [--quantization int4 int8] [--max-tokens 64] [--out docs/bench/lowbit/agreement.json]

The unquantized target answers the held-out prompts greedily (through the chat template); each
quantized copy (as `target_quantization` builds it: a GGUF beside the model gives its published
4-bit blocks) then reads the same prompts and answers, and its top-1 choice at every answer
position is compared with the unquantized one's. A departure is reported with the unquantized
model's margin there (its top-1 log-probability minus its top-2): departures at near-ties are the
ones a bfloat16 rounding could flip as well.
"""
import argparse
import json
from pathlib import Path

import torch

from minedraft.config import QUANTIZATIONS
from minedraft.model.gguf_blocks import gguf_beside
from minedraft.model.loading import load_model, load_tokenizer
from minedraft.model.quantization import quantize_target
from minedraft.prompts import prompts_path
from minedraft.tools.bench import machine, print_report

NEAR_TIE = 0.1  # log-probability margin under which tests/test_qwen_pair.py lets two runs differ


@torch.inference_mode()
def answer_logprobs(model, sequences: list[torch.Tensor], prompt_lens: list[int]) -> list[torch.Tensor]:
    """Log-probabilities at each answer position (the positions that predict the answer's tokens)."""
    return [torch.log_softmax(model(sequence[None]).logits[0, start - 1:-1].float(), dim=-1)
            for sequence, start in zip(sequences, prompt_lens)]


def compare(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> dict:
    positions, agreed, margins = 0, 0, []
    for want, got in zip(reference, quantized):
        top2 = want.topk(2, dim=-1)
        departs = want.argmax(-1) != got.argmax(-1)
        positions += len(departs)
        agreed += int((~departs).sum())
        margins += (top2.values[:, 0] - top2.values[:, 1])[departs].tolist()
    return {"positions": positions, "top1_agreement": round(agreed / positions, 4), "departures": len(margins),
            "departures_at_near_ties": sum(m < NEAR_TIE for m in margins),
            "departure_margins": sorted(round(m, 3) for m in margins)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="model_repository/qwen-coder/1/target")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", nargs="+", default=["int4"], choices=QUANTIZATIONS[1:])
    parser.add_argument("--prompts", default="heldout")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    prompts = [json.loads(line)["prompt"] for line in prompts_path(args.prompts).open()]
    reference_model = load_model(args.model, "cpu", args.dtype)
    sequences, prompt_lens = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out = reference_model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)
            sequences.append(out[0])
            prompt_lens.append(ids.shape[1])
    reference = answer_logprobs(reference_model, sequences, prompt_lens)
    del reference_model
    published = gguf_beside(args.model)
    report = {"machine": machine(), "model": args.model, "dtype": args.dtype, "prompts": len(prompts),
              "max_tokens": args.max_tokens, "near_tie": NEAR_TIE,
              "published_blocks": str(published) if published else None, "quantization": {}}
    for kind in args.quantization:
        model = load_model(args.model, "cpu", args.dtype)
        quantize_target(model, kind, args.model)
        report["quantization"][kind] = compare(reference, answer_logprobs(model, sequences, prompt_lens))
        del model
    print_report(report, args.out)


if __name__ == "__main__":
    main()
