"""Triton adapter for the minedraft engine (a Python-based backend: `backend: "minedraft"`).

It only translates: request tensors in, engine outputs back as decoupled responses. The
engine's own thread runs the step loop; a sender thread sends responses and polls for
cancellation, so neither sits on the other's path. execute() blocks while the engine is
full, which leaves queueing, queue policy and timeouts to Triton's dynamic batcher.
"""
import json
import os
import queue
import threading
import time
from dataclasses import fields

import numpy as np
import triton_python_backend_utils as pb_utils

from minedraft.config import EngineConfig
from minedraft.engine import Engine
from minedraft.request_parsing import parse_request
from minedraft.sampling_params import InvalidRequest
from minedraft.sequence import RequestOutput
from minedraft.triton_metrics import EngineMetrics

ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig))
ADAPTER_KEYS = ("report_metrics",)
CANCEL_POLL_SECONDS = 0.05
INPUTS = [("text_input", "TYPE_STRING", False), ("stream", "TYPE_BOOL", True),
          ("sampling_parameters", "TYPE_STRING", True), ("exclude_input_in_output", "TYPE_BOOL", True)]
OUTPUTS = [("text_output", "TYPE_STRING"), ("finish_reason", "TYPE_STRING"), ("num_input_tokens", "TYPE_UINT32"),
           ("num_output_tokens", "TYPE_UINT32"), ("num_draft_tokens", "TYPE_UINT32"),
           ("num_accepted_tokens", "TYPE_UINT32")]


