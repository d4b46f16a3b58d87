"""Does FlexDraft's bonus-token calibration raise the parallel draft's acceptance? Measured, not shipped.

FlexDraft feeds the target's bonus token and hidden state to a small calibration head that biases
the next draft's logits. Here the parallel draft already reads the bonus token (it is its last
pending input), so what the head adds is the target's hidden state h(t-1), the one that produced
the bonus token x(t). The head is low-rank: delta_j = U_j silu(V h), added to the draft's final
(normed) hidden state at offset j before its LM head; U starts at zero, so it starts as the plain
draft. The draft stays frozen; only the head trains, on the same teacher data as the draft.

A control head of the same shape reads the draft's own hidden state at x(t) instead of the target's:
whatever it gains is extra fine-tuning capacity, not information from the target. The figures are
teacher-forced top-1 agreement with the target on the held-out answers (the split the drafts kept
apart), per offset and as the chance that offsets 0..j all agree (the prefix a verification accepts).

  python scripts/eval_bonus_calibration.py --steps 300
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from minedraft.drafter import DraftVocabulary

from train_smollm2_draft import VERSION_DIR, load_records
from train_smollm2_parallel_draft import parallel_batch

ROOT = Path(__file__).resolve().parents[1]


class CalibrationHead(nn.Module):
    def __init__(self, width: int, k: int, rank: int):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.up = nn.Parameter(torch.zeros(k, rank, width))

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """source [rows, length, width] -> delta [rows, k, length, width]"""
        return torch.einsum("blr,krw->bklw", torch.nn.functional.silu(self.down(source)), self.up)


def batch_with_target_ids(records, t2d, num_draft, mask_id, k, window, rng, pad_id):
    """parallel_batch, plus the same windows in target ids (the crops replayed from the rng's state)."""
    replay = random.Random()
    replay.setstate(rng.getstate())
    starts = [replay.randrange(max(1, len(r["ids"]) - window)) for r in records]
    batch = parallel_batch(records, t2d, num_draft, mask_id, k, window, rng)
    length = batch[-1]
    longest = max(len(r["ids"]) - 1 for r in records)
    target_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    for i, (r, start) in enumerate(zip(records, starts)):
        ids = r["ids"][:-1]
        offsets = [min(start + t, longest - 1) for t in range(length)]
        target_ids[i] = torch.tensor([ids[o] if o < len(ids) else pad_id for o in offsets])
    return batch, target_ids


@torch.no_grad()
def features(target, draft, batch, target_ids):
    """The frozen models' parts: the draft's final hidden states at every copy and position, the
    target's hidden state that produced each real token (zeros before the first), and the draft's own
    hidden state at each real token."""
    inputs, positions, attention, _, _, _, length = batch
    drafted = draft.model(input_ids=inputs, position_ids=positions,
                          attention_mask=attention.expand(inputs.size(0), -1, -1, -1)).last_hidden_state
    produced_by = target.model(input_ids=target_ids).last_hidden_state
    previous = torch.cat([torch.zeros_like(produced_by[:, :1]), produced_by[:, :-1]], 1)
    return drafted, previous, drafted[:, :length]


def scores(draft, drafted, delta, batch, num_draft, k):
    """Soft cross-entropy on the teacher's top-32, and per position whether the top-1 agrees, [rows, k, length]."""
    _, _, _, top_ids, top_logprobs, keep, length = batch
    rows = drafted.size(0)
    hidden = drafted.view(rows, k, length, -1) + (delta if delta is not None else 0)
    logits = draft.lm_head(hidden)[..., :num_draft].float()
    top_ids, top_logprobs, keep = (x.view(rows, k, length, *x.shape[2:]) for x in (top_ids, top_logprobs, keep))
    loss = -(top_logprobs.softmax(-1) * logits.log_softmax(-1).gather(-1, top_ids)).sum(-1)
    agree = logits.argmax(-1) == top_ids.gather(-1, top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    return loss[keep].mean(), agree, keep


def evaluate(draft, heads, batches, num_draft, k) -> dict:
    """Per variant: agreement by offset, and P(offsets 0..j all agree), over positions where all k are supervised."""
    totals = {name: [torch.zeros(k), torch.zeros(k)] for name in ["none", *heads]}
    count = 0
    with torch.no_grad():
        for batch, (drafted, previous, own) in batches:
            for name in totals:
                delta = None if name == "none" else heads[name](previous if name == "target" else own)
                _, agree, keep = scores(draft, drafted, delta, batch, num_draft, k)
                full = keep.all(1)  # [rows, length]
                agree = agree.permute(0, 2, 1)[full]  # [positions, k]
                totals[name][0] += agree.float().sum(0)
                totals[name][1] += agree.long().cumprod(1).float().sum(0)
            count += int(full.sum())
    return {name: {"agreement_by_offset": [round(x, 4) for x in (a / count).tolist()],
                   "prefix_all_agree": [round(x, 4) for x in (p / count).tolist()],
                   "expected_accepted": round(float((p / count).sum()), 3)} for name, (a, p) in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=VERSION_DIR / "parallel_draft")
    parser.add_argument("--target", type=Path, default=VERSION_DIR / "target")
    parser.add_argument("--data", type=Path, default=ROOT / "build" / "smollm2-draft")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bonus-calibration.json")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--window", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = LlamaForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    d2t = json.loads((args.draft / "d2t.json").read_text())
    num_draft, mask_id = len(d2t), draft.config.pard_token
    t2d = DraftVocabulary(d2t, target.config.vocab_size).t2d  # unmapped target ids: num_draft
    records = load_records(args.data / "shards")
    heldout, records = records[:len(records) // 20], records[len(records) // 20:]  # the drafts' own split
    records += load_records(args.data / "text_shards")
    pad_id = target.config.pad_token_id or 0
    make = lambda recs, rng: batch_with_target_ids(recs, t2d, num_draft, mask_id, args.k, args.window, rng,  # noqa: E731
                                                   pad_id)
    heldout_rng = random.Random(0)
    heldout_batches = []
    for i in range(0, len(heldout), args.batch):
        batch, target_ids = make(heldout[i:i + args.batch], heldout_rng)
        heldout_batches.append((batch, features(target, draft, batch, target_ids)))
    width = draft.config.hidden_size
    heads = {"target": CalibrationHead(width, args.k, args.rank), "draft_control": CalibrationHead(width, args.k, args.rank)}
    optimisers = {name: torch.optim.AdamW(head.parameters(), lr=args.lr) for name, head in heads.items()}
    rng = random.Random(1)
    history = []
    for step in tqdm(range(1, args.steps + 1), desc="calibration heads"):
        batch, target_ids = make(rng.sample(records, args.batch), rng)
        drafted, previous, own = features(target, draft, batch, target_ids)
        for name, head in heads.items():
            loss, _, _ = scores(draft, drafted, head(previous if name == "target" else own), batch, num_draft, args.k)
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
        if step % 100 == 0 or step == args.steps:
            history.append({"step": step, "minutes": round((time.monotonic() - started) / 60, 1),
                            **evaluate(draft, heads, heldout_batches, num_draft, args.k)})
            print(json.dumps(history[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"draft": str(args.draft), "k": args.k, "rank": args.rank,
                                            "steps": step, "batch": args.batch, "lr": args.lr,
                                            "history": history}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
