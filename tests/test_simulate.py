"""`minedraft simulate`: the closed-loop predictions, the fit against benchmark rows, the CLI."""
import json

import pytest
from conftest import REPO
from minedraft.policy.cost_model import StepCosts, expected_tokens
from minedraft.tools.cli import main
from minedraft.tools.simulate import (
    acceptance_rate,
    best,
    compare,
    fit_alpha,
    parse_draft_lengths,
    predict,
)

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]


def step_costs(draft_per_step=0.001, prefill_per_token=0.0, max_k=8) -> StepCosts:
    """Verification grows with the tokens it scores (rows x (1 + k)) on top of a fixed 10 ms."""
    verify = [[0.010 + 0.0005 * b * (1 + k) for k in range(max_k + 1)] for b in BATCH_SIZES]
    draft = [draft_per_step(b) if callable(draft_per_step) else draft_per_step for b in BATCH_SIZES]
    return StepCosts(BATCH_SIZES, verify, draft, overhead_per_row=0.0001, prefill_per_token=prefill_per_token)


def at(results, mode, k=None):
    return next(r for r in results if r["mode"] == mode and (k is None or r["k"] == k))


def test_a_free_accurate_draft_makes_sd_beat_ar_at_concurrency_1():
    results = predict(step_costs(draft_per_step=0.0), 0.9, 1, 48, 32, range(1, 9))
    assert best(results, "sd")["tokens_per_s"] > 2 * at(results, "ar")["tokens_per_s"]


def test_psd_at_concurrency_1_is_sequential_sd():
    results = predict(step_costs(), 0.7, 1, 48, 32, [2, 4])
    for k in (2, 4):
        psd, sd = at(results, "psd", k), at(results, "sd", k)
        assert psd["tokens_per_s"] == sd["tokens_per_s"] and "sequential SD" in psd["note"]
    assert not at(results, "flex")["choice"].startswith("psd")


def test_psd_beats_sd_when_drafting_costs_as_much_as_verifying_over_many_rows():
    # k draft steps cost about one verification, so SD pays twice; PSD hides the draft.
    k = 4
    costs = step_costs(draft_per_step=lambda b: (0.010 + 0.0005 * b * (1 + k)) / k)
    results = predict(costs, 0.7, 32, 48, 32, [k])
    assert at(results, "psd", k)["tokens_per_s"] > 1.3 * at(results, "sd", k)["tokens_per_s"]
    # A PSD row is verified every other step.
    psd = at(results, "psd", k)
    assert psd["itl_ms"] == pytest.approx(2 * psd["step_ms"] / expected_tokens(0.7, k))


def test_a_useless_draft_makes_flex_pick_ar():
    results = predict(step_costs(draft_per_step=0.002), 0.01, 16, 48, 32, range(1, 9))
    flex = at(results, "flex")
    assert flex["choice"] == "ar" and flex["tokens_per_s"] == at(results, "ar")["tokens_per_s"]


@pytest.mark.parametrize("draft_prefill_per_token", [0.0, 0.002])
def test_flex_is_never_worse_than_the_fixed_modes(draft_prefill_per_token):
    costs = step_costs(draft_per_step=lambda b: 0.002 + 0.0001 * b)
    costs.draft_prefill_per_token = draft_prefill_per_token  # speculation also pays the draft's prefill
    for c in (1, 2, 8, 64):
        results = predict(costs, 0.6, c, 48, 32, range(1, 9))
        assert at(results, "flex")["tokens_per_s"] >= max(r["tokens_per_s"] for r in results) - 1e-9


def test_the_drafts_prefill_costs_speculation_only():
    plain, charged = step_costs(), step_costs()
    charged.draft_prefill_per_token = 0.002
    for mode, k in (("ar", None), ("sd", 2), ("psd", 2)):
        before, after = (at(predict(costs, 0.6, 4, 48, 100, [2]), mode, k) for costs in (plain, charged))
        if mode == "ar":
            assert after["tokens_per_s"] == pytest.approx(before["tokens_per_s"])
        else:
            assert after["tokens_per_s"] < before["tokens_per_s"]


def test_archived_costs_files_still_load_and_compare():
    """The README's simulate command: a costs file calibrated with threads per step (removed)."""
    archive = REPO / "docs" / "archive" / "bench" / "smollm2-flex-5"
    costs = StepCosts.load(archive / "costs.json")
    assert costs.max_k >= 1 and costs.draft_prefill_per_token == 0.0
    assert main(["simulate", "--costs", str(archive / "costs.json"), "--compare", str(archive / "raw.json"),
                 "--json"]) == 0


@pytest.mark.parametrize("max_num_seqs", [None, 4])
def test_throughput_and_latency_obey_littles_law(max_num_seqs):
    for c in (1, 3, 16):
        results = predict(step_costs(prefill_per_token=0.0002), 0.6, c, 48, 100, [2, 4], max_num_seqs)
        for r in results:
            assert r["tokens_per_s"] * r["e2e_ms"] / 1e3 == pytest.approx(c * 48)
    # One AR request alone: its first token after prefill and a step, then one a step.
    ar = at(predict(step_costs(prefill_per_token=0.0002), 0.6, 1, 48, 100, []), "ar")
    assert ar["ttft_ms"] + 47 * ar["itl_ms"] == pytest.approx(ar["e2e_ms"])


def test_the_row_cap_queues_requests():
    free, capped = (predict(step_costs(), 0.6, 16, 48, 32, [2], cap) for cap in (None, 4))
    assert at(capped, "ar")["rows"] == 4 and at(capped, "psd")["rows"] == 8
    assert at(capped, "ar")["tokens_per_s"] < at(free, "ar")["tokens_per_s"]
    assert at(capped, "ar")["ttft_ms"] > 10 * at(free, "ar")["ttft_ms"]