class _InFlight:
    """What the adapter remembers of one request while the engine works on it."""

    def __init__(self, request, parsed, arrival: float):
        self.request = request
        self.sender = request.get_response_sender()
        self.parsed = parsed
        self.arrival = arrival
        self.text = ""  # non-streaming requests answer once, at the end
        self.first_token_time = None


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
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("minedraft needs `model_transaction_policy { decoupled: true }`")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        settings = _read_parameters(model_config, version_dir)
        report_metrics = settings.pop("report_metrics", "true").lower()
        if report_metrics not in ("true", "false"):
            raise pb_utils.TritonModelException(f"report_metrics must be true or false, got {report_metrics!r}")
        self.engine = Engine(EngineConfig.from_dict(settings))
        self.metrics = EngineMetrics(pb_utils, model_config["name"]) if report_metrics == "true" else None
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._outputs: queue.Queue = queue.Queue()
        self._next_id = 0
        self._running = True
        self._engine_thread = threading.Thread(target=self._engine_loop, name="minedraft-engine", daemon=True)
        self._sender_thread = threading.Thread(target=self._sender_loop, name="minedraft-sender", daemon=True)
        self._engine_thread.start()
        self._sender_thread.start()
        self.logger.log_info(f"minedraft: mode={self.engine.config.mode} "
                             f"k={self.engine.config.num_draft_tokens} max_num_seqs={self.engine.config.max_num_seqs}")

    # -- requests in ----------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            try:
                parsed = parse_request(*_raw_inputs(request))
            except InvalidRequest as exc:
                _send_error(request.get_response_sender(), str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            self._admit(request, parsed)
        return None

    def _admit(self, request, parsed) -> None:
        with self._lock:
            # Block while the engine is full: requests then wait in Triton's queue, under its policy.
            while self._running and self.engine.num_free_slots <= 0:
                self._work_ready.wait(0.05)
            if not self._running:
                _send_error(request.get_response_sender(), "server is shutting down", pb_utils.TritonError.UNAVAILABLE)
                return
            request_id = str(self._next_id)
            self._next_id += 1
            entry = _InFlight(request, parsed, time.monotonic())
            try:
                self.engine.submit(request_id, parsed.prompt, parsed.params)
            except InvalidRequest as exc:
                _send_error(entry.sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                return
            self._in_flight[request_id] = entry
            self._work_ready.notify_all()

    # -- the engine's thread ----------------------------------------------------------------------
    def _engine_loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self.engine.has_work():
                    self._work_ready.wait()
                if not self._running:
                    return
            try:
                outputs = self.engine.step()
                if self.metrics:
                    self.metrics.observe_step(self.engine)
            except Exception as exc:  # an engine bug must end requests, not hang them
                self.logger.log_error(f"minedraft: engine step failed: {exc!r}")
                outputs = self._fail_all(f"engine error: {exc}")
            if outputs:
                self._outputs.put(outputs)
            with self._lock:
                self._work_ready.notify_all()  # slots may have freed up for a blocked execute()

    def _fail_all(self, message: str) -> list[RequestOutput]:
        with self._lock:
            ids = list(self._in_flight)
        for request_id in ids:
            self.engine.cancel(request_id)
        return [RequestOutput(request_id, [], "", True, "error", 0, 0, 0, 0, error=message) for request_id in ids]

    # -- responses out ----------------------------------------------------------------------------
    def _sender_loop(self) -> None:
        while True:
            try:
                outputs = self._outputs.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                self._poll_cancellations()
                continue
            if outputs is None:
                return
            for output in outputs:
                self._send(output)
            self._poll_cancellations()

    def _send(self, output) -> None:
        with self._lock:
            entry = self._in_flight.get(output.request_id)
        if entry is None:
            return
        now = time.monotonic()
        if output.new_token_ids and entry.first_token_time is None:
            entry.first_token_time = now
        if output.finish_reason == "cancelled":
            self._finish_with_error(output.request_id, "request cancelled", pb_utils.TritonError.CANCELLED)
            return
        if output.error is not None:
            self._finish_with_error(output.request_id, output.error, pb_utils.TritonError.INTERNAL)
            return
        parsed = entry.parsed
        if parsed.stream:
            if output.text_delta or output.finished:
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if output.finished else 0
                entry.sender.send(self._response(output, output.text_delta), flags=flags)
        else:
            entry.text += output.text_delta
            if output.finished:
                text = entry.text if parsed.exclude_input_in_output else parsed.prompt + entry.text
                entry.sender.send(self._response(output, text), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if output.finished:
            self._forget(output.request_id)
            if self.metrics:
                self.metrics.observe_finished(output, entry.arrival, entry.first_token_time, now)

    @staticmethod
    def _response(output, text: str):
        def tensor(name, value, dtype):
            return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))
        return pb_utils.InferenceResponse(output_tensors=[
            tensor("text_output", text.encode("utf-8"), np.object_),
            tensor("finish_reason", (output.finish_reason or "").encode(), np.object_),
            tensor("num_input_tokens", output.num_input_tokens, np.uint32),
            tensor("num_output_tokens", output.num_output_tokens, np.uint32),
            tensor("num_draft_tokens", output.num_drafted_tokens, np.uint32),
            tensor("num_accepted_tokens", output.num_accepted_tokens, np.uint32),
        ])

    def _finish_with_error(self, request_id: str, message: str, code) -> None:
        with self._lock:
            entry = self._in_flight.get(request_id)
        if entry is not None:
            _send_error(entry.sender, message, code)
            self._forget(request_id)
            if self.metrics:
                self.metrics.observe_aborted(code == pb_utils.TritonError.CANCELLED)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._in_flight.pop(request_id, None)
            if self.metrics:
                self.metrics.in_flight.set(len(self._in_flight))

    def _poll_cancellations(self) -> None:
        with self._lock:
            entries = list(self._in_flight.items())
        for request_id, entry in entries:
            if entry.request.is_cancelled():
                self.engine.cancel(request_id)
        with self._lock:
            if self.engine.has_work():
                self._work_ready.notify_all()

    def finalize(self):
        """Abort in-flight requests (each gets its FINAL error response) and join the threads."""
        with self._lock:
            self._running = False
            self._work_ready.notify_all()
        self._engine_thread.join()
        with self._lock:
            ids = list(self._in_flight)
        for request_id in ids:
            self._finish_with_error(request_id, "server is shutting down", pb_utils.TritonError.UNAVAILABLE)
        self._outputs.put(None)
        self._sender_thread.join()
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
                value("exclude_input_in_output"), request.parameters())
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(f"cannot read inputs: {exc}") from None


def _send_error(sender, message: str, code) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
