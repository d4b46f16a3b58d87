"""`minedraft bench`: its steady-rate measurement, and a smoke run (three set-ups, two concurrencies) through the real server."""
import json

import pytest
from minedraft.prompts import PROMPT_SETS, prompts_path
from minedraft.tools.bench import (
    expected_rate,
    load_requests,
    rate_for_rerun,
    steady_rate,
)
from minedraft.tools.bench_engine import load_prompts
from minedraft.tools.cli import main


def test_steady_rate_counts_tokens_only_while_the_concurrency_is_held():
    """Readings (time, tokens, finished, steps) of 6 requests at concurrency 2, 10 tokens each: 100
    tokens/s while both are in flight, the ramp and drain at other rates that must not count."""
    samples = [(0.0, 0, 0, 0), (0.5, 10, 0, 5),  # ramp: prefill, slow
               (1.0, 40, 1, 10), (1.5, 90, 2, 15), (2.0, 140, 3, 20), (2.5, 190, 4, 25),  # held: 100 tokens/s
               (3.0, 200, 5, 30), (4.0, 210, 6, 35)]  # drain: one request left, then none
    assert steady_rate(samples, concurrency=2) == {"tokens_per_s": 100.0, "window_s": 1.5, "window_tokens": 150}
    # A policy that learns is measured only after its learning steps.
    assert steady_rate(samples, concurrency=2, learning_steps=15) == {
        "tokens_per_s": 100.0, "window_s": 1.0, "window_tokens": 100}
    assert steady_rate(samples, concurrency=2, learning_steps=30) is None  # never steady after learning
    assert steady_rate(samples, concurrency=6) is None  # all in flight at once: no span after the ramp


def test_a_point_is_sized_by_its_own_rate_at_the_load_before():
    rows = [{"setup": "ar", "num_draft_tokens": 0, "concurrency": 1, "tokens_per_s": 10.0},
            {"setup": "psd", "num_draft_tokens": 2, "concurrency": 1, "tokens_per_s": 5.0},
            {"setup": "ar", "num_draft_tokens": 0, "concurrency": 2, "tokens_per_s": 20.0}]
    assert expected_rate(rows, "psd", 2, 2) == 5.0  # its own, not the fastest at this load
    assert expected_rate(rows, "sd", 1, 2) == 20.0  # new: the fastest at this load
    assert expected_rate(rows, "ar", 0, 4) == 20.0  # the latest load before
    assert expected_rate([], "ar", 0, 1) == 0.0


def test_a_rerun_after_a_run_with_no_steady_span_is_sized_by_what_that_run_did():
    # The first point of a bench knows no rate (0): 4 steady requests of 12 tokens at a true
    # 200 tok/s end 0.3 s after perf_analyzer's 1 s start-up, too short to hold a steady span.
    window, true_rate, max_tokens, concurrency = 2.0, 200.0, 12, 4
    samples = [(0.0, 0, 0, 0), (1.0, 0, 0, 0), (1.3, 60, 5, 15)]
    assert steady_rate(samples, concurrency) is None
    rate = rate_for_rerun(0.0, None, samples, window)
    # The rerun's steady span at the true rate covers at least half the window (what bench accepts).
    steady_requests = load_requests(concurrency, max_tokens, window, rate, 0) - 1 - concurrency
    assert steady_requests * max_tokens / true_rate >= window / 2
    # A short steady span sizes the rerun by its rate with a margin, not by how short it was: the
    # rerun's span at that rate lies between half the window and twice it.
    rate = rate_for_rerun(50.0, {"tokens_per_s": true_rate, "window_s": 0.05}, samples, window)
    steady_requests = load_requests(concurrency, max_tokens, window, rate, 0) - 1 - concurrency
    assert window / 2 <= steady_requests * max_tokens / true_rate <= 2 * window


@pytest.mark.server
def test_bench_smoke_produces_a_well_formed_report(demo_pair, tmp_path):
    out = tmp_path / "docs"
    code = main(["bench", "--setups", "ar", "psd", "flex", "--concurrency", "1", "4", "--draft-lengths", "4",
                 "--max-tokens", "12", "--max-num-seqs", "4", "--window-seconds", "2", "--learning-steps", "20",
                 "--num-prompts", "8", "--hf-prompts", "1", "--engine-concurrency", "4", "--label", "toy", "--out", str(out)])
    assert code == 0
    report = (out / "benchmarks.md").read_text()
    figures = out / "bench" / "toy"
    assert report.endswith((figures / "benchmarks.md").read_text())  # the pair's section, assembled into the doc
    assert "### Goals" in report and all(f"| {goal} |" in report for goal in ("P1", "P3", "P4", "P5", "P6", "P7"))
    assert report.count("| P2 | flex / best fixed set-up") == 2
    raw = json.loads((figures / "raw.json").read_text())
    assert {(r["setup"], r["concurrency"]) for r in raw["rows"]} == {
        (s, c) for s in ("ar", "psd", "flex") for c in (1, 4)}
    flex = [r for r in raw["rows"] if r["setup"] == "flex"]
    assert all(sum(r["steps_by_mode"].values()) > 0 for r in flex)
    for row in raw["rows"]:
        assert row["tokens_per_s"] > 0 and row["window_s"] >= 1 and row["ttft_p50_ms"] > 0 and row["e2e_p99_ms"] >= row["e2e_p50_ms"]
    psd = [r for r in raw["rows"] if r["setup"] == "psd"]
    assert all(r["acceptance_rate"] is not None and 0 <= r["acceptance_rate"] <= 1 for r in psd)
    assert raw["hf_assisted"]["tokens_per_s"] > 0
    assert raw["memory"]["read_gb_s"]["1"] > 0 and raw["memory"]["target_weight_bytes"] > 1e6
    assert raw["prompt_tokens"] > 1
    assert (figures / "throughput.png").stat().st_size > 1000
    assert (figures / "latency.png").stat().st_size > 1000
    # The step costs flex measured feed the simulator, which predicts the measured rows.
    assert main(["simulate", "--costs", str(figures / "costs.json"), "--compare",
                 str(figures / "raw.json"), "--json"]) == 0


def test_prompt_sets_resolve_by_name_or_path(tmp_path):
    assert {"demo_pair", "heldout"} <= set(PROMPT_SETS)
    assert len(load_prompts(prompts_path("heldout"))) == 40
    own = tmp_path / "mine.jsonl"
    own.write_text('{"prompt": "def f():"}\n')
    assert load_prompts(prompts_path(str(own))) == ["def f():"]
    with pytest.raises(FileNotFoundError, match="neither a prompt set"):
        prompts_path("no-such-set")
