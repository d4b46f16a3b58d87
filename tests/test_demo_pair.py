"""The embedded demo pair: loads offline, round-trips code, decodes deterministically, agrees."""
import json

import torch
from minedraft import Engine, EngineConfig
from minedraft.prompts import PROMPT_SETS
from transformers import AutoModelForCausalLM, AutoTokenizer

SOURCE = 'def grüße(name: str) -> str:\n    """Say hello — 你好, ça va? ✓"""\n\treturn f"{name!r} 🐍"\n'


def test_models_and_tokenizer_load_offline_with_auto_classes(demo_pair, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in demo_pair:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert model.config.model_type == "llama"
    target, draft = (AutoModelForCausalLM.from_pretrained(p) for p in demo_pair)
    flops = [2 * sum(p.numel() for n, p in m.named_parameters() if "norm" not in n and "embed_tokens" not in n)
             + (2 * m.lm_head.weight.numel() if m.config.tie_word_embeddings else 0) for m in (target, draft)]
    assert flops[0] >= 8 * flops[1]
    assert AutoTokenizer.from_pretrained(demo_pair[0]).get_vocab() == AutoTokenizer.from_pretrained(demo_pair[1]).get_vocab()


def test_tokenizer_round_trips_source_code(demo_pair):
    tokenizer = AutoTokenizer.from_pretrained(demo_pair[0])
    assert 2000 <= len(tokenizer) <= 4096
    ids = tokenizer(SOURCE).input_ids
    assert tokenizer.decode(ids) == SOURCE
    assert len(ids) < len(SOURCE.encode())  # BPE actually merges


def test_greedy_generation_is_deterministic(demo_pair):
    tokenizer = AutoTokenizer.from_pretrained(demo_pair[0])
    model = AutoModelForCausalLM.from_pretrained(demo_pair[0]).eval()
    ids = tokenizer("def fibonacci(n):\n", return_tensors="pt").input_ids
    first, second = (model.generate(ids, max_new_tokens=24, do_sample=False) for _ in range(2))
    assert torch.equal(first, second)


def test_engine_acceptance_on_held_out_prompts(demo_pair):
    """Regression guard: greedy acceptance per draft token at k = 4 on 20 held-out prompts."""
    with open(PROMPT_SETS["demo_pair"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:20]
    engine = Engine(EngineConfig(target_model=demo_pair[0], draft_model=demo_pair[1], mode="sd", num_draft_tokens=4,
                                 max_num_seqs=10))
    outs = engine.generate(prompts, {"max_tokens": 48, "temperature": 0, "ignore_eos": True})
    engine.close()
    rate = sum(o.num_accepted_tokens for o in outs) / sum(o.num_drafted_tokens for o in outs)
    print(f"acceptance on 20 held-out prompts: {rate:.3f}")
    assert rate >= 0.5
