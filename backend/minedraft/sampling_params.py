"""Per-request sampling parameters, validated at submit so a bad request never reaches a batch."""
import math
from dataclasses import dataclass, field, fields, replace


class InvalidRequest(ValueError):
    """A request the engine refuses; the message names the offending field."""


# Bounds that keep one request from slowing everyone (each new token searches the text for every
# stop string) and that float32 sampling can honour. Documented in README "Request parameters".
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # top alternatives per token, as in vLLM's default max_logprobs
MAX_TEMPERATURE = 100.0
# Below this a temperature is greedy, as in vLLM (its _SAMPLING_EPS): logits divided by it
# overflow float32.
GREEDY_TEMPERATURE = 1e-5
# The most probable token always has probability >= 1/vocabulary > 1e-6 (vocabularies under a
# million), so every top_p at or below this keeps exactly that token: clamping to it is exact and
# avoids a float32 underflow to 0.
MIN_TOP_P = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled, as in vLLM
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # end the request like EOS ("stop")
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # sequences per request: only 1
    logprobs: int | None = None  # log-probabilities of the emitted tokens plus this many top alternatives
    num_draft_tokens: int | None = None  # None: the server's setting

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InvalidRequest(f"unknown sampling parameter(s): {', '.join(unknown[:5])}{more}")
        parsed = {name: _PARSERS[name](name, value) for name, value in values.items() if value is not None}
        params = cls(**parsed)
        params.validate()
        return params.normalised()

    def normalised(self) -> "SamplingParams":
        """Tiny temperatures and top_p values replaced by exact float32-safe equivalents."""
        temperature = 0.0 if self.temperature < GREEDY_TEMPERATURE else self.temperature
        return replace(self, temperature=temperature, top_p=max(self.top_p, MIN_TOP_P))

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 0:
            raise InvalidRequest(f"num_draft_tokens must be >= 0, got {self.num_draft_tokens}")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        if self.n != 1:
            raise InvalidRequest(f"n must be 1 (one sequence per request), got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequest(f"stop: each string at most {MAX_STOP_CHARS} characters")


# Numbers and booleans may arrive as strings ("32", "0.7", "true"): genai-perf sends them so, and
# Triton's vllm_backend accepts them. Anything else that is not a number is refused, naming the key.
def _number_from_string(name, value, kind: str):
    try:
        number = float(value.strip())
    except ValueError:
        raise InvalidRequest(f"{name} must be {kind}, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"{name} must be finite, got {value!r}")
    return number


def _int(name, value):
    if isinstance(value, str):
        value = _number_from_string(name, value, "an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if abs(value) > 2**63 - 1:
        raise InvalidRequest(f"{name} is out of range: {value!r}")
    return int(value)


def _float(name, value):
    if isinstance(value, str):
        value = _number_from_string(name, value, "a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be finite, got {value!r}")
    return float(value)


def _bool(name, value):
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}")
    return value


def _stop(name, value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"{name} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _token_ids(name, value):
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest(f"{name} must be a list of token ids, got {value!r}")
    return tuple(_int(name, v) for v in value)


_PARSERS = {
    "max_tokens": _int, "min_tokens": _int, "top_k": _int, "seed": _int, "num_draft_tokens": _int, "n": _int,
    "logprobs": _int, "temperature": _float, "top_p": _float, "ignore_eos": _bool, "stop": _stop,
    "stop_token_ids": _token_ids, "include_stop_str_in_output": _bool, "skip_special_tokens": _bool,
}
