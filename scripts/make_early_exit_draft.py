"""A larger draft made from the target itself, with no training: its first N decoder layers, its
final norm and its LM head (LayerSkip's early exit, untrained). It shares the target's tokenizer
and full vocabulary. Issue 18 compares it with the small trained draft: SD pays for every draft
forward, PSD hides them behind verification, so the two may prefer different drafts.

  python scripts/make_early_exit_draft.py --layers 6 --out build/early-exit-6
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "model_repository" / "smollm2" / "1" / "target"


def early_exit(target_dir: Path, layers: int, out: Path) -> None:
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    config = target.config
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers] if getattr(config, "layer_types", None) else None
    draft = AutoModelForCausalLM.from_config(config)
    state = {name: tensor for name, tensor in target.state_dict().items()
             if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:  # a tied head is not stored
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    draft.tie_weights()
    draft.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (target_dir / name).exists():
            shutil.copy(target_dir / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    early_exit(args.target, args.layers, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
