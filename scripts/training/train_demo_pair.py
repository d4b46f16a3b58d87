"""Train the embedded demo pair: a small code-completion target and its distilled draft.

Corpus: the running interpreter's standard library source, minus tests, with a fixed
set of held-out modules. Everything is seeded; the run fits in about an hour on 2 CPU
cores. Output (HF format) goes to model_repository/minedraft/1/{target,draft}, the
held-out prompts to backend/minedraft/prompts/demo_pair.jsonl, the figures of the model card
to scripts/training/reports/demo_pair.json, and the card to docs/demo-pair.md.

    python scripts/training/train_demo_pair.py [--out model_repository/minedraft/1]
"""
import argparse
import ast
import json
import math
import random
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 1234
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "backend" / "minedraft" / "prompts" / "demo_pair.jsonl"
REPORT = ROOT / "scripts" / "training" / "reports" / "demo_pair.json"
CARD = ROOT / "docs" / "demo-pair.md"
VOCAB_SIZE = 3072
EOS = "<|endoftext|>"
SEQ_LEN = 256
# Held out from training: their functions become the benchmark prompts.
HELD_OUT_MODULES = (
    "argparse.py", "calendar.py", "configparser.py", "difflib.py", "ftplib.py",
    "gettext.py", "mailbox.py", "optparse.py", "pathlib.py", "shutil.py",
    "smtplib.py", "tarfile.py", "textwrap.py", "zipfile.py", "json/",
)
TEST_DIR_NAMES = {"test", "tests", "idle_test", "unittest/test"}

TARGET_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
DRAFT_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if "site-packages" in parts or any(p in TEST_DIR_NAMES or p.startswith("test_") for p in parts):
            continue
        yield rel, path


def split_corpus():
    train, held_out = [], []
    for rel, path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        is_held_out = any(rel == m or rel.startswith(m) for m in HELD_OUT_MODULES)
        (held_out if is_held_out else train).append((rel, text))
    return train, held_out


def signature_prompts(sources):
    """Each prompt is a function or method signature plus its docstring, ending at the body's indent."""
    prompts = []
    for rel, text in sources:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = node.body[0]
            if ast.get_docstring(node) is None or len(node.body) < 2:
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            head = "".join(lines[start:doc.end_lineno])
            body_indent = " " * node.body[1].col_offset
            prompt = textwrap.dedent(head) + body_indent[node.col_offset:]
            if 40 <= len(prompt) <= 1200:
                prompts.append({"prompt": prompt, "source": f"{rel}:{node.lineno}"})
    return prompts


def train_tokenizer(texts):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False,
                                   model_max_length=1024)


def encode_stream(tokenizer, texts):
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def llama(shape, tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_theta=10000.0, **shape)
    return LlamaForCausalLM(config)


def batches(stream, batch_size, generator):
    while True:
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()])


def lr_at(step, total, peak):
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream, steps, batch_size, peak_lr, loss_fn, label):
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    started, losses = time.time(), []
    for step, batch in zip(range(steps), batches(stream, batch_size, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"[{label}] step {step}/{steps} loss {loss.item():.3f} "
                  f"elapsed {time.time() - started:.0f}s", flush=True)
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN,
            "tokens_seen": steps * batch_size * SEQ_LEN, "seconds": round(time.time() - started, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}


def next_token_loss(model, batch):
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def distillation_loss(teacher):
    """Draft learns the target's distribution (KL) plus the data (CE): agreement is what SD pays for."""
    def loss_fn(model, batch):
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher(batch[:, :-1]).logits, dim=-1)
        logits = model(batch[:, :-1]).logits
        logp = F.log_softmax(logits, dim=-1)
        kl = F.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
        ce = F.nll_loss(logp.reshape(-1, logp.size(-1)), batch[:, 1:].reshape(-1))
        return 0.7 * kl + 0.3 * ce
    return loss_fn


@torch.no_grad()
def perplexity(model, stream, max_windows=200):
    losses = []
    for start in range(0, min(len(stream) - SEQ_LEN - 1, max_windows * SEQ_LEN), SEQ_LEN):
        window = stream[start:start + SEQ_LEN + 1].unsqueeze(0)
        losses.append(next_token_loss(model, window).item())
    return round(math.exp(sum(losses) / len(losses)), 3)


