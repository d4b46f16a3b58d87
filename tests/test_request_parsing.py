"""The Triton adapter's request parsing, alone and fuzzed: a request either parses or gets InvalidRequest;
stop strings are bounded in number and length."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minedraft.sampling_params import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    InvalidRequest,
    SamplingParams,
)
from minedraft.serving.request_parsing import parse_request

KEYS = ["max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos",
        "num_draft_tokens", "stream", "exclude_input_in_output", "stop_token_ids", "include_stop_str_in_output",
        "skip_special_tokens", "n", "logprobs", "return_logprobs", "return_num_output_tokens", "bogus", ""]
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
SAMPLING_JSON = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), ODD_VALUES, max_size=6).map(lambda d: json.dumps(d, allow_nan=True)),
    st.text(max_size=40), st.sampled_from(["", "[]", "null", "1e999", '{"max_tokens": 1e999}', "{" * 5000]))
TEXT = st.one_of(st.text(max_size=200), st.binary(max_size=50), st.sampled_from(["", "x" * 100_000]))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, sampling=st.one_of(st.none(), SAMPLING_JSON), stream=st.one_of(st.none(), st.booleans()),
       request_parameters=st.one_of(st.none(), SAMPLING_JSON))
def test_any_request_parses_or_is_rejected_cleanly(text, sampling, stream, request_parameters):
    try:
        parsed = parse_request(text, stream, sampling, None, request_parameters)
    except InvalidRequest as exc:
        assert str(exc)
        return
    assert parsed.prompt
    parsed.params.validate()
    assert isinstance(parsed.stream, bool)


def test_sampling_parameters_json_wins_over_request_parameters():
    parsed = parse_request(b"def f():", None, '{"max_tokens": 5, "stream": true}', None, '{"max_tokens": 9}')
    assert parsed.params.max_tokens == 5 and parsed.stream


def test_generate_endpoint_parameters_are_the_fallback():
    parsed = parse_request("def f():", None, None, None, '{"max_tokens": 9, "temperature": 0, "stop": "\\n"}')
    assert parsed.params == SamplingParams(max_tokens=9, temperature=0.0, stop=("\n",))
    assert not parsed.stream and not parsed.exclude_input_in_output


@pytest.mark.parametrize("sampling,message", [
    ("{oops", "JSON"), ("[1]", "object"), ('{"max_tokens": -1}', "max_tokens"), ('{"top_p": NaN}', "NaN"),
    ('{"temperature": 1e999}', "finite"), ('{"bogus": 1}', "unknown"), ('{"stop": [1, 2]}', "stop"),
    ('{"seed": 1.5}', "integer"), ('{"ignore_eos": "yes"}', "true or false"),
])
def test_invalid_sampling_parameters_name_the_problem(sampling, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request("def f():", None, sampling, None, None)


@pytest.mark.parametrize("stop,message", [
    (["a"] * (MAX_STOP_STRINGS + 1), "at most"), (["a" * (MAX_STOP_CHARS + 1)], "characters")])
def test_stop_strings_are_bounded(stop, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams.from_dict({"stop": stop})
    assert SamplingParams.from_dict({"stop": ["a" * MAX_STOP_CHARS] * MAX_STOP_STRINGS}).stop


def test_empty_or_undecodable_prompt_is_rejected():
    with pytest.raises(InvalidRequest, match="empty"):
        parse_request(b"", None, None, None, None)
    with pytest.raises(InvalidRequest, match="UTF-8"):
        parse_request(b"\xff\xfe", None, None, None, None)


# -- values that arrive as strings, as genai-perf sends them and vllm_backend accepts them -------
INT_KEYS = ["max_tokens", "top_k", "seed", "num_draft_tokens", "logprobs"]
FLOAT_KEYS = ["temperature", "top_p"]
BOOL_KEYS = ["ignore_eos", "include_stop_str_in_output", "skip_special_tokens"]


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(INT_KEYS), value=st.integers(min_value=1, max_value=20),
       pad=st.sampled_from(["", " "]))
def test_integers_may_arrive_as_strings(key, value, pad):
    parsed = parse_request("hi", None, json.dumps({key: f"{pad}{value}{pad}"}), None, None)
    assert getattr(parsed.params, key) == value


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(FLOAT_KEYS), value=st.floats(min_value=0.05, max_value=1.0))
def test_floats_may_arrive_as_strings(key, value):
    parsed = parse_request("hi", None, json.dumps({key: repr(value)}), None, None)
    assert getattr(parsed.params, key) == pytest.approx(value)


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_booleans_may_arrive_as_strings(key, text, expected):
    assert getattr(parse_request("hi", None, json.dumps({key: text}), None, None).params, key) is expected


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(INT_KEYS + FLOAT_KEYS + BOOL_KEYS),
       text=st.text(max_size=12).filter(lambda t: t.strip().lower() not in ("true", "false")))
def test_strings_that_are_not_numbers_are_refused_naming_the_key(key, text):
    try:
        float(text)
        if key not in BOOL_KEYS:
            return  # a number after all
    except ValueError:
        pass
    with pytest.raises(InvalidRequest, match=key):
        parse_request("hi", None, json.dumps({key: text}), None, None)


def test_genai_perf_request_parses():
    """What genai-perf 0.0.16 sends with --backend vllm."""
    parsed = parse_request(b"hello", True, '{"max_tokens":"32","ignore_eos":"true"}', None, None)
    assert parsed.params.max_tokens == 32 and parsed.params.ignore_eos and parsed.stream


def test_vllm_contract_keys():
    parsed = parse_request("hi", None, json.dumps({"stop_token_ids": [5, "7"], "include_stop_str_in_output": True,
                                                   "skip_special_tokens": False, "n": 1, "logprobs": 2}), None,
                           None, {"return_logprobs": True, "return_num_output_tokens": False})
    assert parsed.params.stop_token_ids == (5, 7) and parsed.params.include_stop_str_in_output
    assert not parsed.params.skip_special_tokens and parsed.params.logprobs == 2
    assert parsed.returns == {"return_logprobs"}
    with pytest.raises(InvalidRequest, match="n must be 1"):
        parse_request("hi", None, '{"n": 2}', None, None)
    with pytest.raises(InvalidRequest, match="logprobs"):
        parse_request("hi", None, '{"logprobs": 99}', None, None)
    # the cumulative log-probability alone still needs each token's log-probability computed
    assert parse_request("hi", None, None, None, None, {"return_cumulative_logprob": True}).params.logprobs == 0
