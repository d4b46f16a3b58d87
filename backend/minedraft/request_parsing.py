"""Translate a Triton request's inputs (vllm_backend's tensor contract) into engine arguments.

Kept apart from model.py, which needs Triton's runtime, so that it can be tested and fuzzed alone.
"""
import json
import math
from dataclasses import dataclass

from .sampling_params import InvalidRequest, SamplingParams


@dataclass
class ParsedRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def parse_request(text_input, stream, sampling_parameters, exclude_input_in_output,
                  request_parameters: str | None) -> ParsedRequest:
    """Each argument is the raw input value (bytes/str/bool/None); raises InvalidRequest.

    `sampling_parameters` (JSON) wins; without it the request parameters are used, which is
    how Triton's /generate endpoint passes them. Either may also carry `stream` and
    `exclude_input_in_output` when those inputs are absent.
    """
    prompt = _text(text_input, "text_input")
    if not prompt:
        raise InvalidRequest("text_input is empty")
    values = _json_object(sampling_parameters, "sampling_parameters") if sampling_parameters is not None \
        else _json_object(request_parameters or "{}", "request parameters")
    stream_flag = values.pop("stream", None) if stream is None else stream
    exclude_flag = values.pop("exclude_input_in_output", None) if exclude_input_in_output is None \
        else exclude_input_in_output
    return ParsedRequest(prompt, SamplingParams.from_dict(values),
                         _flag(stream_flag, "stream"), _flag(exclude_flag, "exclude_input_in_output"))


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name} is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"{name} must be a string")


def _json_object(value, name: str) -> dict:
    text = _text(value, name)
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{name} must be a JSON object")
    for key, item in parsed.items():
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidRequest(f"{name}: {key} must be finite")
    return parsed


def _reject_constant(name: str):
    raise InvalidRequest(f"non-standard JSON constant {name} is not allowed")


def _flag(value, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and isinstance(value.item(), bool):
        return value.item()
    raise InvalidRequest(f"{name} must be a boolean")