def test_prefill_costs_throughput():
    fast, slow = (at(predict(step_costs(prefill_per_token=p), 0.6, 4, 48, 200, [2]), "sd")
                  for p in (0.0, 0.0005))
    assert slow["tokens_per_s"] < fast["tokens_per_s"] and slow["ttft_ms"] == pytest.approx(fast["ttft_ms"] + 100)


def test_draft_lengths_beyond_the_costs_table_are_refused():
    with pytest.raises(ValueError, match="1..4"):
        predict(step_costs(max_k=4), 0.6, 4, 48, 32, [2, 6])


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.75, 0.97])
def test_alpha_fit_round_trips(alpha, k):
    assert fit_alpha(acceptance_rate(alpha, k), k) == pytest.approx(alpha, abs=1e-9)


def test_parse_draft_lengths():
    assert parse_draft_lengths(["1..8"]) == list(range(1, 9))
    assert parse_draft_lengths(["2", "4", "1..2"]) == [1, 2, 4]


def raw_bench(costs) -> dict:
    """Benchmark rows as `minedraft bench` writes them, measured at exactly the model's predictions
    for the sd row and 20% below them for the psd row."""
    alpha = 0.7
    sd = at(predict(costs, alpha, 4, 48, 32, [2], 32), "sd")
    psd = at(predict(costs, alpha, 8, 48, 32, [4], 32), "psd")
    flex = at(predict(costs, alpha, 16, 48, 32, range(1, 9), 32), "flex")

    def row(setup, k, c, tokens_per_s, rate):
        return {"setup": setup, "num_draft_tokens": k, "concurrency": c, "tokens_per_s": tokens_per_s,
                "acceptance_rate": rate, "e2e_p50_ms": 100.0}
    return {"args": {"max_tokens": 48, "max_num_seqs": 32, "num_prompts": 8},
            "rows": [row("sd_1core", 2, 4, sd["tokens_per_s"], acceptance_rate(alpha, 2)),
                     row("psd", 4, 8, 0.8 * psd["tokens_per_s"], acceptance_rate(alpha, 4)),
                     row("flex", 8, 16, flex["tokens_per_s"], acceptance_rate(alpha, 8)),
                     row("ar_1core", 0, 2, 100.0, None), row("sd", 2, 4, 50.0, 0.6), row("ar", 0, 4, 50.0, None)]}


def test_compare_fits_alpha_per_row_and_reports_signed_errors():
    costs = step_costs()
    result = compare(costs, raw_bench(costs), 32)
    by_setup = {r["setup"]: r for r in result["rows"]}
    assert set(by_setup) == {"sd_1core", "psd", "flex", "ar_1core"} and result["not_modelled"] == ["ar", "sd"]
    assert by_setup["sd_1core"]["alpha"] == pytest.approx(0.7, abs=1e-4)
    assert by_setup["sd_1core"]["error"] == pytest.approx(0, abs=1e-3)
    assert by_setup["psd"]["error"] == pytest.approx(0.25, abs=1e-3)  # predicted / (0.8 x predicted) - 1
    assert result["mean_abs_error"]["psd"] == pytest.approx(0.25, abs=1e-3)
    # Flex picks its own k: compared with the flex prediction over k = 1..8, at the alpha fitted at k = 8.
    assert by_setup["flex"]["error"] == pytest.approx(0, abs=1e-3) and by_setup["flex"]["choice"] != "flex"


def test_cli_prints_every_mode(tmp_path, capsys):
    path = tmp_path / "costs.json"
    path.write_text(step_costs(prefill_per_token=0.0001).to_json())
    assert main(["simulate", "--costs", str(path), "--alpha", "0.6", "--concurrency", "1", "8", "64",
                 "--max-tokens", "48", "--prompt-tokens", "60", "--draft-lengths", "1..8"]) == 0
    out = capsys.readouterr().out
    for heading in ("AR tok/s", "SD tok/s", "PSD tok/s", "flex tok/s", "choice"):
        assert heading in out
    assert len(out.strip().splitlines()) == 2 + 3  # summary, header, one line per concurrency

    assert main(["simulate", "--costs", str(path), "--concurrency", "4", "--draft-lengths", "2", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["mode"] for r in results} == {"ar", "sd", "psd", "flex"}


def test_cli_compare(tmp_path, capsys):
    costs = step_costs()
    (tmp_path / "costs.json").write_text(costs.to_json())
    (tmp_path / "raw.json").write_text(json.dumps(raw_bench(costs)))
    assert main(["simulate", "--costs", str(tmp_path / "costs.json"), "--compare", str(tmp_path / "raw.json"),
                 "--prompt-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "mean absolute relative error" in out and "+25.0%" in out and "not modelled: ar, sd" in out


def test_cli_refuses_draft_lengths_the_costs_do_not_cover(tmp_path, capsys):
    path = tmp_path / "costs.json"
    path.write_text(step_costs(max_k=4).to_json())
    assert main(["simulate", "--costs", str(path), "--draft-lengths", "1..8"]) == 2
    assert "draft lengths must be in 1..4" in capsys.readouterr().err


def test_no_psd_candidates_without_a_drafter_beside_the_target():
    """An inline drafter on CPU drafts in the step thread: a PSD step would not overlap anything,
    so auto's rule must not offer it (it once chose PSD at 5+ rows on the Qwen pair for that)."""
    from minedraft.policy.cost_model import candidates
    assert any(c.mode == "psd" for c in candidates(4, 8))
    assert {c.mode for c in candidates(4, 8, overlaps=False)} == {"ar", "sd"}
