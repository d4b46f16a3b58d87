"""The low-bit round's tools without their long runs: the peer benchmark reads the entry's config as
shipped and says why llama.cpp is skipped; the agreement measure counts departures and their margins."""
from pathlib import Path

import torch
from minedraft.tools import bench_peer
from minedraft.tools.eval_target_quantization import NEAR_TIE, compare
from minedraft.worker_process import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_the_peer_benchmark_serves_the_entry_as_shipped():
    parameters = bench_peer.shipped_parameters(ROOT / "model_repository" / "qwen-coder" / "1")
    assert parameters["mode"] == "auto" and parameters["draft_quantization"] == "int4"
    for key, link in (("target_model", "target"), ("draft_model", "draft")):
        assert parameters[key] == str((ROOT / "model_repository" / "qwen-coder" / "1" / link).resolve())


def test_a_closed_port_is_not_healthy():
    assert not bench_peer._healthy(f"http://127.0.0.1:{free_port()}/health")


def test_departures_are_counted_with_the_reference_margin():
    reference = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.95, 0.0], [0.0, 3.0, 0.0]]), dim=-1)
    quantized = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.9, 1.0, 0.0], [3.0, 0.0, 0.0]]), dim=-1)
    report = compare([reference], [quantized])
    assert report["positions"] == 3 and report["departures"] == 2
    assert report["top1_agreement"] == round(1 / 3, 4)
    assert report["departures_at_near_ties"] == 1  # the second position: margin 0.05 < NEAR_TIE
    assert report["departure_margins"][0] < NEAR_TIE < report["departure_margins"][1]


def test_the_policys_choices_are_read_from_the_counters():
    before = {"minedraft_draft_tokens_total": 10, "minedraft_accepted_tokens_total": 5,
              "minedraft_policy_steps_total/sd": 3}
    after = {"minedraft_draft_tokens_total": 30, "minedraft_accepted_tokens_total": 17,
             "minedraft_policy_steps_total/sd": 8, "minedraft_policy_steps_total/ar": 4}
    counts = bench_peer.policy_counts(before, after)
    assert counts["acceptance_rate"] == 0.6
    assert counts["steps_by_mode"]["sd"] == 5 and counts["steps_by_mode"]["ar"] == 4
    assert bench_peer.policy_counts(after, after)["acceptance_rate"] is None
