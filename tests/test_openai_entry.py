"""The OpenAI-compatible entry (`minedraft serve --openai-port`) against a real tritonserver, driven
by clients nobody here wrote: the `openai` SDK and genai-perf's OpenAI chat mode. Greedy output
through it equals the Triton gRPC path's for the same (templated) prompt.

The demo pair (`minedraft`, PSD, no chat template) covers completions and speculation; `smollm2`
(it has a template; skipped unless prepared) covers chat.
"""
import csv
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import REPO
from minedraft.serving.launcher import DEFAULT_REPOSITORY
from minedraft.serving.triton_metrics import read_metrics
from minedraft.tools.processes import descendants
from minedraft.tools.repository import write_repository
from minedraft.worker_process import free_port
from minedraft_client.grpc_stream import request_inputs, responses
from transformers import AutoTokenizer

pytestmark = pytest.mark.server
SMOLLM2 = DEFAULT_REPOSITORY / "smollm2" / "1"
PROMPT = "def add(a, b):\n    "
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GENAI_PERF = REPO / ".venv-genai-perf" / "bin" / "genai-perf"


class Served:
    def __init__(self, root, log):
        self.root, self.log = root, log
        self.http, self.grpc, self.metrics, self.openai = (free_port() for _ in range(4))
        self.log_file = open(log, "w")  # noqa: SIM115 (the server writes to it until teardown closes it)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minedraft.tools.cli", "serve", "--model-repository", str(root),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--openai-port", str(self.openai), "--exit-timeout", "20"],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://localhost:{self.openai}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

    def wait_for_log(self, text, timeout=300):
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def metric(self, name):
        return read_metrics(f"http://localhost:{self.metrics}/metrics", "minedraft").get(name, 0)


@pytest.fixture(scope="module")
def served(demo_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    models = {"minedraft": {"max_num_seqs": 2}}
    if (SMOLLM2 / "target" / "config.json").exists():
        models["smollm2"] = {"target_model": str(SMOLLM2 / "target"), "draft_model": str(SMOLLM2 / "draft"),
                             "mode": "ar", "max_model_len": 2048, "max_num_seqs": 2}
    write_repository(root / "repo", models, max_batch_size=4)
    served = Served(root / "repo", root / "serve.log")
    try:
        served.wait_for_log("minedraft is serving")
        yield served
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=60)
        served.log_file.close()


@pytest.fixture(scope="module")
def smollm2(served):
    if not (SMOLLM2 / "target" / "config.json").exists():
        pytest.skip("smollm2 is not prepared (python -m minedraft.tools.prepare_models smollm2)")
    return AutoTokenizer.from_pretrained(SMOLLM2 / "target")


def triton_path(served, model, prompt, params):
    """(text, output tokens, input tokens) through Triton's gRPC stream, as minedraft-client sends it."""
    text, tokens, last = "", 0, None
    for result in responses(f"localhost:{served.grpc}", model, request_inputs(prompt, params), timeout=120):
        text += result.as_numpy("text_output").reshape(-1)[0].decode()
        tokens += int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        last = result
    return text, tokens, int(last.as_numpy("num_input_tokens").reshape(-1)[0])


def test_models_lists_the_ready_models(served):
    names = {model.id for model in served.client.models.list()}
    assert "minedraft" in names and names <= {"minedraft", "smollm2"}
    assert served.client.models.retrieve("minedraft").id == "minedraft"


def test_completion_equals_the_triton_path_with_usage_and_speculation(served):
    text, tokens, prompt_tokens = triton_path(served, "minedraft", PROMPT, {"max_tokens": 24, "temperature": 0})
    answer = served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=24, temperature=0)
    assert answer.choices[0].text == text
    assert answer.choices[0].finish_reason == ("length" if tokens == 24 else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, tokens)
    spec = answer.model_extra["spec_decode"]
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_drafted_tokens"] and spec["num_drafted_tokens"] > 0


