"""The OpenAI-compatible HTTP entry in front of tritonserver: GET /v1/models, POST /v1/completions
and POST /v1/chat/completions (streaming or not), translated to Triton's gRPC streaming API with
tritonclient's asyncio client. It holds no engine: the models stay served by Triton. Chat templates
are applied here, from each model's own tokenizer (the `target_model` its config names).

`minedraft serve --openai-port 9000` runs it beside the server it starts; beside a tritonserver
started otherwise (the container's), run it alone:

    python -m minedraft.serving.openai_api --port 9000 --grpc-url localhost:8001 --model-repository /models
"""
import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
import jinja2
import tritonclient.grpc.aio as triton_aio
from aiohttp import web
from minedraft_client.grpc_stream import request_inputs
from tritonclient.utils import InferenceServerException

from minedraft.config import EngineConfig
from minedraft.model.loading import load_tokenizer
from minedraft.serving import openai_protocol as protocol
from minedraft.serving.launcher import DEFAULT_REPOSITORY
from minedraft.serving.openai_protocol import Delta, OpenAIError, OpenAIRequest, invalid

ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
# Triton's own messages for load it turns away, which a client should retry (503), not report (500).
BUSY_MESSAGES = ("Exceeds maximum queue size", "server is shutting down")
SHUTDOWN_GRACE_SECONDS = 5  # open streams get this long when the entry stops
CLIENT = web.AppKey("client", triton_aio.InferenceServerClient)


@dataclass(frozen=True)
class ServedModel:
    name: str
    tokenizer: object  # the target's, as the engine loads it
    max_model_len: int
    # A fast tokenizer's call resets its truncation state, so two threads at once fail ("Already borrowed").
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


class ModelCatalog:
    """The models Triton serves, each with its tokenizer and context length, looked up once."""

    def __init__(self, client: triton_aio.InferenceServerClient, repository: Path):
        self.client, self.repository = client, repository
        self._models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()  # a model's first requests, arriving together, load it once

    async def ready_names(self) -> list[str]:
        index = await _triton(self.client.get_model_repository_index(as_json=True))
        return sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"})

    async def get(self, name: str) -> ServedModel:
        async with self._lock:
            if name not in self._models:
                self._models[name] = await self._load(name)
            return self._models[name]

    async def _load(self, name: str) -> ServedModel:
        if name not in await self.ready_names():
            raise OpenAIError(404, f"The model `{name}` does not exist or is not ready", "model", "model_not_found")
        config = (await _triton(self.client.get_model_config(name, as_json=True)))["config"]
        settings = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        versions = (await _triton(self.client.get_model_metadata(name, as_json=True)))["versions"]
        target = Path(settings.get("target_model", ENGINE_DEFAULTS["target_model"]))
        # A relative path resolves against the version directory, as the backend resolves it.
        path = target if target.is_absolute() else self.repository / name / max(versions, key=int) / target
        tokenizer = await asyncio.to_thread(_load_tokenizer, name, path)
        return ServedModel(name, tokenizer, int(settings.get("max_model_len", ENGINE_DEFAULTS["max_model_len"])))


CATALOG = web.AppKey("catalog", ModelCatalog)


def _load_tokenizer(model: str, path: Path):
    """The engine's own loader, so that the entry counts tokens exactly as the engine does."""
    try:
        return load_tokenizer(str(path))
    except (OSError, ValueError) as exc:
        raise OpenAIError(500, f"cannot load the tokenizer of `{model}` from {path}: {exc}") from None


async def _triton(call):
    """A tritonclient call whose failure (Triton down or restarting) is a 503 for the client."""
    try:
        return await call
    except InferenceServerException as exc:
        raise OpenAIError(503, f"the Triton server is not reachable: {exc.message()}") from None


def render_chat(model: ServedModel, messages: list[dict]) -> str:
    if not model.tokenizer.chat_template:
        raise invalid(f"model `{model.name}` has no chat template; send raw text to /v1/completions",
                      "messages", "no_chat_template")
    try:
        return model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise invalid(f"the chat template of `{model.name}` refused the messages: {exc}", "messages") from None


