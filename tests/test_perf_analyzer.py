"""run_with_export retries perf_analyzer runs whose export is not whole JSON (perf_analyzer 2.51 bug)."""
import stat

from minedraft.tools import perf_analyzer

# Writes a truncated export on its first run and a whole one after, exiting 0 both times.
FAKE = """#!/bin/sh
export_file="$2"
if [ -e "$0.ran" ]; then echo '{"experiments": []}' > "$export_file"; else echo '{"experiments": [{"reque' > "$export_file"; touch "$0.ran"; fi
"""


def test_a_truncated_export_is_run_again(tmp_path, monkeypatch):
    fake = tmp_path / "perf_analyzer"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(perf_analyzer, "perf_analyzer_binary", lambda: str(fake))
    export = tmp_path / "export.json"
    runs = []
    perf_analyzer.run_with_export(lambda attempt: runs.append(attempt) or [], export)
    assert runs == [0, 1]
    assert perf_analyzer.is_whole_json(export)
