"""OpenAI's completions and chat completions, as shapes: a request body checked and translated into
minedraft's sampling parameters, and Triton's outputs turned back into OpenAI's responses and
stream chunks. No I/O here (openai_api.py does it), so every rule is tested alone.

Nothing is silently ignored: a field this server cannot honour is refused with OpenAI's error
JSON (HTTP 400), unless it carries the value that changes nothing (`n: 1`, `tools: []`, ...).
"""
import json
import time
import uuid
from dataclasses import dataclass, field

from minedraft.sampling_params import InvalidRequest, SamplingParams

# Sampling fields passed to the server under the same name: OpenAI's, then vLLM's extensions
# (vLLM's OpenAI server takes them too) and ours, `num_draft_tokens`.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop",
                   "top_k", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                   "include_stop_str_in_output", "num_draft_tokens")
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "logprobs", "user", *SAMPLING_FIELDS}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# Fields accepted only at the value that changes nothing, each with why any other value is refused.
NEUTRAL_VALUES = {
    "n": (1, "one choice per request"),
    "best_of": (1, "one choice per request"),
    "presence_penalty": (0, "no penalties"),
    "frequency_penalty": (0, "no penalties"),
    "logit_bias": ({}, "no logit bias"),
    "echo": (False, "no prompt echo"),
    "suffix": ("", "no suffix insertion"),
    "tools": ([], "no tool calling"),
    "tool_choice": ("none", "no tool calling"),
    "response_format": ({"type": "text"}, "no structured output"),
}
CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the server's → OpenAI's
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


class OpenAIError(Exception):
    """An error as OpenAI reports it: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


@dataclass
class OpenAIRequest:
    """A checked request: what to generate from, with which parameters, and how to answer."""
    chat: bool
    model: str
    prompt: str | None  # completions: the text; chat: None until the template renders `messages`
    messages: list[dict] | None
    params: dict  # sampling parameters in the server's names, without max_tokens when left to its default
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no log-probabilities; else how many alternatives per token
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"


def parse_chat(body) -> OpenAIRequest:
    _check_fields(body, CHAT_FIELDS)
    logprobs = _typed(body, "logprobs", bool, False)
    top = _typed(body, "top_logprobs", int, None)
    if top is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.get("max_completion_tokens")  # OpenAI's newer name wins
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    return _request(body, True, None, _messages(body.get("messages")), max_tokens,
                    (top or 0) if logprobs else None)


def parse_completion(body) -> OpenAIRequest:
    _check_fields(body, COMPLETION_FIELDS)
    max_tokens = body.get("max_tokens")
    return _request(body, False, _prompt(body.get("prompt")), None,
                    COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
                    _typed(body, "logprobs", int, None))


def _request(body: dict, chat: bool, prompt, messages, max_tokens, top_logprobs) -> OpenAIRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options takes only include_usage", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False)
    params = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if top_logprobs is not None:
        params["logprobs"] = top_logprobs
    try:
        checked = SamplingParams.from_dict(params)  # the server's own rules, so a bad value is a 400 here
    except InvalidRequest as exc:
        raise invalid(str(exc)) from None
    if max_tokens is not None:
        params["max_tokens"] = checked.max_tokens  # a number, even if it came as a string ("32")
    return OpenAIRequest(chat, model, prompt, messages, params, stream, include_usage, top_logprobs)


def _check_fields(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    for name, value in body.items():
        if name in NEUTRAL_VALUES:
            neutral, reason = NEUTRAL_VALUES[name]
            if value is not None and value != neutral:
                raise invalid(f"{name}={json.dumps(value)} is not supported: this server has {reason}", name,
                              "unsupported_value")
        elif name not in known:
            raise invalid(f"Unrecognized request argument supplied: {name}", name, "unsupported_parameter")


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not kind:  # bool is an int to isinstance; here true is not 1
        raise invalid(f"{name} must be {'a boolean' if kind is bool else 'an integer'}, got {value!r}", name)
    return value


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise invalid("prompt must be one string (batches and token-id prompts are not supported)", "prompt")
    if not prompt:
        raise invalid("prompt is empty", "prompt")
    return prompt


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    return [_message(m) for m in messages]


def _message(message) -> dict:
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise invalid(f"each message needs a role among {', '.join(CHAT_ROLES)}", "messages")
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise invalid(f"message fields not supported: {', '.join(sorted(extra))}", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid("only text content parts are supported", "messages")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise invalid("message content must be a string or a list of text parts", "messages")
    return {**message, "content": content}


@dataclass
class Delta:
    """One Triton response: the new text and tokens, and the request's running totals."""
    text: str
    num_output_tokens: int  # new in this response
    finish_reason: str  # the server's ("" until the last response)
    num_input_tokens: int
    num_drafted_tokens: int  # running totals: what speculation did for this request
    num_accepted_tokens: int
    logprobs: list[dict] | None  # the server's, one entry per new token


