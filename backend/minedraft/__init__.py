"""minedraft: batch-parallel speculative decoding (MineDraft PSD) served as a Triton backend."""
from .config import ConfigError, EngineConfig
from .engine import Engine
from .sampling_params import InvalidRequest, SamplingParams
from .sequence import RequestOutput

__all__ = ["ConfigError", "Engine", "EngineConfig", "InvalidRequest", "RequestOutput", "SamplingParams"]
