"""The compiled forward against `enforce_eager`, through the real tritonserver (issue 38's H2, H3).

    python -m minedraft.tools.bench_compiled [--model-dir model_repository/qwen-coder/1]
        [--setups ar auto_inline] [--paths compiled eager] [--concurrency 1 8] [--out FILE]

One server serves each set-up once per path over the same weights: `enforce_eager` false
(`compiled`) and true (`eager`), and `static` (false, with `compile_sizes` 1);
perf_analyzer streams held-out prompts through the chat template (fixed max_tokens, ignore_eos)
at each concurrency, the paths of a set-up measured one after the other. Throughput is the
server's generated-token counter over its steady span, as `minedraft bench` reads it. Prints JSON;
each path's ratio to the last path given is printed as it is measured.
"""
import argparse
import tempfile
from pathlib import Path

from minedraft.serving.launcher import TritonServer
from minedraft.worker_process import free_port

from .bench import bench_prompts, machine, measure_server, print_report
from .repository import write_repository
from .setups import SETUPS

PATHS = {"static": {"enforce_eager": False, "compile_sizes": "1"}, "compiled": {"enforce_eager": False},
         "eager": {"enforce_eager": True}}


def served_name(setup: str, path: str) -> str:
    return f"{SETUPS[setup][0]}_{path}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("model_repository/qwen-coder/1"))
    parser.add_argument("--setups", nargs="+", default=["ar", "auto_inline"], choices=list(SETUPS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--paths", nargs="+", default=["compiled", "eager"], choices=list(PATHS),
                        help="static: compiled with compile_sizes 1 (the one-row steps of target and draft as static graphs)")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--window-seconds", type=float, default=20.0)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompts", default="heldout")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--draft-quantization", default="int4")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.chat, args.learning_steps = True, 0
    prompts = bench_prompts(args)
    workdir = Path(tempfile.mkdtemp(prefix="minedraft-bench-compiled-"))
    weights = {"target_model": str(args.model_dir.resolve() / "target"),
               "draft_model": str(args.model_dir.resolve() / "draft"), "dtype": args.dtype,
               "draft_quantization": args.draft_quantization, "max_num_seqs": args.max_num_seqs,
               "num_draft_tokens": args.num_draft_tokens}
    models = {served_name(s, path): {**SETUPS[s][1], **weights, **PATHS[path]} for s in args.setups
              for path in args.paths}
    write_repository(workdir / "repo", models, max_batch_size=2 * args.max_num_seqs, queue_size=1024)
    rows = []
    # The launcher loads one model at a time, which takes long here (a static step graph alone
    # takes minutes).
    with TritonServer(workdir / "repo", *(free_port() for _ in range(3)), log_path=workdir / "server.log",
                      ready_timeout=3600) as server:
        for concurrency in args.concurrency:
            for setup in args.setups:
                k = 0 if setup.startswith("ar") else args.num_draft_tokens
                point = {}
                for path in args.paths:
                    point[path] = measure_server(server, setup, k, concurrency, prompts, args, workdir, 0.0,
                                                 model=served_name(setup, path))
                    rows.append({"path": path, **point[path]})
                last = point[args.paths[-1]]["tokens_per_s"]
                print(f"{setup} c={concurrency}: " + ", ".join(
                    f"{path} {point[path]['tokens_per_s']} tok/s ({point[path]['tokens_per_s'] / last:.2f}x)"
                    for path in args.paths), flush=True)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    print_report(report, args.out)


if __name__ == "__main__":
    main()
