"""GGUF files as target and draft: `target_model` / `draft_model` may name a .gguf file, loaded
through transformers' gguf_file (here: tiny GGUFs the test writes itself)."""
from engine_helpers import PROMPTS, make_engine, reference_greedy
from gguf_writer import write_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_a_gguf_pair_serves_the_targets_greedy_output(tiny_pair, target_model, tmp_path):
    model, tokenizer = target_model
    files = {}
    for name, directory in zip(("target", "draft"), tiny_pair):
        files[name] = write_llama_gguf(AutoModelForCausalLM.from_pretrained(directory),
                                       AutoTokenizer.from_pretrained(directory), tmp_path / f"{name}.gguf")
    engine = make_engine(str(files["target"]), str(files["draft"]), mode="sd", drafter="inline")
    try:
        outs = engine.generate(PROMPTS[:6], {"max_tokens": 16, "temperature": 0})
    finally:
        engine.close()
    assert sum(o.num_drafted_tokens for o in outs) > 0
    for prompt, out in zip(PROMPTS, outs):
        assert out.new_token_ids == reference_greedy(model, tokenizer, prompt, 16)[1]
