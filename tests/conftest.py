"""Shared fixtures: tiny Llama target/draft pairs built on the spot (no hub), and the demo pair."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "model_repository" / "minedraft" / "1"
TESTED_TRITON_VERSION = "2.51.0"  # the tritonserver in nvidia-pytriton 0.7.0 = NGC 24.10
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)  # squares: ünïcødé ✓ 数字\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
] * 20


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(path)
    return fast


def build_llama(path: Path, tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    # Random init gives near-flat logits; sharpen them so greedy choices have clear margins.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(target_dir, draft_dir): a 2-layer target and a smaller 1-layer draft, unrelated weights."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tok")
    build_llama(root / "target", tokenizer, hidden=64, layers=2, seed=1)
    build_llama(root / "draft", tokenizer, hidden=32, layers=1, seed=2)
    return str(root / "target"), str(root / "draft")


@pytest.fixture(scope="session")
def tiny_twin_pair(tmp_path_factory, tiny_pair):
    """(target_dir, draft_dir) where the draft has exactly the target's weights."""
    return tiny_pair[0], tiny_pair[0]


@pytest.fixture(scope="session")
def demo_pair():
    if not (DEMO_DIR / "target" / "config.json").exists():
        pytest.skip("the demo pair is not trained yet")
    return str(DEMO_DIR / "target"), str(DEMO_DIR / "draft")


@pytest.fixture(scope="session")
def target_model(tiny_pair):
    return AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval(), AutoTokenizer.from_pretrained(tiny_pair[0])


@pytest.fixture(scope="session")
def noisy_draft(tiny_pair, tmp_path_factory):
    """The target's weights plus noise: a draft that agrees often but not always."""
    path = tmp_path_factory.mktemp("noisy")
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15 * p.std())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_pair[0]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def parallel_draft(noisy_draft, tmp_path_factory):
    """The noisy draft marked as a parallel (PARD) draft: its config names a mask token, so the
    engine drafts all k tokens in one forward. Untrained for masks, its later positions are poor
    proposals, which the losslessness tests want anyway."""
    path = tmp_path_factory.mktemp("parallel")
    for item in Path(noisy_draft).iterdir():
        shutil.copy(item, path / item.name)
    config = json.loads((path / "config.json").read_text())
    config["pard_token"] = config["vocab_size"] - 1
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def feature_draft(tiny_pair, tmp_path_factory):
    """A feature draft (EAGLE) for the tiny target: one layer that passes the target's state
    through (attention and MLP outputs zeroed, the projection picks the state, a unit final norm
    only rescales it), so from token t and the target's state at t - 1 it proposes the target's
    argmax at t - 1, i.e. token t again. Greedy, its first draft is always the row's last token: right when
    the target repeats itself, which the tiny random target often does."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("feature")
    target = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    config = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": 1})
    draft = LlamaForCausalLM(config)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        draft.model.norm.weight.fill_(1.0)
        draft.model.layers[0].self_attn.o_proj.weight.zero_()
        draft.model.layers[0].mlp.down_proj.weight.zero_()
    draft.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_pair[0]).save_pretrained(path)
    hidden = config.hidden_size
    save_file({"weight": torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], 1).contiguous(),
               "bias": torch.zeros(hidden)}, path / "feature_projection.safetensors")
    return str(path)
