"""minedraft-client: stream a completion from a minedraft model over gRPC or HTTP generate_stream."""
import argparse
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .grpc_stream import StreamError, request_inputs, responses


@dataclass
class Chunk:
    text: str
    finish_reason: str
    num_output_tokens: int
    num_drafted_tokens: int
    num_accepted_tokens: int


def sampling_parameters(args) -> dict:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None,
              "num_draft_tokens": args.num_draft_tokens, "ignore_eos": args.ignore_eos or None}
    return {k: v for k, v in params.items() if v is not None}


def stream_grpc(url: str, model: str, prompt: str, params: dict):
    """Yields Chunks from Triton's gRPC bidirectional stream; raises on an error response."""
    try:
        for result in responses(url, model, request_inputs(prompt, params)):
            yield _grpc_chunk(result)
    except StreamError as exc:
        raise RuntimeError(str(exc)) from None


def _grpc_chunk(result) -> Chunk:
    def item(name):
        value = result.as_numpy(name).reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else int(value)
    return Chunk(item("text_output"), item("finish_reason"), item("num_output_tokens"),
                 item("num_drafted_tokens"), item("num_accepted_tokens"))


def stream_http(url: str, model: str, prompt: str, params: dict):
    """Yields Chunks from the HTTP generate_stream endpoint (server-sent events)."""
    body = json.dumps({"text_input": prompt, "stream": True, "parameters": params}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        for line in response:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            yield Chunk(event["text_output"], event["finish_reason"], event["num_output_tokens"],
                        event["num_drafted_tokens"], event["num_accepted_tokens"])


REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def chat_template(args):
    """The model's tokenizer, when chatting: the server takes plain text, so the client applies
    the chat template (as OpenAI-style front ends do) from the repository's tokenizer files."""
    if args.no_chat:
        return None
    path = Path(args.tokenizer) if args.tokenizer else REPOSITORY / args.model / "1" / "target"
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if args.tokenizer:
            raise SystemExit(f"minedraft-client: no tokenizer in {path}")
        return None
    return tokenizer if tokenizer.chat_template else None


def run_turn(args, url, prompt, echo) -> tuple[str, int]:
    stream = stream_grpc if args.protocol == "grpc" else stream_http
    started, last, text, tokens = time.monotonic(), None, "", 0
    if echo:
        sys.stdout.write(prompt)
    try:
        for chunk in stream(url, args.model, prompt, sampling_parameters(args)):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            text += chunk.text
            tokens += chunk.num_output_tokens  # each response carries its new tokens
            last = chunk
    except (RuntimeError, OSError) as exc:
        print(f"\nminedraft-client: {exc}", file=sys.stderr)
        return text, 1
    elapsed = time.monotonic() - started
    if last is not None:
        rate = last.num_accepted_tokens / last.num_drafted_tokens if last.num_drafted_tokens else float("nan")
        print(f"\n\n[{tokens} tokens in {elapsed:.2f}s: {tokens / elapsed:.1f} tokens/s, "
              f"acceptance {rate:.2f} ({last.num_accepted_tokens}/{last.num_drafted_tokens}), "
              f"finish: {last.finish_reason}]", file=sys.stderr)
    return text, 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minedraft-client", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="omit it to chat turn by turn")
    parser.add_argument("--model", default="qwen-coder")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", help="host:port (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    parser.add_argument("--tokenizer", help="directory with the model's tokenizer and chat template "
                                            "(default: model_repository/<model>/1/target)")
    parser.add_argument("--no-chat", action="store_true", help="send the prompt as raw text (completion)")
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--num-draft-tokens", type=int)
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args(argv)
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    tokenizer = chat_template(args)
    if tokenizer is None:
        if args.prompt is None:
            parser.error("a prompt is needed when the model has no chat template")
        return run_turn(args, url, args.prompt, echo=True)[1]
    messages = [{"role": "system", "content": args.system}] if args.system else []
    questions = [args.prompt] if args.prompt is not None else _read_questions()
    for question in questions:
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer, code = run_turn(args, url, prompt, echo=False)
        if code:
            return code
        messages.append({"role": "assistant", "content": answer})
    return 0


def _read_questions():
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            return
        if line.strip():
            yield line


if __name__ == "__main__":
    sys.exit(main())
