"""The one-run goals table (`minedraft.tools.bench_goals`) reads each step's raw JSON as the tools
write it, and a run cut short still yields a table with what it measured."""
import json

import pytest
from minedraft.tools import bench_goals


def write(path, report):
    path.write_text(json.dumps(report))


def engine_report(**rates):
    return {"results": {mode: [{"concurrency": 1, "tokens_per_s": rate}] for mode, rate in rates.items()}}


def served_rows(*points):
    return {"rows": [{"setup": setup, "concurrency": c, "path": path, "tokens_per_s": rate}
                     for setup, c, path, rate in points]}


@pytest.fixture
def measured(tmp_path):
    write(tmp_path / "bandwidth.json", {"read_gb_s": 30.0, "threads": 2, "target_weight_bytes": 3_000_000_000})
    write(tmp_path / "demo-eager.json", engine_report(ar=160.0))
    write(tmp_path / "demo-compiled.json", engine_report(ar=170.0))
    write(tmp_path / "demo-static.json", engine_report(ar=400.0))
    write(tmp_path / "qwen-compiled.json", engine_report(ar=7.0, sd=11.0))
    write(tmp_path / "qwen-static.json", engine_report(ar=9.0, sd=12.0))
    write(tmp_path / "served.json", served_rows(("ar", 1, "compiled", 7.0), ("ar", 1, "eager", 5.0),
                                                ("auto_inline", 1, "compiled", 10.0), ("auto_inline", 1, "eager", 8.0),
                                                ("auto_inline", 8, "compiled", 30.0), ("auto_inline", 8, "eager", 20.0)))
    write(tmp_path / "load.json", served_rows(*[(s, c, "compiled", rate) for c in (1, 2, 4, 8, 16, 32)
                                                for s, rate in (("ar", 8.0 * c), ("sd", 10.0 + c), ("psd", 5.0),
                                                                ("auto_inline", 9.0 * c))]))
    write(tmp_path / "peer.json", {"skipped": None, "rows": [
        {"server": "minedraft", "setup": "qwen-coder-default", "tokens_per_s": 12.0},
        {"server": "llama.cpp", "setup": "ar", "tokens_per_s": 30.0},
        {"server": "llama.cpp", "setup": "speculative", "tokens_per_s": 15.0}]})
    return tmp_path


def by_goal(rows, goal, what_part=""):
    return [r for r in rows if r["goal"] == goal and what_part in r["what"]]


def test_the_table_takes_each_goal_from_its_steps_json(measured):
    rows = bench_goals.goal_rows(measured)
    assert by_goal(rows, "H1")[0]["value"] == 2.5 and by_goal(rows, "H1")[0]["met"] is False  # 1000 / 400
    assert by_goal(rows, "H2")[0]["value"] == 1.4 and by_goal(rows, "H2")[0]["met"] is True
    assert [r["value"] for r in by_goal(rows, "H3")] == [1.25, 1.5]
    assert by_goal(rows, "P3", "in-process")[0]["value"] == round(12.0 / 9.0, 3)  # best SD over best AR
    assert by_goal(rows, "P3", "served")[0]["value"] == round(11.0 / 8.0, 3)
    p7 = by_goal(rows, "P7")[0]
    assert p7["value"] == 0.9 and "in-process AR compile_sizes 1" in p7["measured"]  # 9 / (30e9 / 3e9)
    p2 = {r["what"]: r["value"] for r in by_goal(rows, "P2")}
    assert p2["served auto / best fixed set-up (ar, sd, psd) at c = 1"] == round(9.0 / 11.0, 3)  # SD is the best fixed there
    assert p2["served auto / best fixed set-up (ar, sd, psd) at c = 32"] == round(9.0 * 32 / (8.0 * 32), 3)
    assert by_goal(rows, "L1")[0]["value"] == 0.4  # against llama.cpp's faster set-up


def test_a_run_cut_short_keeps_what_it_measured_and_fills_the_docs_section(measured, tmp_path):
    (measured / "load.json").unlink()
    (measured / "peer.json").unlink()
    rows = bench_goals.goal_rows(measured)
    assert by_goal(rows, "H2")[0]["met"] is True
    assert all(r["met"] is None and r["measured"] == "not measured" for r in by_goal(rows, "P2") + by_goal(rows, "L1"))
    machine = {"cpu": "a CPU", "flags": "avx2", "cores": 2, "started": "now"}
    table = bench_goals.markdown(rows, {"demo": {"commands": ["python -m x"], "seconds": 1.0, "finished": "then"},
                                        "load": {"commands": ["python -m y"], "seconds": 2.0, "finished": "then",
                                                 "error": "exit status 1"}}, machine, measured)
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{bench_goals.BEGIN}\nold\n{bench_goals.END}\nafter\n")
    bench_goals.write_doc(doc, table)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{bench_goals.END}\nafter\n") and "old" not in text
    assert "| P2 | served auto / best fixed set-up (ar, sd, psd) at c = 8 | not measured |" in text
    assert "`load` (failed: exit status 1" in text and "`python -m x`" in text


def test_a_run_measures_afresh_and_a_failed_step_leaves_no_stale_figure(tmp_path, monkeypatch):
    """`main` with the tools' runs replaced: one step writes its report, one fails; the failed
    step's JSON from an earlier run is gone, and the table says what failed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_repository/qwen-coder/1/target").mkdir(parents=True)
    out, doc = tmp_path / "goals", tmp_path / "doc.md"
    out.mkdir()
    write(out / "served.json", served_rows(("ar", 1, "compiled", 9.0), ("ar", 1, "eager", 1.0)))  # an earlier run's
    doc.write_text(f"{bench_goals.BEGIN}\n{bench_goals.END}\n")
    steps = {"demo": [("demo-static.json", ["a_tool_that_writes"])], "served": [("served.json", ["a_tool_that_fails"])]}
    monkeypatch.setattr(bench_goals, "tool_steps", lambda out_dir: steps)
    monkeypatch.setattr(bench_goals, "STEPS", ("demo", "served"))

    def run_tool(argv, log):
        if argv == ["a_tool_that_writes"]:
            write(out / "demo-static.json", engine_report(ar=500.0))
            return 0
        return 1

    monkeypatch.setattr(bench_goals, "run_tool", run_tool)
    bench_goals.main(["--out", str(out), "--doc", str(doc)])
    rows = json.loads((out / "goals.json").read_text())["goals"]
    assert by_goal(rows, "H1")[0]["value"] == 2.0
    assert not (out / "served.json").exists() and by_goal(rows, "H2")[0]["met"] is None
    text = doc.read_text()
    assert "one run, started" in text and "`served` (failed: exit status 1" in text
    bench_goals.main(["--out", str(out), "--doc", str(doc), "--render"])  # measures nothing, writes the same
    assert doc.read_text() == text