@torch.no_grad()
def greedy_acceptance(target, draft, tokenizer, prompts, k=4, new_tokens=64):
    """Greedy SD at batch 1, counted exactly: per verification, the draft proposes k tokens
    from the verified context and the target accepts the prefix matching its own argmax."""
    drafted = accepted = verifications = 0
    for item in prompts:
        context = tokenizer.encode(item["prompt"])
        produced = 0
        while produced < new_tokens:
            proposal = list(context)
            for _ in range(k):
                proposal.append(int(draft(torch.tensor([proposal])).logits[0, -1].argmax()))
            target_choice = target(torch.tensor([proposal])).logits[0, len(context) - 1:].argmax(-1).tolist()
            n_ok = 0
            while n_ok < k and proposal[len(context) + n_ok] == target_choice[n_ok]:
                n_ok += 1
            context = proposal[:len(context) + n_ok] + [target_choice[n_ok]]
            drafted, accepted, verifications = drafted + k, accepted + n_ok, verifications + 1
            produced += n_ok + 1
    return {"k": k, "prompts": len(prompts), "new_tokens_per_prompt": new_tokens,
            "acceptance_rate": round(accepted / drafted, 4),
            "mean_accepted_length": round((accepted + verifications) / verifications, 3)}


def flops_per_token(model):
    """Forward FLOPs per token, 2 x (matmul weights), counting the LM head but not the embedding lookup."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n and "embed_tokens" not in n)
    if model.config.tie_word_embeddings:  # the head shares the embedding's storage but still costs a matmul
        matmul += model.get_output_embeddings().weight.numel()
    return 2 * matmul


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, new_tokens=48):
    samples = []
    for item in prompts:
        ids = tokenizer(item["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        samples.append({"prompt": item["prompt"], "completion": tokenizer.decode(out[0, ids.size(1):])})
    return samples


def save(model, tokenizer, path):
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, do_sample=False)
    model.to(torch.float16).save_pretrained(path)
    model.to(torch.float32)
    tokenizer.save_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="model_repository/minedraft/1")
    # Where the prompts, the report and the card go: a trial run elsewhere leaves the committed ones alone.
    parser.add_argument("--prompts-out", type=Path, default=PROMPTS)
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--card", type=Path, default=CARD)
    parser.add_argument("--target-steps", type=int, default=1100)
    parser.add_argument("--draft-steps", type=int, default=1100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    train_src, held_src = split_corpus()
    prompts = signature_prompts(held_src)
    random.Random(SEED).shuffle(prompts)
    assert len(prompts) >= 200, f"only {len(prompts)} held-out prompts"
    out.mkdir(parents=True, exist_ok=True)
    with open(args.prompts_out, "w") as f:
        for item in prompts:
            f.write(json.dumps(item) + "\n")
    print(f"train files {len(train_src)}, held-out files {len(held_src)}, prompts {len(prompts)}", flush=True)

    started = time.time()
    tokenizer = train_tokenizer(text for _, text in train_src)
    train_stream = encode_stream(tokenizer, [t for _, t in train_src])
    held_stream = encode_stream(tokenizer, [t for _, t in held_src])
    print(f"tokenizer {len(tokenizer)} tokens, train {len(train_stream)} tokens, "
          f"held-out {len(held_stream)} tokens, {time.time() - started:.0f}s", flush=True)

    target = llama(TARGET_SHAPE, tokenizer)
    target_log = train(target, train_stream, args.target_steps, args.batch_size, 2e-3, next_token_loss, "target")
    for p in target.parameters():
        p.requires_grad_(False)
    draft = llama(DRAFT_SHAPE, tokenizer)
    draft_log = train(draft, train_stream, args.draft_steps, args.batch_size, 3e-3,
                      distillation_loss(target), "draft")

    save(target, tokenizer, out / "target")
    save(draft, tokenizer, out / "draft")
    # Figures are measured on the saved (fp16) weights, loaded back as users load them.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "target")
    report = {
        "python": sysconfig.get_python_version(), "held_out_modules": list(HELD_OUT_MODULES),
        "train_files": len(train_src), "held_out_files": len(held_src),
        "train_tokens": len(train_stream), "held_out_tokens": len(held_stream),
        "num_prompts": len(prompts), "vocab_size": len(tokenizer),
        "target": {"params": target.num_parameters(), "flops_per_token": flops_per_token(target),
                   "shape": TARGET_SHAPE, "training": target_log,
                   "held_out_perplexity": perplexity(target, held_stream)},
        "draft": {"params": draft.num_parameters(), "flops_per_token": flops_per_token(draft),
                  "shape": DRAFT_SHAPE, "training": draft_log,
                  "held_out_perplexity": perplexity(draft, held_stream)},
        "greedy_acceptance": greedy_acceptance(target, draft, tokenizer, prompts[:100]),
        "samples": sample_completions(target, tokenizer, prompts[:3]),
        "total_seconds": round(time.time() - started, 1),
    }
    report["flops_ratio"] = round(report["target"]["flops_per_token"] / report["draft"]["flops_per_token"], 2)
    args.report.write_text(json.dumps(report, indent=2))
    subprocess.run([sys.executable, str(Path(__file__).with_name("write_model_card.py")), str(args.report),
                    str(args.card)], check=True)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
