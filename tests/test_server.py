"""A real tritonserver with the minedraft backend, on free ports, driven by tritonclient."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from minedraft import Engine, EngineConfig
from minedraft.serving.launcher import TritonServer
from minedraft.serving.triton_metrics import read_metrics
from minedraft.tools.perf_analyzer import run_with_export, write_input_data
from minedraft.tools.repository import write_repository
from minedraft.worker_process import free_port
from minedraft_client.grpc_stream import StreamError, request_inputs, responses

pytestmark = pytest.mark.server
PROMPTS = ["def add(a, b):\n    ", "class Stack:\n    def push(self, item):\n        ", "import os\n\ndef main():\n"]
MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def server(demo_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    write_repository(root, {"minedraft": {"max_num_seqs": MAX_NUM_SEQS},
                            "minedraft_flex": {"mode": "flex", "max_num_seqs": MAX_NUM_SEQS,
                                               "draft_confidence_threshold": 0.05}},
                     max_batch_size=2 * MAX_NUM_SEQS)
    ports = [free_port() for _ in range(3)]
    srv = TritonServer(root, *ports, log_path=root / "server.log")
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(demo_pair):
    """The in-process engine's greedy output for PROMPTS (the server must match it)."""
    engine = Engine(EngineConfig(target_model=demo_pair[0], draft_model=demo_pair[1], mode="ar"))
    outs = engine.generate(PROMPTS, {"max_tokens": 32, "temperature": 0})
    engine.close()
    return [o.text_delta for o in outs]


def stream(server, prompt, params, cancel_after=None, model="minedraft"):
    """(text chunks, the last response's counters, error or None)."""
    chunks, final, error, tokens = [], None, None, 0
    try:
        for result in responses(server.grpc_url, model, request_inputs(prompt, params), timeout=60):
            chunks.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            final = {n: result.as_numpy(n).reshape(-1)[0] for n in
                     ("finish_reason", "num_output_tokens", "num_drafted_tokens", "num_accepted_tokens")}
            tokens += int(final["num_output_tokens"])  # per response, as in vllm_backend
            final["total_output_tokens"] = tokens
            if cancel_after is not None and len(chunks) >= cancel_after:
                break  # leaving the loop cancels the request
    except StreamError as exc:
        error = exc
    return chunks, final, error


def post(server, path, body):
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def test_grpc_stream_matches_in_process_engine(server, reference):
    for prompt, expected in zip(PROMPTS, reference):
        chunks, final, error = stream(server, prompt, {"max_tokens": 32, "temperature": 0})
        assert error is None
        assert "".join(chunks) == expected
        assert len(chunks) > 1  # streamed, not one blob
        assert final["total_output_tokens"] == 32 or final["finish_reason"] == b"eos"
        assert final["num_drafted_tokens"] > 0


def test_http_generate_returns_one_response(server, reference):
    body = post(server, "/v2/models/minedraft/generate",
                {"text_input": PROMPTS[0], "parameters": {"max_tokens": 32, "temperature": 0}})
    answer = json.loads(body)
    assert answer["text_output"] == PROMPTS[0] + reference[0]  # the prompt is included unless excluded
    excluded = json.loads(post(server, "/v2/models/minedraft/generate", {
        "text_input": PROMPTS[0], "exclude_input_in_output": True,
        "parameters": {"max_tokens": 32, "temperature": 0}}))
    assert excluded["text_output"] == reference[0]


def test_http_generate_stream_sends_sse_events(server, reference):
    body = post(server, "/v2/models/minedraft/generate_stream",
                {"text_input": PROMPTS[1], "stream": True, "parameters": {"max_tokens": 32, "temperature": 0}})
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == reference[1]
    assert events[-1]["finish_reason"] in ("length", "eos")


def test_sixteen_concurrent_streams_complete_and_batch(server, reference):
    results = [None] * 16

    def run(i):
        results[i] = stream(server, PROMPTS[i % 3], {"max_tokens": 32, "temperature": 0})
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (chunks, final, error) in enumerate(results):
        assert error is None and "".join(chunks) == reference[i % 3]
    assert read_metrics(server.metrics_url, "minedraft")["minedraft_max_verify_batch_size"] > 1


