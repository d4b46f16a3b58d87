"""Render the demo pair's model card (docs/demo-pair.md) from the figures train_demo_pair.py
measured (scripts/training/reports/demo_pair.json).

    python scripts/training/write_model_card.py [REPORT [CARD]]
"""
import json
import sys
from pathlib import Path


def card(r: dict) -> str:
    t, d, acc = r["target"], r["draft"], r["greedy_acceptance"]
    samples = "\n\n".join(f"Prompt:\n```python\n{s['prompt']}\n```\nTarget's greedy completion:\n```python\n"
                          f"{s['prompt']}{s['completion']}\n```" for s in r["samples"])

    def row(name, m):
        s = m["shape"]
        return (f"| {name} | {m['params']:,} | {s['hidden_size']} | {s['num_hidden_layers']} | "
                f"{s['num_attention_heads']} | {s['intermediate_size']} | {m['flops_per_token']:,} | "
                f"{m['training']['steps']} × {m['training']['batch_size']} × {m['training']['seq_len']} | "
                f"{m['training']['seconds'] / 60:.1f} min | {m['training']['final_loss']} | {m['held_out_perplexity']} |")

    return f"""# minedraft demo pair: a small Python code-completion target and its draft

Trained from scratch on this project's 2-core CPU machine by `scripts/training/train_demo_pair.py`
(seeded; {r['total_seconds'] / 60:.0f} minutes for everything). It exists because nothing can be
downloaded at run time: it is the embedded default of `model_repository/minedraft` and the
workload of every benchmark. It is a toy for measuring speculative decoding, not a useful assistant.

## Data
- Corpus: the Python {r['python']} standard library source of the training interpreter, test
  directories and `test_*` modules removed: {r['train_files']} files, {r['train_tokens']:,} tokens.
- Held out: {', '.join(r['held_out_modules'])} ({r['held_out_files']} files, {r['held_out_tokens']:,} tokens).
- `backend/minedraft/prompts/demo_pair.jsonl` (`--prompts demo_pair`): {r['num_prompts']} benchmark prompts from the held-out modules, each a function or
  method signature plus its docstring, ending at the body's indentation.
- Tokenizer: byte-level BPE (HF `tokenizers`), {r['vocab_size']} tokens, shared by both models;
  `<|endoftext|>` separates files. Loads with `AutoTokenizer`.

## Models (Llama architecture, `LlamaForCausalLM`, weights stored in fp16, load in fp32)

| Model | Parameters | Hidden | Layers | Heads | FFN | FLOPs/token | Steps × batch × seq | Training time | Final train loss | Held-out perplexity |
|---|---|---|---|---|---|---|---|---|---|---|
{row("target", t)}
{row("draft", d)}

- The target costs **{r['flops_ratio']}×** the draft's FLOPs per token (2 × matmul weights, LM head
  included, embedding lookup excluded).
- The target trains on next-token loss. The draft is distilled from the target: 0.7 × KL(target ‖ draft)
  + 0.3 × next-token loss, since agreement with the target is what speculative decoding pays for.
- Context: trained on {t['training']['seq_len']}-token windows; `max_position_embeddings` is 1024 (RoPE), so
  quality degrades past a few hundred tokens.

## Speculative decoding figures (measured by the training script)

Greedy speculative decoding at batch 1 with **k = {acc['k']}**, on {acc['prompts']} held-out prompts,
{acc['new_tokens_per_prompt']} new tokens each:

- **acceptance rate per draft token: {acc['acceptance_rate']}** (accepted / drafted)
- **mean accepted length per verification: {acc['mean_accepted_length']}** tokens (accepted drafts + the target's own token)

The engine's own measurement on 20 held-out prompts is a regression test
(`tests/test_demo_pair.py`, must stay ≥ 0.5).

## Samples

{samples}
"""


ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    report = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "scripts" / "training" / "reports" / "demo_pair.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "demo-pair.md"
    out.write_text(card(json.loads(report.read_text())))


if __name__ == "__main__":
    main()
