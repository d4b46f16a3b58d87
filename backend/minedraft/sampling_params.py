"""Per-request sampling parameters, validated at submit so a bad request never reaches a batch."""
import math
from dataclasses import dataclass, field, fields


class InvalidRequest(ValueError):
    """A request the engine refuses; the message names the offending field."""


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
    num_draft_tokens: int | None = None  # None: the server's setting

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter(s): {', '.join(unknown)}")
        parsed = {name: _PARSERS[name](name, value) for name, value in values.items() if value is not None}
        params = cls(**parsed)
        params.validate()
        return params

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 0:
            raise InvalidRequest(f"num_draft_tokens must be >= 0, got {self.num_draft_tokens}")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")


def _int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if abs(value) > 2**63 - 1:
        raise InvalidRequest(f"{name} is out of range: {value!r}")
    return int(value)


def _float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(name, value):
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}")
    return value


def _stop(name, value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"{name} must be a string or a list of strings, got {value!r}")
    return tuple(value)


_PARSERS = {
    "max_tokens": _int, "min_tokens": _int, "top_k": _int, "seed": _int, "num_draft_tokens": _int,
    "temperature": _float, "top_p": _float, "ignore_eos": _bool, "stop": _stop,
}
