"""Triton adapter for the minedraft engine (a Python-based backend: `backend: "minedraft"`).

It only translates: request tensors in (request_parsing), engine outputs back as decoupled
responses (TritonResponder), engine settings from the model config. The serving loop, its
threads, cancellation and failure handling live in minedraft.serving.loop, which runs without Triton.
"""
import json
import locale
import logging
import os
from dataclasses import fields

import numpy as np
import triton_python_backend_utils as pb_utils

from minedraft.config import EngineConfig
from minedraft.engine.llm_engine import Engine
from minedraft.sampling_params import InvalidRequest
from minedraft.sequence import RequestOutput
from minedraft.serving.loop import (
    CANCELLED,
    INTERNAL,
    INVALID,
    UNAVAILABLE,
    ServingLoop,
)
from minedraft.serving.request_parsing import RETURN_FLAGS, ParsedRequest, parse_request
from minedraft.serving.triton_metrics import EngineMetrics

ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig))
ADAPTER_KEYS = ("report_metrics",)
INPUTS = [("text_input", "TYPE_STRING", False), ("stream", "TYPE_BOOL", True),
          ("sampling_parameters", "TYPE_STRING", True), ("exclude_input_in_output", "TYPE_BOOL", True),
          *((flag, "TYPE_BOOL", True) for flag in RETURN_FLAGS)]
OUTPUTS = [("text_output", "TYPE_STRING"), ("finish_reason", "TYPE_STRING"), ("num_input_tokens", "TYPE_UINT32"),
           ("num_output_tokens", "TYPE_UINT32"), ("num_drafted_tokens", "TYPE_UINT32"),
           ("num_accepted_tokens", "TYPE_UINT32"), ("cumulative_logprob", "TYPE_FP32"), ("logprobs", "TYPE_STRING")]
ERROR_CODES = {INVALID: "INVALID_ARG", CANCELLED: "CANCELLED", INTERNAL: "INTERNAL", UNAVAILABLE: "UNAVAILABLE"}


def _read_files_as_utf8() -> None:
    """The python backend's stub embeds Python without its C-locale coercion, so under a server
    started in the C locale (a container's default) open() reads ASCII, and inductor fails on the
    generated code it reads back (it quotes the model's source, where transformers writes UTF-8).
    The stub runs one model: its character type locale is ours to set."""
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class TritonResponder:
    """One request's decoupled responses, with vllm_backend's meanings: when streaming, each
    response carries the new text, `num_output_tokens` new tokens and their `logprobs`; otherwise
    one response carries all of it (and the prompt first, unless exclude_input_in_output)."""

    def __init__(self, request, parsed: ParsedRequest):
        self.request = request
        self.sender = request.get_response_sender()
        self.parsed = parsed
        self.text = ""
        self.logprobs: list[dict] = []
        self.tokens_sent = 0  # output tokens reported so far

    def send(self, output: RequestOutput, final: bool) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.logprobs += output.logprobs or []
        if self.parsed.stream:
            if output.text_delta or final:
                self.sender.send(self._response(output, output.text_delta), flags=flags)
            return
        self.text += output.text_delta
        if final:
            text = self.text if self.parsed.exclude_input_in_output else self.parsed.prompt + self.text
            self.sender.send(self._response(output, text), flags=flags)

    def _response(self, output: RequestOutput, text: str):
        def tensor(name, value, dtype):
            return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))
        new_tokens, self.tokens_sent = output.num_output_tokens - self.tokens_sent, output.num_output_tokens
        tensors = [
            tensor("text_output", text.encode("utf-8"), np.object_),
            tensor("finish_reason", (output.finish_reason or "").encode(), np.object_),
            tensor("num_input_tokens", output.num_input_tokens, np.uint32),
            tensor("num_output_tokens", new_tokens, np.uint32),
            # Ours: running totals of the request's drafted and accepted tokens.
            tensor("num_drafted_tokens", output.num_drafted_tokens, np.uint32),
            tensor("num_accepted_tokens", output.num_accepted_tokens, np.uint32),
        ]
        if "return_cumulative_logprob" in self.parsed.returns:
            tensors.append(tensor("cumulative_logprob", output.cumulative_logprob or 0.0, np.float32))
        if "return_logprobs" in self.parsed.returns:
            logprobs = self.logprobs if self.parsed.params.logprobs is not None else None
            tensors.append(tensor("logprobs", json.dumps(logprobs).encode(), np.object_))
        self.logprobs = []
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def send_error(self, message: str, kind: str) -> None:
        _send_error(self.sender, message, getattr(pb_utils.TritonError, ERROR_CODES[kind]))

    def is_cancelled(self) -> bool:
        return self.request.is_cancelled()