def test_cancelling_mid_stream_frees_the_slot(server, reference):
    before = read_metrics(server.metrics_url, "minedraft").get("minedraft_requests_cancelled_total", 0)
    chunks, _, _ = stream(server, PROMPTS[0], {"max_tokens": 900, "temperature": 0, "ignore_eos": True},
                          cancel_after=3)
    assert len(chunks) >= 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = read_metrics(server.metrics_url, "minedraft")
        if m["minedraft_requests_cancelled_total"] > before and m["minedraft_requests_in_flight"] == 0:
            break
        time.sleep(0.2)
    assert m["minedraft_requests_cancelled_total"] > before
    assert m["minedraft_requests_in_flight"] == 0
    assert m["minedraft_batch_size_a"] == 0 and m["minedraft_batch_size_b"] == 0
    chunks, _, error = stream(server, PROMPTS[0], {"max_tokens": 32, "temperature": 0})
    assert error is None and "".join(chunks) == reference[0]


@pytest.mark.parametrize("prompt,params,message", [
    ("def f():", "{not json", "JSON"),
    ("def f():", {"max_tokens": -3}, "max_tokens"),
    ("def f():", {"max_tokens": 4, "bogus": 1}, "unknown"),
    ("", {"max_tokens": 4}, "empty"),
    ("x = 1\n" * 2000, {"max_tokens": 4}, "max_model_len"),
    ("x" * 200_000, {"max_tokens": 4}, "characters"),
])
def test_bad_inputs_get_invalid_arg_and_the_server_keeps_serving(server, reference, prompt, params, message):
    # gRPC streams carry only the message of an error response; HTTP shows its code: INVALID_ARG is 400.
    _, _, error = stream(server, prompt, params)
    assert isinstance(error, StreamError) and message in str(error)
    body = {"text_input": prompt, "parameters": {}}
    if isinstance(params, str):
        body["sampling_parameters"] = params
    else:
        body["parameters"] = params
    with pytest.raises(urllib.error.HTTPError) as http_error:
        post(server, "/v2/models/minedraft/generate", body)
    assert http_error.value.code == 400 and message in http_error.value.read().decode()
    chunks, _, error = stream(server, PROMPTS[2], {"max_tokens": 32, "temperature": 0})
    assert error is None and "".join(chunks) == reference[2]


def test_server_is_the_tested_triton_release(server):
    from conftest import TESTED_TRITON_VERSION
    metadata = json.loads(urllib.request.urlopen(f"http://{server.http_url}/v2").read())
    assert metadata["version"] == TESTED_TRITON_VERSION


def test_metrics_are_exposed(server):
    m = read_metrics(server.metrics_url, "minedraft")
    for name in ("minedraft_prompt_tokens_total", "minedraft_generation_tokens_total", "minedraft_draft_tokens_total",
                 "minedraft_accepted_tokens_total", "minedraft_time_to_first_token_seconds_count",
                 "minedraft_time_per_output_token_seconds_count", "minedraft_request_latency_seconds_count",
                 "minedraft_batch_size_a", "minedraft_batch_size_b"):
        assert name in m, name
    assert m["minedraft_accepted_tokens_total"] > 0
    assert m["minedraft_accepted_tokens_total"] <= m["minedraft_draft_tokens_total"]


def test_flex_streams_the_targets_output_and_reports_its_choices(server, reference):
    for prompt, expected in zip(PROMPTS, reference):
        chunks, final, error = stream(server, prompt, {"max_tokens": 32, "temperature": 0}, model="minedraft_flex")
        assert error is None
        assert "".join(chunks) == expected
    m = read_metrics(server.metrics_url, "minedraft_flex")
    steps = {mode: m[f"minedraft_policy_steps_total/{mode}"] for mode in ("ar", "sd", "psd")}
    print(f"flex steps by mode: {steps}, last k {m['minedraft_draft_length']}")
    assert sum(steps.values()) == m["minedraft_steps_total"]
    assert sum(m[f"minedraft_policy_mode/{mode}"] for mode in steps) == 1  # the last step's mode
    # The engine's own log lines reach the server's log: here flex's start-up calibration.
    assert "flex calibration: {" in server.log_path.read_text()


