"""Adapt the SmolLM2 draft into a parallel draft (PARD's recipe): all k draft tokens from one forward.

The draft gets a mask token (a new input id after its unmapped-token id, named as `pard_token` in
its config, as vLLM reads it). At drafting, a row feeds its pending tokens and k - 1 masks; the
logits at the last pending token and at mask j are the draft's guesses for the next token and the
one j after it. Training teaches exactly that, for every position of a sequence at once: each
sequence is followed by k - 1 copies of itself made of masks, where the mask of copy j at position t
sits at position id t + j, sees the real tokens up to t and the masks of copies 1..j at t (a 4-D
attention mask), and learns the target's distribution at t + j (soft cross-entropy on the target's
top-32, as the sequential draft was trained). The real tokens keep their sequential objective.

It starts from the trained sequential draft and reads the teacher data that
scripts/training/train_smollm2_draft.py generated (build/smollm2-draft/shards and text_shards): run that
first. Checkpoints every 25 steps; the draft directory is exported every 100.

  python scripts/training/train_smollm2_parallel_draft.py --minutes 60 --out build/smollm2-parallel-draft
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from minedraft.draft_vocabulary import DraftVocabulary

from train_smollm2_draft import VERSION_DIR, batch_tensors, load_records, start_run

ROOT = Path(__file__).resolve().parents[2]


def with_mask_token(draft: LlamaForCausalLM) -> tuple[LlamaForCausalLM, int]:
    """One more input row for the mask, initialised to the mean embedding; returns its id."""
    mask_id = draft.config.vocab_size
    draft.resize_token_embeddings(mask_id + 1, mean_resizing=True)
    draft.config.pard_token = mask_id
    return draft, mask_id


def parallel_batch(records: list[dict], t2d: torch.Tensor, num_draft: int, mask_id: int, k: int, window: int,
                   rng: random.Random):
    """Inputs, position ids, 4-D additive attention mask, and per position the teacher's top-32
    (ids, log-probs) and whether it is supervised, for a sequence followed by its k - 1 mask copies."""
    crops = [(r, rng.randrange(max(1, len(r["ids"]) - window))) for r in records]  # a window of <= `window` inputs
    inputs, supervised, top_ids, top_logprobs = batch_tensors([r for r, _ in crops], t2d, num_draft)
    length = min(window, inputs.size(1))
    rows = torch.arange(len(crops))[:, None]
    offsets = torch.tensor([start for _, start in crops])[:, None] + torch.arange(length)
    offsets = offsets.clamp(max=inputs.size(1) - 1)
    real = inputs[rows, offsets]
    valid = offsets < torch.tensor([len(r["ids"]) - 1 for r, _ in crops])[:, None]
    teacher_at = lambda shift: (offsets + shift).clamp(max=inputs.size(1) - 1)  # noqa: E731
    ids = [real] + [torch.full_like(real, mask_id)] * (k - 1)
    positions = [torch.arange(length) + j for j in range(k)]
    labels_ids = [top_ids[rows, teacher_at(j)] for j in range(k)]
    labels_logprobs = [top_logprobs[rows, teacher_at(j)] for j in range(k)]
    keep = [supervised[rows, teacher_at(j)] & valid & (offsets + j < inputs.size(1)) for j in range(k)]
    # Copy j (0 = the real tokens) at t sees real tokens <= t and copies 1..j at t itself.
    t = torch.arange(length)
    copy = torch.arange(k)
    query_t, key_t = t.repeat(k), t.repeat(k)
    query_c, key_c = copy.repeat_interleave(length), copy.repeat_interleave(length)
    sees = ((key_c[None, :] == 0) & (key_t[None, :] <= query_t[:, None])) | (
        (key_c[None, :] >= 1) & (key_c[None, :] <= query_c[:, None]) & (key_t[None, :] == query_t[:, None]))
    attention = torch.zeros(sees.shape).masked_fill_(~sees, torch.finfo(torch.float32).min)
    return (torch.cat(ids, 1), torch.cat(positions).expand(len(crops), -1), attention[None, None],
            torch.cat(labels_ids, 1), torch.cat(labels_logprobs, 1), torch.cat(keep, 1), length)


def parallel_loss(draft, batch, num_draft: int, k: int):
    inputs, positions, attention, top_ids, top_logprobs, keep, length = batch
    logits = draft(input_ids=inputs, position_ids=positions,
                   attention_mask=attention.expand(inputs.size(0), -1, -1, -1)).logits[..., :num_draft].float()
    teacher = top_logprobs.softmax(-1)
    loss = -(teacher * logits.log_softmax(-1).gather(-1, top_ids)).sum(-1)
    agree = logits.argmax(-1) == top_ids.gather(-1, top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    by_offset = [agree[:, j * length:(j + 1) * length][keep[:, j * length:(j + 1) * length]].float().mean().item()
                 for j in range(k)]
    return loss[keep].mean(), by_offset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=VERSION_DIR / "draft", help="the sequential draft to adapt")
    parser.add_argument("--data", type=Path, default=ROOT / "build" / "smollm2-draft")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "smollm2-parallel-draft-work")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "smollm2-parallel-draft")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per forward trained for")
    parser.add_argument("--window", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--minutes", type=float, default=60, help="training stops here, wherever it is")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start_run(args)
    tokenizer = AutoTokenizer.from_pretrained(args.draft)
    d2t = json.loads((args.draft / "d2t.json").read_text())
    draft, mask_id = with_mask_token(LlamaForCausalLM.from_pretrained(args.draft, dtype=torch.float32))
    records = load_records(args.data / "shards")
    heldout, records = records[:len(records) // 20], records[len(records) // 20:]  # the sequential draft's split
    records += load_records(args.data / "text_shards")
    num_draft = len(d2t)
    t2d = DraftVocabulary(d2t, len(tokenizer)).t2d  # unmapped target ids: num_draft
    optimiser = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = args.work / "student.pt"
    step, elapsed, history = 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path)
        draft.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
    rng = random.Random(step)
    started = time.monotonic() - elapsed
    deadline = started + args.minutes * 60
    with tqdm(total=args.steps, initial=step, desc="parallel draft") as bar:
        while step < args.steps and time.monotonic() < deadline:
            progress = max(step / args.steps, (time.monotonic() - started) / (args.minutes * 60))
            for group in optimiser.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            draft.train()
            batch = parallel_batch(rng.sample(records, args.batch), t2d, num_draft, mask_id, args.k, args.window, rng)
            loss, by_offset = parallel_loss(draft, batch, num_draft, args.k)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", agree="/".join(f"{a:.2f}" for a in by_offset))
            if step % 25 == 0:
                torch.save({"model": draft.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                            "elapsed": time.monotonic() - started, "history": history}, state_path)
            if step % 100 == 0 or step == args.steps or time.monotonic() >= deadline:
                history.append({"step": step, "minutes": round((time.monotonic() - started) / 60, 1),
                                "heldout_agreement_by_offset": heldout_agreement(draft, heldout, t2d, num_draft,
                                                                                 mask_id, args)})
                print(json.dumps(history[-1]), flush=True)
                export(draft, d2t, tokenizer, args, step, history)
    return 0


@torch.no_grad()
def heldout_agreement(draft, records, t2d, num_draft, mask_id, args) -> list[float]:
    draft.eval()
    rng, totals = random.Random(0), []
    for i in range(0, min(len(records), 64), args.batch):
        batch = parallel_batch(records[i:i + args.batch], t2d, num_draft, mask_id, args.k, args.window, rng)
        totals.append(parallel_loss(draft, batch, num_draft, args.k)[1])
    return [round(sum(t[j] for t in totals) / len(totals), 4) for j in range(args.k)]


def export(draft, d2t, tokenizer, args, step: int, history: list) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    half = LlamaForCausalLM(draft.config).to(torch.float16)  # float16 on disk (<= 40 MB); loads as float32
    half.load_state_dict(draft.state_dict())
    half.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "d2t.json").write_text(json.dumps(d2t))
    (args.out / "training_report.json").write_text(json.dumps({
        "recipe": "PARD: the sequential draft adapted to fill k - 1 mask positions after the verified context",
        "started_from": str(args.draft), "k": args.k, "window": args.window, "batch": args.batch, "lr": args.lr,
        "steps": step, "history": history}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