class TritonLogHandler(logging.Handler):
    """The engine's log records ("minedraft" logger) into tritonserver's log through pb_utils.Logger:
    its calibration, flex's switches and drafter failures beside the server's own lines."""

    def emit(self, record):
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        for name, dtype, optional in INPUTS:
            config.add_input({"name": name, "data_type": dtype, "dims": [1], "optional": optional})
        for name, dtype in OUTPUTS:
            config.add_output({"name": name, "data_type": dtype, "dims": [-1]})
        config.set_model_transaction_policy({"decoupled": True})
        return config

    def initialize(self, args):
        _read_files_as_utf8()
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("minedraft needs `model_transaction_policy { decoupled: true }`")
        logger = logging.getLogger("minedraft")
        logger.setLevel(logging.INFO)
        logger.addHandler(TritonLogHandler())  # one model per stub process, so once per process
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        settings = _read_parameters(model_config, version_dir)
        report_metrics = settings.pop("report_metrics", "true").lower()
        if report_metrics not in ("true", "false"):
            raise pb_utils.TritonModelException(f"report_metrics must be true or false, got {report_metrics!r}")
        config = EngineConfig.from_dict(settings)
        self.metrics = EngineMetrics(pb_utils, model_config["name"], config.num_draft_tokens) \
            if report_metrics == "true" else None
        self.serving = ServingLoop(lambda: Engine(config), self.metrics)  # built in the thread that steps it
        self.engine = self.serving.engine
        pb_utils.Logger.log_info(f"minedraft: mode={self.engine.config.mode} k={self.engine.config.num_draft_tokens} "
                                 f"max_num_seqs={self.engine.config.max_num_seqs}")

    def execute(self, requests):
        for request in requests:
            try:
                parsed = parse_request(*_raw_inputs(request))
            except InvalidRequest as exc:
                _send_error(request.get_response_sender(), str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            self.serving.admit(TritonResponder(request, parsed), parsed.prompt, parsed.params)
        return None

    def finalize(self):
        """Every request still in flight gets its FINAL error response; then the engine stops."""
        self.serving.close()
        self.engine.close()
        if self.metrics:
            self.metrics.close()
            self.metrics = None


def _read_parameters(model_config: dict, version_dir: str) -> dict:
    settings = {}
    for key, value in model_config.get("parameters", {}).items():
        if key not in ENGINE_KEYS + ADAPTER_KEYS:
            raise pb_utils.TritonModelException(
                f"unknown parameter {key!r}; known: {', '.join(ENGINE_KEYS + ADAPTER_KEYS)}")
        settings[key] = value["string_value"]
    for key in ("target_model", "draft_model"):
        if key in settings and not os.path.isabs(settings[key]):
            settings[key] = os.path.join(version_dir, settings[key])
    return settings


def _raw_inputs(request):
    def value(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        array = tensor.as_numpy().reshape(-1)
        if array.size != 1:
            raise InvalidRequest(f"{name} must hold exactly one element, got {array.size}")
        item = array[0]
        return bool(item) if array.dtype == np.bool_ else item
    try:
        return (value("text_input"), value("stream"), value("sampling_parameters"),
                value("exclude_input_in_output"), request.parameters(), {flag: value(flag) for flag in RETURN_FLAGS})
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"cannot read inputs: {exc}") from None


def _send_error(sender, message: str, code) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
