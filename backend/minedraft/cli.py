"""`minedraft serve` runs tritonserver with the minedraft backend on a model repository."""
import argparse
import signal
import sys

from .launcher import DEFAULT_REPOSITORY, LaunchError, TritonServer


def serve(args) -> int:
    server = TritonServer(args.model_repository, args.http_port, args.grpc_port, args.metrics_port, args.triton_args)
    try:
        server.start()
        print(" ".join(server.command()), flush=True)
        server.wait_ready(args.ready_timeout)
    except LaunchError as exc:
        print(f"minedraft serve: {exc}", file=sys.stderr)
        server.stop()
        return 1
    print(f"\nminedraft is serving {server.model_repository}\n"
          f"  HTTP     http://{server.http_url}   (POST /v2/models/minedraft/generate_stream)\n"
          f"  gRPC     {server.grpc_url}\n"
          f"  metrics  {server.metrics_url}\n"
          f"Try: minedraft-client 'def fibonacci(n):'   (Ctrl-C stops the server)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minedraft", description="Batch-parallel speculative decoding on Triton")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="run tritonserver with the minedraft backend")
    p.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("triton_args", nargs="*", help="extra tritonserver flags, after --")
    p.set_defaults(run=serve)
    b = commands.add_parser("bench", help="AR vs SD vs PSD through tritonserver with perf_analyzer")
    from .bench import bench, main_args
    main_args(b)
    b.set_defaults(run=bench)
    s = commands.add_parser("simulate", help="predict AR/SD/PSD/flex throughput and latency from step costs")
    from .simulate import main_args as simulate_args, simulate
    simulate_args(s)
    s.set_defaults(run=simulate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