def fit_to_context(model: ServedModel, prompt: str, params: dict) -> dict:
    """The prompt checked against the context as the engine counts it; max_tokens defaults to
    what is left of it (chat) and may not exceed it (as OpenAI and vLLM answer)."""
    prompt_tokens = len(model.tokenizer(prompt).input_ids)
    room = model.max_model_len - prompt_tokens
    max_tokens = params.get("max_tokens", room)
    if room < 1 or max_tokens > room:
        raise invalid(f"This model's maximum context length is {model.max_model_len} tokens. However, you "
                      f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                      f"{max_tokens} for the completion).", "messages", "context_length_exceeded")
    return {**params, "max_tokens": max_tokens}


async def prepare(model: ServedModel, request: OpenAIRequest) -> tuple[str, dict]:
    """(prompt text, sampling parameters) for Triton; the tokenizer works off the event loop."""
    def work():
        with model.tokenizer_lock:
            prompt = render_chat(model, request.messages) if request.chat else request.prompt
            return prompt, fit_to_context(model, prompt, request.params)
    return await asyncio.to_thread(work)


async def triton_deltas(client, model: str, prompt: str, params: dict, logprobs: bool):
    """The request's Deltas from Triton's gRPC stream. Leaving early (the client went away)
    cancels the Triton request; an error response raises OpenAIError."""
    inputs = request_inputs(prompt, params, stream=True, returns=("return_logprobs",) if logprobs else ())
    done = asyncio.Event()

    async def one_request():
        yield {"model_name": model, "inputs": inputs, "parameters": {"triton_enable_empty_final_response": True}}
        await done.wait()  # our side of the stream stays open until the last response, as tritonclient's does

    call = client.stream_infer(one_request())
    try:
        async for result, error in call:
            if error is not None:
                done.set()
                raise OpenAIError(_error_status(error.message()), error.message())
            response = result.get_response()
            if response.outputs:
                yield _delta(result)
            if response.parameters["triton_final_response"].bool_param:
                done.set()
                return
        raise OpenAIError(502, "the Triton server ended the stream before the request's last response")
    except grpc.RpcError as exc:
        raise OpenAIError(503, f"the Triton server is not reachable: {exc.details()}") from None
    finally:
        if not done.is_set():
            call.cancel()  # the gRPC stream's cancellation is what cancels the request in Triton
        done.set()


def _error_status(message: str) -> int:
    return 503 if any(busy in message for busy in BUSY_MESSAGES) else 500


def _delta(result) -> Delta:
    def scalar(name):
        array = result.as_numpy(name)
        return None if array is None else array.reshape(-1)[0]
    logprobs = scalar("logprobs")
    return Delta(text=scalar("text_output").decode("utf-8"), num_output_tokens=int(scalar("num_output_tokens")),
                 finish_reason=scalar("finish_reason").decode(), num_input_tokens=int(scalar("num_input_tokens")),
                 num_drafted_tokens=int(scalar("num_drafted_tokens")),
                 num_accepted_tokens=int(scalar("num_accepted_tokens")),
                 logprobs=json.loads(logprobs) if logprobs is not None else None)


async def whole_response(request: OpenAIRequest, deltas) -> web.Response:
    received = [delta async for delta in deltas]
    if not received:
        raise OpenAIError(502, "the Triton server answered with no output")
    return web.json_response(protocol.response(request, received))


async def event_stream(http_request: web.Request, request: OpenAIRequest, deltas) -> web.StreamResponse:
    """Server-sent events, opened at the first output so that an error before it is an HTTP
    error; an error after it is an error event, and the stream ends."""
    events, received, text_offset = None, [], 0
    try:
        async for delta in deltas:
            if events is None:
                events = await _open_events(http_request)
            await _send(events, protocol.chunk(request, delta, not received, text_offset))
            received.append(delta)
            text_offset += len(delta.text)
        if events is None:
            raise OpenAIError(502, "the Triton server answered with no output")
        if request.include_usage:
            await _send(events, protocol.usage_chunk(request, received))
    except OpenAIError as exc:
        if events is None:
            raise
        await _send(events, exc.body())
    await events.write(b"data: [DONE]\n\n")
    return events


