"""minedraft: batch-parallel speculative decoding (MineDraft PSD) served as a Triton backend."""
from minedraft.config import ConfigError, EngineConfig
from minedraft.engine.llm_engine import Engine
from minedraft.sampling_params import InvalidRequest, SamplingParams
from minedraft.sequence import RequestOutput

__all__ = ["ConfigError", "Engine", "EngineConfig", "InvalidRequest", "RequestOutput", "SamplingParams"]