def test_perf_analyzer_streaming_smoke(server, tmp_path):
    data = write_input_data(tmp_path / "input.json", PROMPTS, {"max_tokens": 16, "temperature": 0, "ignore_eos": True})
    export = tmp_path / "profile.json"
    run = run_with_export(["-m", "minedraft", "-u", server.grpc_url, "-i", "grpc", "--streaming",
                           "--concurrency-range", "2", "--input-data", str(data), "--measurement-interval", "2000",
                           "--stability-percentage", "999", "--max-trials", "4"], export, timeout=300)
    assert "Throughput" in run.stdout
    profile = json.loads(export.read_text())
    requests = profile["experiments"][0]["requests"]
    assert requests and all(len(r["response_timestamps"]) >= 2 for r in requests)


def test_vllm_contract_outputs_per_response(server, demo_pair):
    """return_* flags: num_output_tokens and logprobs are per response (vllm_backend's meaning; Triton's
    OpenAI frontend sums num_output_tokens over a stream), cumulative_logprob is the running sum."""
    flags = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", "return_logprobs",
             "return_cumulative_logprob")
    inputs = request_inputs(PROMPTS[0], {"max_tokens": "24", "temperature": 0, "logprobs": 2, "ignore_eos": "true"},
                            returns=flags)
    answers = [{name: result.as_numpy(name).reshape(-1)[0] for name in
                ("num_output_tokens", "num_input_tokens", "logprobs", "cumulative_logprob", "finish_reason")}
               for result in responses(server.grpc_url, "minedraft", inputs, timeout=60)]
    assert len(answers) > 1
    assert sum(int(r["num_output_tokens"]) for r in answers) == 24
    logprobs = [json.loads(r["logprobs"]) for r in answers]
    assert all(len(lp) == int(r["num_output_tokens"]) for lp, r in zip(logprobs, answers))
    chosen = [max(entry.values(), key=lambda v: v["logprob"]) for lp in logprobs for entry in lp]  # greedy: rank 1
    assert all(c["rank"] == 1 for c in chosen)
    assert all(len(entry) >= 2 for lp in logprobs for entry in lp)  # the token and its top alternatives
    assert float(answers[-1]["cumulative_logprob"]) == pytest.approx(sum(c["logprob"] for c in chosen), abs=1e-3)
    assert answers[-1]["finish_reason"] == b"length"
    engine = Engine(EngineConfig(target_model=demo_pair[0], draft_model=demo_pair[1], mode="ar"))
    expected = engine.generate([PROMPTS[0]], {"max_tokens": 24, "temperature": 0, "logprobs": 2, "ignore_eos": True})
    engine.close()
    assert [c["logprob"] for c in chosen] == pytest.approx(
        [max(e.values(), key=lambda v: v["logprob"])["logprob"] for e in expected[0].logprobs], abs=1e-3)


def test_speculation_metrics_follow_vllms_meaning(server):
    for prompt in PROMPTS:
        assert stream(server, prompt, {"max_tokens": 24, "temperature": 0, "ignore_eos": True})[2] is None
    m = read_metrics(server.metrics_url, "minedraft")
    drafts = m["minedraft_spec_decode_num_drafts_total"]
    per_position = [m[f"minedraft_spec_decode_num_accepted_tokens_per_pos_total/{i}"] for i in range(4)]
    assert 0 < drafts <= m["minedraft_spec_decode_num_draft_tokens_total"]
    assert sum(per_position) == m["minedraft_spec_decode_num_accepted_tokens_total"]
    assert all(a >= b for a, b in zip(per_position, per_position[1:]))  # acceptance can only stop early
    assert per_position[0] <= drafts
    mean_acceptance_length = 1 + m["minedraft_spec_decode_num_accepted_tokens_total"] / drafts
    assert 1 <= mean_acceptance_length <= 5
