"""OpenAI request bodies into minedraft's sampling parameters, and Triton's outputs back into
OpenAI's shapes, without a server (tests/test_openai_entry.py runs them against one)."""
import pytest
from minedraft.serving.openai_protocol import (
    Delta,
    OpenAIError,
    chunk,
    parse_chat,
    parse_completion,
    response,
    usage_chunk,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "def add(a, b):"}


def refused(parse, body) -> dict:
    with pytest.raises(OpenAIError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value.body()["error"]


def delta(text, tokens=1, finish="", logprobs=None):
    return Delta(text, tokens, finish, num_input_tokens=5, num_drafted_tokens=8, num_accepted_tokens=6,
                 logprobs=logprobs)


def test_sampling_fields_reach_the_server_under_its_names():
    request = parse_chat({**CHAT, "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
                          "seed": 3, "stop": ["\n"], "logprobs": True, "top_logprobs": 2, "n": 1, "tools": []})
    assert request.params == {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": ["\n"],
                              "logprobs": 2}
    assert request.messages == CHAT["messages"] and request.top_logprobs == 2


def test_completion_defaults_to_openais_16_tokens_and_chat_leaves_it_to_the_context():
    assert parse_completion(COMPLETION).params == {"max_tokens": 16}
    assert "max_tokens" not in parse_chat(CHAT).params
    assert parse_completion({**COMPLETION, "max_tokens": "32"}).params == {"max_tokens": 32}  # as genai-perf may send


@pytest.mark.parametrize("field, value, code", [
    ("n", 2, "unsupported_value"), ("tools", [{"type": "function"}], "unsupported_value"),
    ("response_format", {"type": "json_object"}, "unsupported_value"), ("presence_penalty", 0.5, "unsupported_value"),
    ("logit_bias", {"1": 5}, "unsupported_value"), ("functions", [], "unsupported_parameter"),
    ("foo", 1, "unsupported_parameter"),
])
def test_fields_it_cannot_honour_are_refused_naming_them(field, value, code):
    error = refused(parse_chat, {**CHAT, field: value})
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": field, "code": code}
    assert field in error["message"]


@pytest.mark.parametrize("body, words", [
    ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "top_logprobs": 2}, "needs logprobs"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "only allowed when stream"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text"),
    ({**CHAT, "logprobs": 1}, "boolean"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_bad_chat_values_are_400_with_a_message(body, words):
    assert words in refused(parse_chat, body)["message"]


@pytest.mark.parametrize("prompt", ["", [1, 2, 3], ["a", "b"], None])
def test_completion_prompts_must_be_one_string(prompt):
    refused(parse_completion, {**COMPLETION, "prompt": prompt})


def test_a_whole_chat_response_sums_tokens_and_reports_speculation():
    request = parse_chat(CHAT)
    body = response(request, [delta("Hel", 2), delta("lo", 1, "eos")])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello"}}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["spec_decode"] == {"num_drafted_tokens": 8, "num_accepted_tokens": 6, "acceptance_rate": 0.75}


def test_stream_chunks_carry_role_first_and_usage_last():
    request = parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    first, last = chunk(request, delta("Hel"), True, 0), chunk(request, delta("lo", 1, "length"), False, 3)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"} and first["usage"] is None
    assert "spec_decode" not in first and last["spec_decode"]["num_accepted_tokens"] == 6
    assert last["choices"][0]["finish_reason"] == "length"
    tail = usage_chunk(request, [delta("Hel"), delta("lo", 1, "length")])
    assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == 2


def test_logprobs_in_both_shapes_emitted_token_first():
    entry = {"7": {"logprob": -0.5, "rank": 2, "decoded_token": "b"},
             "3": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}}
    chat = response(parse_chat({**CHAT, "logprobs": True, "top_logprobs": 1}), [delta("b", 1, "eos", [entry])])
    assert chat["choices"][0]["logprobs"] == {"content": [
        {"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}]}
    text = chunk(parse_completion({**COMPLETION, "logprobs": 2}), delta("b", 1, "", [entry]), True, 4)
    assert text["choices"][0]["logprobs"] == {"tokens": ["b"], "token_logprobs": [-0.5],
                                              "top_logprobs": [{"a": -0.1, "b": -0.5}], "text_offset": [4]}
