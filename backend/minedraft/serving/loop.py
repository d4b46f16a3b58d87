"""The serving loop around an Engine, without Triton: admission, the engine's thread, the
response thread, cancellation polling, failure fan-out and shutdown.

The Triton adapter (model.py) gives each request a `Responder`, which turns engine outputs into
responses; everything about *when* to respond lives here. The rule this module keeps: every
admitted request gets exactly one final response, and nothing after it, whatever fails.
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from minedraft.sampling_params import InvalidRequest, SamplingParams
from minedraft.sequence import RequestOutput

log = logging.getLogger("minedraft")

CANCEL_POLL_SECONDS = 0.05
# Error kinds a responder maps to its protocol's codes (Triton: TritonError.*).
INVALID, CANCELLED, INTERNAL, UNAVAILABLE = "invalid", "cancelled", "internal", "unavailable"


class Responder(Protocol):
    """One request's way back to its client (the Triton adapter's wraps a response sender)."""

    def send(self, output: RequestOutput, final: bool) -> None: ...

    def send_error(self, message: str, kind: str) -> None: ...  # always final

    def is_cancelled(self) -> bool: ...


class Observer(Protocol):
    """Metrics hooks; every call is guarded, so a failing one cannot stop serving."""

    def observe_step(self, engine) -> None: ...

    def observe_step_error(self, engine) -> None: ...

    def observe_finished(self, output: RequestOutput, arrival: float, first_token: float | None,
                         now: float) -> None: ...

    def observe_aborted(self, cancelled: bool) -> None: ...

    def observe_in_flight(self, count: int) -> None: ...


@dataclass
class _InFlight:
    responder: Responder
    arrival: float
    first_token_time: float | None = None
    final_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # one response at a time, none after FINAL


class ServingLoop:
    def __init__(self, engine, observer: Observer | None = None):
        """`engine`: an Engine, or a function that builds one, which the engine's thread then calls
        (see `_engine_loop`); a build that fails raises here."""
        self.engine = None
        self.observer = observer
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._outputs: queue.Queue = queue.Queue()
        self._next_id = 0
        self._running = True
        built, failure = threading.Event(), []
        self._engine_thread = threading.Thread(target=self._engine_loop, name="minedraft-engine", daemon=True,
                                               args=(engine if callable(engine) else lambda: engine, built, failure))
        self._sender_thread = threading.Thread(target=self._sender_loop, name="minedraft-sender", daemon=True)
        self._engine_thread.start()
        built.wait()
        if failure:
            raise failure[0]
        self._sender_thread.start()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # -- requests in ----------------------------------------------------------------------------
    def admit(self, responder: Responder, prompt: str, params: SamplingParams) -> None:
        """Queue a request, blocking while the engine is full (requests then wait in the caller's
        queue, under its policy). A refused request gets its one error response here."""
        entry = _InFlight(responder, time.monotonic())
        with self._lock:
            while self._running and self.engine.num_free_slots <= 0:
                self._work_ready.wait(0.05)
            if not self._running:
                self._send_error_once(entry, "server is shutting down", UNAVAILABLE)
                return
            request_id = str(self._next_id)
            self._next_id += 1
            # In flight before the engine sees it, so that no output of it can find it missing.
            self._in_flight[request_id] = entry
        try:
            # Outside the lock: tokenizing a long prompt must not hold up the engine or other requests.
            self.engine.submit(request_id, prompt, params)
        except InvalidRequest as exc:
            if self._send_error_once(entry, str(exc), INVALID):
                self._forget(request_id)
            return
        with self._lock:
            self._work_ready.notify_all()
        self._observe("observe_in_flight", self.num_in_flight)

    # -- the engine's thread ----------------------------------------------------------------------
    def _engine_loop(self, build, built: threading.Event, failure: list) -> None:
        # The thread that steps the engine builds it: built by another thread that lives on (Triton's
        # stub thread, which calls initialize), the Qwen pair's steps ran slower (docs/qwen-coder.md).
        try:
            self.engine = build()
        except BaseException as exc:
            failure.append(exc)
            return
        finally:
            built.set()
        while True:
            with self._lock:
                while self._running and not self.engine.has_work():
                    self.engine.note_idle()
                    self._work_ready.wait()
                if not self._running:
                    return
            try:
                outputs = self.engine.step()
                self._observe("observe_step", self.engine)
            except Exception as exc:  # an engine fault must end requests, not hang them
                log.exception("engine step failed")
                self._observe("observe_step_error", self.engine)
                outputs = self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            if outputs:
                self._outputs.put(outputs)
            with self._lock:
                self._work_ready.notify_all()  # slots may have freed up for a blocked admit()

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
                outputs = []
            if outputs is None:
                return
            for output in outputs:
                self._deliver(output)
            self._poll_cancellations()

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            entry = self._in_flight.get(output.request_id)
        if entry is None:
            return  # already answered (cancelled, failed, shut down)
        now = time.monotonic()
        if output.new_token_ids and entry.first_token_time is None:
            entry.first_token_time = now
        if output.finish_reason == "cancelled":
            self._finish_with_error(output.request_id, "request cancelled", CANCELLED)
        elif output.error is not None:
            self._finish_with_error(output.request_id, output.error, INTERNAL)
        else:
            with entry.lock:
                if entry.final_sent:
                    return
                try:
                    entry.responder.send(output, output.finished)
                    entry.final_sent = output.finished
                except Exception as exc:  # a failed send ends this request, never the sender thread
                    log.exception("sending a response for request %s failed", output.request_id)
                    self._send_error_once(entry, f"could not send a response: {exc}", INTERNAL, locked=True)
                    self._forget(output.request_id)
                    self.engine.cancel(output.request_id)
                    return
            if output.finished:
                self._forget(output.request_id)
                self._observe("observe_finished", output, entry.arrival, entry.first_token_time, now)

    def _finish_with_error(self, request_id: str, message: str, kind: str) -> None:
        with self._lock:
            entry = self._in_flight.get(request_id)
        if entry is not None and self._send_error_once(entry, message, kind):
            self._forget(request_id)
            self._observe("observe_aborted", kind == CANCELLED)

    def _send_error_once(self, entry: _InFlight, message: str, kind: str, locked: bool = False) -> bool:
        """The request's final response, unless it has one already; True if this call sent it."""
        if not locked:
            with entry.lock:
                return self._send_error_once(entry, message, kind, locked=True)
        if entry.final_sent:
            return False
        entry.final_sent = True
        try:
            entry.responder.send_error(message, kind)
        except Exception:
            log.exception("sending an error response failed")
        return True

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._in_flight.pop(request_id, None)
            count = len(self._in_flight)
        self._observe("observe_in_flight", count)

    def _poll_cancellations(self) -> None:
        with self._lock:
            entries = list(self._in_flight.items())
        for request_id, entry in entries:
            try:
                cancelled = entry.responder.is_cancelled()
            except Exception:
                log.exception("is_cancelled failed for request %s", request_id)
                cancelled = True  # a request we cannot ask about is one we cannot serve
            if cancelled:
                self.engine.cancel(request_id)
        with self._lock:
            if self.engine.has_work():
                self._work_ready.notify_all()

    def _observe(self, hook: str, *args) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            log.exception("metrics hook %s failed", hook)

    # -- shutdown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine's thread, end every request still in flight with one UNAVAILABLE
        response, then stop the sender. Idempotent."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._work_ready.notify_all()
        self._engine_thread.join()
        self._outputs.put(None)
        self._sender_thread.join()
        with self._lock:
            ids = list(self._in_flight)
        for request_id in ids:
            self._finish_with_error(request_id, "server is shutting down", UNAVAILABLE)