def test_streamed_completion_concatenates_to_the_whole_one_and_ends_with_usage(served):
    whole = served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2  # streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].model_extra["spec_decode"]["num_drafted_tokens"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_and_seeds(served):
    stopped = served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=48, temperature=0,
                                               stop=["\n"])
    assert stopped.choices[0].finish_reason == "stop" and "\n" not in stopped.choices[0].text
    sampled = [served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                                top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_chat_applies_the_models_template_and_equals_the_triton_path(served, smollm2):
    prompt = smollm2.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    text, tokens, prompt_tokens = triton_path(served, "smollm2", prompt, {"max_tokens": 16, "temperature": 0})
    answer = served.client.chat.completions.create(model="smollm2", messages=QUESTION, max_completion_tokens=16,
                                                   temperature=0)
    assert answer.choices[0].message.content == text and "Paris" in text
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, tokens)
    chunks = list(served.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == tokens


def test_chat_logprobs_are_the_greedy_choices(served, smollm2):
    answer = served.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                                   logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob == token.top_logprobs[0].logprob  # greedy: the emitted token is the top one
    # The end-of-turn token is counted and reported, but its text is not in the answer (special tokens are skipped).
    assert "".join(t.token for t in content).removesuffix(smollm2.eos_token) == answer.choices[0].message.content


def test_chat_without_a_template_is_a_clear_400(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client.chat.completions.create(model="minedraft", messages=QUESTION)
    assert caught.value.code == "no_chat_template" and "/v1/completions" in caught.value.message


@pytest.mark.parametrize("chat, extra", [
    (False, {"n": 2}), (False, {"extra_body": {"guided_json": {}}}),
    (True, {"response_format": {"type": "json_object"}}),
    (True, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
])
def test_unsupported_fields_are_400_in_openais_shape(served, chat, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        if chat:
            served.client.chat.completions.create(model="smollm2", messages=QUESTION, **extra)
        else:
            served.client.completions.create(model="minedraft", prompt=PROMPT, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["code"] in ("unsupported_value", "unsupported_parameter") and error["param"] in error["message"]


def test_unknown_models_and_overlong_requests(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client.completions.create(model="nope", prompt=PROMPT)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=5000)
    assert caught.value.code == "context_length_exceeded"


def stream_events(served, body):
    """A raw HTTP/1.1 streaming request on a socket we can close mid-stream: (socket, file)."""
    sock = socket.create_connection(("localhost", served.openai), timeout=60)
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock, sock.makefile("rb")


def test_a_client_that_disconnects_mid_stream_cancels_its_triton_request(served):
    before = served.metric("minedraft_requests_cancelled_total")
    sock, events = stream_events(served, {"model": "minedraft", "prompt": PROMPT, "max_tokens": 900,
                                          "ignore_eos": True, "temperature": 0, "stream": True})
    assert b"200" in events.readline()
    while b"data:" not in events.readline():
        pass
    events.close()  # the socket closes with its last file object
    sock.close()  # mid-stream: 900 tokens take far longer than this
    deadline = time.monotonic() + 30
    while served.metric("minedraft_requests_cancelled_total") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.metric("minedraft_requests_cancelled_total") == before + 1
    assert served.metric("minedraft_requests_in_flight") == 0


def test_genai_perf_profiles_the_entry_in_openai_chat_mode(served, smollm2, tmp_path):
    if not GENAI_PERF.exists():
        if os.environ.get("CI"):
            pytest.fail("scripts/setup.sh test makes .venv-genai-perf")
        pytest.skip("no .venv-genai-perf (bash scripts/setup.sh test makes it)")
    cuda_runtime = glob.glob(str(GENAI_PERF.parents[1] / "lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = {**os.environ, "PATH": f"{GENAI_PERF.parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "LD_LIBRARY_PATH": os.pathsep.join(cuda_runtime)}
    run = subprocess.run([str(GENAI_PERF), "profile", "-m", "smollm2", "--endpoint-type", "chat", "--streaming",
                          "-u", f"localhost:{served.openai}", "--tokenizer", str(SMOLLM2 / "target"),
                          "--concurrency", "2", "--request-count", "6", "--synthetic-input-tokens-mean", "24",
                          "--output-tokens-mean", "12", "--extra-inputs", "ignore_eos:true",
                          "--artifact-dir", str(tmp_path / "artifacts")],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "had error" not in run.stdout + run.stderr
    [table] = glob.glob(str(tmp_path / "artifacts" / "*" / "profile_export_genai_perf.csv"))
    rows = {row[0]: row for row in csv.reader(Path(table).read_text().splitlines()) if row}

    def mean(metric):
        return float(rows[metric][1].replace(",", ""))  # genai-perf writes thousands as "2,086.23"
    assert mean("Request Count (count)") == 6
    assert mean("Time To First Token (ms)") > 0
    # genai-perf counts output tokens by tokenizing the text again, so the count can move by a token or so.
    assert 10 <= mean("Output Sequence Length (tokens)") <= 14


def test_a_server_side_failure_mid_stream_reaches_the_client_as_an_error_event(served):
    """Last: it kills tritonserver (`minedraft serve` restarts it)."""
    stream = served.client.completions.create(model="minedraft", prompt=PROMPT, max_tokens=900, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    tritonserver = next(pid for pid in descendants(served.process.pid)
                        if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(tritonserver, signal.SIGKILL)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "Triton" in caught.value.message
