"""Translate a Triton request's inputs (vllm_backend's tensor contract) into engine arguments.

Kept apart from model.py, which needs Triton's runtime, so that it can be tested and fuzzed alone.
"""
import json
import math
from dataclasses import dataclass, replace

from minedraft.sampling_params import InvalidRequest, SamplingParams

# vllm_backend's optional outputs, each switched on per request by a BOOL input of the same name.
RETURN_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens",
                "return_logprobs", "return_cumulative_logprob")


@dataclass
class ParsedRequest:
    prompt: str
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    returns: frozenset[str] = frozenset()  # the RETURN_FLAGS that are set


def parse_request(text_input, stream, sampling_parameters, exclude_input_in_output,
                  request_parameters: str | None, return_flags: dict | None = None) -> ParsedRequest:
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
    flags = {name: values.pop(name, None) for name in RETURN_FLAGS}  # /generate may pass them as parameters
    flags.update({k: v for k, v in (return_flags or {}).items() if v is not None})
    returns = frozenset(name for name, value in flags.items() if _flag(value, name))
    params = SamplingParams.from_dict(values)
    if params.logprobs is None and "return_cumulative_logprob" in returns:
        params = replace(params, logprobs=0)  # computing the sum needs each token's log-probability
    return ParsedRequest(prompt, params, _flag(stream_flag, "stream"),
                         _flag(exclude_flag, "exclude_input_in_output"), returns)


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
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(f"{name} must be a boolean")
