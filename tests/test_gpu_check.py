"""scripts/gpu_check.sh's CPU dry run: the same code as on a GPU, at toy sizes, end to end."""
import json
import re
import subprocess

from conftest import REPO
from minedraft.policy.cost_model import StepCosts


def test_gpu_check_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "gpu.md"
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = out.read_text()
    # Losslessness: every mode's greedy output equals HF's, and the sampled law holds.
    assert "ar 6/6, sd 6/6, psd 6/6: **pass**" in report
    pvalues = [float(p) for p in re.findall(r"(?:sd|psd) p = ([0-9.e-]+)", report)]
    assert len(pvalues) == 2 and min(pvalues) > 0.01
    # The sweep's rows (c = 1 and 2) with positive throughputs.
    sweep = re.findall(r"^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \(\d\) \| ([0-9.]+) \(\d\) \|", report, flags=re.M)
    assert [int(row[0]) for row in sweep] == [1, 2] and all(float(v) > 0 for row in sweep for v in row[1:])
    # The forward-cost table round-trips as StepCosts and feeds the simulator.
    costs = StepCosts(**json.loads(report.split("```json\n")[1].split("```")[0]))
    assert costs.batch_sizes == [1, 2, 4] and costs.max_k == 3
    assert all(t > 0 for row in costs.verify for t in row) and all(t > 0 for t in costs.draft)
    assert costs.draft_prefill_per_token > 0
    # Two cost pairs, each simulated at two acceptance rates.
    assert report.count("`minedraft simulate` on these costs") == 4 and "flex tok/s" in report
    assert report.count("## Forward costs: ") == 2
