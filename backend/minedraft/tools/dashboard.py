"""Scrape a server's Prometheus metrics while load runs, and draw the panels of
docs/grafana-dashboard.json from them with matplotlib (for a picture without a Grafana at hand).

  python -m minedraft.tools.dashboard --metrics http://localhost:8002/metrics --model smollm2 \
      --seconds 120 --out docs/dashboard.png -- <load command, e.g. genai-perf profile ...>
"""
import argparse
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SAMPLE = re.compile(r'^(minedraft_\w+)(?:\{([^}]*)\})? (\S+)$')


def scrape(url: str, model: str) -> dict:
    """{(name, frozenset(labels without model)): value} for one model's minedraft series."""
    values = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        match = SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if labels.pop("model", model) != model:
            continue
        values[(match.group(1), frozenset(labels.items()))] = float(match.group(3))
    return values


def value(sample: dict, name: str, **labels) -> float:
    return sample.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def rate(samples, name, **labels):
    """Per-second increase between consecutive scrapes."""
    return [(b[0], (value(b[1], name, **labels) - value(a[1], name, **labels)) / (b[0] - a[0]))
            for a, b in zip(samples, samples[1:])]


def quantile(samples, name, q, window=5):
    """Prometheus' histogram_quantile over the increase of the buckets in a sliding window."""
    points = []
    for i in range(window, len(samples)):
        (t, now), (_, then) = samples[i], samples[i - window]
        buckets = sorted((float(dict(k[1])["le"]), now[k] - then.get(k, 0.0))
                         for k in now if k[0] == f"{name}_bucket")
        total = buckets[-1][1] if buckets else 0
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                upper = bound if bound != float("inf") else lower
                points.append((t, lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)))
                break
            lower, below = bound, count
    return points


def draw(samples: list, model: str, out: Path, max_positions: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = samples[0][0]
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))

    def plot(ax, points, label):
        ax.plot([t - start for t, _ in points], [v for _, v in points], label=label)

    ax = axes[0][0]
    plot(ax, rate(samples, "minedraft_generation_tokens_total"), "generated tokens/s")
    ax.set_title("Output throughput (tokens/s)")
    ax = axes[0][1]
    for kind in ("finished", "aborted", "cancelled"):
        plot(ax, rate(samples, f"minedraft_requests_{kind}_total"), kind)
    ax.set_title("Requests per second")
    for ax, name, title in ((axes[0][2], "minedraft_time_to_first_token_seconds", "Time to first token (s)"),
                            (axes[1][0], "minedraft_time_per_output_token_seconds", "Time per output token (s)")):
        for q in (0.5, 0.9, 0.99):
            plot(ax, quantile(samples, name, q), f"p{int(q * 100)}")
        ax.set_title(title)
    ax = axes[1][1]
    drafts = rate(samples, "minedraft_spec_decode_num_drafts_total")
    drafted = rate(samples, "minedraft_spec_decode_num_draft_tokens_total")
    accepted = rate(samples, "minedraft_spec_decode_num_accepted_tokens_total")
    plot(ax, [(t, a / d) for (t, a), (_, d) in zip(accepted, drafted) if d], "acceptance rate")
    plot(ax, [(t, 1 + a / n) for (t, a), (_, n) in zip(accepted, drafts) if n], "mean acceptance length")
    ax.set_title("Acceptance rate and mean acceptance length")
    ax = axes[1][2]
    for position in range(max_positions):
        per_position = rate(samples, "minedraft_spec_decode_num_accepted_tokens_per_pos_total", position=position)
        plot(ax, [(t, a / n) for (t, a), (_, n) in zip(per_position, drafts) if n], f"position {position}")
    ax.set_title("Acceptance by draft position")
    ax = axes[2][0]
    for mode in ("ar", "sd", "psd"):
        plot(ax, rate(samples, "minedraft_policy_steps_total", mode=mode), f"{mode} steps/s")
    ax.set_title("Mode of each step")
    ax = axes[2][1]
    for name, label in (("minedraft_draft_length", "k"), ("minedraft_batch_size_a", "batch A"),
                        ("minedraft_batch_size_b", "batch B"), ("minedraft_requests_in_flight", "in flight")):
        plot(ax, [(t, value(s, name)) for t, s in samples], label)
    ax.set_title("Draft length k and batch sizes")
    ax = axes[2][2]
    plot(ax, rate(samples, "minedraft_drafter_failures_total"), "drafter failures/s")
    plot(ax, rate(samples, "minedraft_step_errors_total"), "failed steps/s")
    plot(ax, [(t, value(s, "minedraft_server_restarts")) for t, s in samples], "server restarts")
    ax.set_title("Faults")
    for ax in axes.flat:
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"minedraft dashboard panels (docs/grafana-dashboard.json), model {model}, "
                 f"drawn with matplotlib from /metrics scraped every second")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=120, help="the longest to scrape")
    parser.add_argument("--positions", type=int, default=4, help="draft positions to plot")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("load", nargs=argparse.REMAINDER, help="the load command, after --")
    args = parser.parse_args(argv)
    load = subprocess.Popen(args.load[1:] if args.load[:1] == ["--"] else args.load) if args.load else None
    samples, deadline = [], time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), scrape(args.metrics, args.model)))
        if load is not None and load.poll() is not None:
            break
        time.sleep(1.0)
    samples.append((time.monotonic(), scrape(args.metrics, args.model)))
    if load is not None and load.poll() is None:
        load.terminate()
    draw(samples, args.model, args.out, args.positions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
