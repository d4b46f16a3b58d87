"""The shipped real pair, SmolLM2-135M-Instruct and its trained draft: greedy output through
tritonserver equals HF `generate` of the target alone, and (slow) sampled output follows the
target's law with k = 3 drafts per verification. GGUF files load as target or draft."""
import json
import os

import pytest
import torch
from conftest import REPO
from engine_helpers import two_token_pvalue
from minedraft import Engine, EngineConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = REPO / "model_repository" / "smollm2"
TARGET, DRAFT = SMOLLM2 / "1" / "target", SMOLLM2 / "1" / "draft"
QUESTIONS = ["What is the capital of France?", "Write a Python function that returns the square of a number.",
             "Give me two tips for learning to cook."]


@pytest.fixture(scope="module")
def smollm2():
    if not (TARGET / "config.json").is_file():
        if os.environ.get("CI"):
            pytest.fail("SmolLM2 was not prepared: scripts/setup.sh runs python -m minedraft.tools.prepare_models")
        pytest.skip("SmolLM2 not prepared (python -m minedraft.tools.prepare_models smollm2)")
    tokenizer = AutoTokenizer.from_pretrained(TARGET)
    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    return tokenizer, model


def chat(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.server
def test_greedy_through_tritonserver_equals_the_target_alone(smollm2, tmp_path):
    from minedraft.serving.launcher import TritonServer
    from minedraft.tools.repository import write_repository
    from minedraft.worker_process import free_port
    from minedraft_client.grpc_stream import request_inputs, responses

    tokenizer, model = smollm2
    expected = []
    for question in QUESTIONS:
        ids = tokenizer(chat(tokenizer, question), return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True))
    root = write_repository(tmp_path, {"smollm2": {"target_model": str(TARGET), "draft_model": str(DRAFT),
                                                   "max_num_seqs": 4, "max_model_len": 512}}, max_batch_size=8)
    server = TritonServer(root, *(free_port() for _ in range(3)), log_path=tmp_path / "server.log")
    server.start()
    try:
        server.wait_ready()
        for question, reference in zip(QUESTIONS, expected):
            text, drafted = "", 0
            inputs = request_inputs(chat(tokenizer, question), {"max_tokens": 32, "temperature": 0})
            for result in responses(server.grpc_url, "smollm2", inputs, timeout=120):
                text += result.as_numpy("text_output").reshape(-1)[0].decode()
                drafted = int(result.as_numpy("num_drafted_tokens").reshape(-1)[0])
            assert text == reference
            assert drafted > 0
    finally:
        server.stop()


@pytest.mark.slow
def test_sampled_law_on_the_real_pair_with_three_drafts(smollm2):
    tokenizer, model = smollm2
    prompt = chat(tokenizer, "Name a colour.")
    params = {"max_tokens": 4, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "ignore_eos": True}
    engine = Engine(EngineConfig(target_model=str(TARGET), draft_model=str(DRAFT), mode="psd", num_draft_tokens=3,
                                 max_num_seqs=32, max_model_len=256))
    try:
        outs = engine.generate([prompt] * 2000, [{**params, "seed": i} for i in range(2000)])
    finally:
        engine.close()
    assert sum(o.num_accepted_tokens for o in outs) > 0
    counts = {}
    for o in outs:
        counts[tuple(o.new_token_ids[:2])] = counts.get(tuple(o.new_token_ids[:2]), 0) + 1
    assert two_token_pvalue(counts, model, tokenizer, prompt, params) > 0.01


def test_the_draft_is_small_and_maps_into_the_targets_vocabulary():
    weights = sum(f.stat().st_size for f in DRAFT.glob("*.safetensors"))
    assert weights <= 40 * 2**20
    d2t = json.loads((DRAFT / "d2t.json").read_text())
    assert len(set(d2t)) == len(d2t) and all(0 <= t < 49152 for t in d2t)