def usage(deltas: list[Delta]) -> dict:
    prompt = deltas[-1].num_input_tokens if deltas else 0
    completion = sum(d.num_output_tokens for d in deltas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def spec_decode(delta: Delta) -> dict:
    """Our extension field (as vLLM and SGLang report speculation): the request's drafted and
    accepted tokens, so an OpenAI client sees what speculation did."""
    drafted, accepted = delta.num_drafted_tokens, delta.num_accepted_tokens
    return {"num_drafted_tokens": drafted, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


def response(request: OpenAIRequest, deltas: list[Delta]) -> dict:
    """The whole answer of a non-streaming request."""
    text = "".join(d.text for d in deltas)
    last = deltas[-1]
    choice = {"index": 0, "logprobs": _logprobs(request, deltas, 0), "finish_reason": _finish(last)}
    choice.update({"message": {"role": "assistant", "content": text}} if request.chat else {"text": text})
    return {**_head(request, "chat.completion" if request.chat else "text_completion"),
            "choices": [choice], "usage": usage(deltas), "spec_decode": spec_decode(last)}


def chunk(request: OpenAIRequest, delta: Delta, first: bool, text_offset: int) -> dict:
    """One stream event for one Triton response; the last one also carries `spec_decode`."""
    choice = {"index": 0, "logprobs": _logprobs(request, [delta], text_offset),
              "finish_reason": _finish(delta)}
    if request.chat:
        choice["delta"] = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
    else:
        choice["text"] = delta.text
    event = {**_head(request, "chat.completion.chunk" if request.chat else "text_completion"), "choices": [choice]}
    if request.include_usage:
        event["usage"] = None  # as OpenAI: only the extra last chunk carries it
    if delta.finish_reason:
        event["spec_decode"] = spec_decode(delta)
    return event


def usage_chunk(request: OpenAIRequest, deltas: list[Delta]) -> dict:
    """stream_options.include_usage: the extra last chunk, with no choices."""
    return {**_head(request, "chat.completion.chunk" if request.chat else "text_completion"),
            "choices": [], "usage": usage(deltas)}


def _head(request: OpenAIRequest, kind: str) -> dict:
    return {"id": request.id, "object": kind, "created": request.created, "model": request.model}


def _finish(delta: Delta) -> str | None:
    return FINISH_REASONS.get(delta.finish_reason, delta.finish_reason) if delta.finish_reason else None


def _logprobs(request: OpenAIRequest, deltas: list[Delta], text_offset: int) -> dict | None:
    if request.top_logprobs is None:
        return None
    tokens = [_token_logprobs(entry, request.top_logprobs) for d in deltas for entry in d.logprobs or []]
    if request.chat:
        return {"content": [{**_chat_token(token, logprob), "top_logprobs": [_chat_token(t, lp) for t, lp in top]}
                            for token, logprob, top in tokens]}
    offsets = []
    for token, _, _ in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [dict(top) for _, _, top in tokens], "text_offset": offsets}


def _token_logprobs(entry: dict, top_n: int) -> tuple[str, float, list[tuple[str, float]]]:
    """The server's entry for one token, {token_id: {logprob, rank, decoded_token}}, emitted token
    first: (its text, its log-probability, the top_n alternatives by rank)."""
    infos = list(entry.values())
    top = sorted((i for i in infos if i["rank"] <= top_n), key=lambda i: i["rank"])
    return infos[0]["decoded_token"], infos[0]["logprob"], [(i["decoded_token"], i["logprob"]) for i in top]


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