async def _open_events(http_request: web.Request) -> web.StreamResponse:
    events = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await events.prepare(http_request)
    return events


async def _send(events: web.StreamResponse, body: dict) -> None:
    await events.write(f"data: {json.dumps(body)}\n\n".encode())


async def complete(http_request: web.Request, parse) -> web.StreamResponse:
    try:
        body = json.loads(await http_request.text())
    except ValueError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    request = parse(body)
    model = await http_request.app[CATALOG].get(request.model)
    prompt, params = await prepare(model, request)
    deltas = triton_deltas(http_request.app[CLIENT], model.name, prompt, params, request.top_logprobs is not None)
    async with contextlib.aclosing(deltas):  # leaving early, even cancelled, cancels the Triton request
        if request.stream:
            return await event_stream(http_request, request, deltas)
        return await whole_response(request, deltas)


async def chat_completions(http_request: web.Request) -> web.StreamResponse:
    return await complete(http_request, protocol.parse_chat)


async def completions(http_request: web.Request) -> web.StreamResponse:
    return await complete(http_request, protocol.parse_completion)


async def list_models(http_request: web.Request) -> web.Response:
    names = await http_request.app[CATALOG].ready_names()
    return web.json_response({"object": "list", "data": [_model_card(name) for name in names]})


async def retrieve_model(http_request: web.Request) -> web.Response:
    name = http_request.match_info["model"]
    if name not in await http_request.app[CATALOG].ready_names():
        raise OpenAIError(404, f"The model `{name}` does not exist or is not ready", "model", "model_not_found")
    return web.json_response(_model_card(name))


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "minedraft"}


@web.middleware
async def openai_errors(http_request: web.Request, handler):
    """Every error in OpenAI's shape, aiohttp's own (unknown path, wrong method) included."""
    try:
        return await handler(http_request)
    except OpenAIError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(OpenAIError(exc.status, exc.reason).body(), status=exc.status)


def make_app(grpc_url: str, model_repository) -> web.Application:
    async def triton_client(app):
        app[CLIENT] = triton_aio.InferenceServerClient(grpc_url)  # made inside the loop it serves
        app[CATALOG] = ModelCatalog(app[CLIENT], Path(model_repository).resolve())
        yield
        await app[CLIENT].close()

    app = web.Application(middlewares=[openai_errors])
    app.cleanup_ctx.append(triton_client)
    app.add_routes([web.get("/v1/models", list_models), web.get("/v1/models/{model}", retrieve_model),
                    web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat_completions)])
    return app


class OpenAIEntry:
    """The entry on a thread and event loop of its own, beside `minedraft serve`'s supervisor,
    which keeps the main thread for signals. It outlives a restart of tritonserver (gRPC reconnects).
    Handlers are cancelled when their client disconnects, which cancels the Triton request."""

    def __init__(self, port: int, grpc_url: str, model_repository, host: str = "0.0.0.0"):
        self.port, self.grpc_url, self.model_repository, self.host = port, grpc_url, model_repository, host
        self._loop = self._stopping = self._thread = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}/v1"

    def start(self) -> "OpenAIEntry":
        """Returns once the port is open; raises OSError when it cannot be (taken, say)."""
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve(started)), name="minedraft-openai",
                                        daemon=True)
        self._thread.start()
        started.result()
        return self

    async def _serve(self, started: concurrent.futures.Future) -> None:
        runner = web.AppRunner(make_app(self.grpc_url, self.model_repository), handler_cancellation=True,
                               shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:  # the port taken, say: start() raises it
            await runner.cleanup()
            started.set_exception(exc)
            return
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        started.set_result(None)
        await self._stopping.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(SHUTDOWN_GRACE_SECONDS + 5)
            self._loop = None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minedraft.serving.openai_api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--grpc-url", default="localhost:8001", help="the tritonserver's gRPC endpoint")
    parser.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY),
                        help="the server's repository: where each model's tokenizer is")
    args = parser.parse_args(argv)
    web.run_app(make_app(args.grpc_url, args.model_repository), host=args.host, port=args.port,
                handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)


if __name__ == "__main__":
    main()
