"""`minedraft serve` as an operator runs it: SIGTERM and Ctrl-C stop it within its exit timeout
with nothing left behind, and a tritonserver that crashes is restarted and reported."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from minedraft.serving.triton_metrics import read_metrics
from minedraft.tools.processes import descendants
from minedraft.tools.repository import write_repository
from minedraft.worker_process import free_port
from test_reliability import _is_zombie

pytestmark = pytest.mark.server
EXIT_TIMEOUT = 20


def wait_for_log(tmp_path, text, timeout=180):
    deadline = time.monotonic() + timeout
    while text not in (tmp_path / "serve.log").read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged"
        time.sleep(0.3)


def start_serve(tmp_path):
    root = write_repository(tmp_path / "repo", {"minedraft": {"max_num_seqs": 2}}, max_batch_size=4)
    ports = [free_port() for _ in range(3)]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "minedraft.tools.cli", "serve", "--model-repository", str(root),
                                "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                "--metrics-port", str(ports[2]), "--exit-timeout", str(EXIT_TIMEOUT)],
                               stdout=log, stderr=subprocess.STDOUT)
    wait_ready(ports[0], process)
    wait_for_log(tmp_path, "minedraft is serving")  # the launcher has seen it ready too
    return process, ports


def wait_ready(http_port, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "minedraft serve exited"
        try:
            if urllib.request.urlopen(f"http://localhost:{http_port}/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("not ready")


def tritonserver_pid(launcher_pid):
    return next(pid for pid in descendants(launcher_pid) if "tritonserver" in open(f"/proc/{pid}/cmdline").read())


def alive(pids):
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_on_sigterm_and_ctrl_c_leaving_nothing_behind(tmp_path, signum):
    process, _ = start_serve(tmp_path)
    children = descendants(process.pid)
    assert children
    started = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=EXIT_TIMEOUT + 15)
    assert time.monotonic() - started < EXIT_TIMEOUT + 15
    assert code == 0
    time.sleep(0.5)
    assert not alive(children), (tmp_path / "serve.log").read_text()[-2000:]


def test_a_crashed_tritonserver_is_restarted_and_reported(tmp_path):
    process, (http_port, _, metrics_port) = start_serve(tmp_path)
    try:
        first = tritonserver_pid(process.pid)
        # auto calibrates at load: the launcher loads one model at a time, restarts included
        assert "--model-load-thread-count=1" in Path(f"/proc/{first}/cmdline").read_text().split("\0")
        os.kill(first, signal.SIGSEGV)
        wait_for_log(tmp_path, "serving again after restart 1")
        wait_ready(http_port, process)
        second = tritonserver_pid(process.pid)
        assert second != first
        assert "--model-load-thread-count=1" in Path(f"/proc/{second}/cmdline").read_text().split("\0")
        log = (tmp_path / "serve.log").read_text()
        assert "exited unexpectedly (signal SIGSEGV); restarting it (restart 1)" in log
        assert read_metrics(f"http://localhost:{metrics_port}/metrics")["minedraft_server_restarts"] == 1
    finally:
        children = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=EXIT_TIMEOUT + 15)
    time.sleep(0.5)
    assert not alive(children)


def test_the_launcher_loads_one_model_at_a_time_unless_told_otherwise(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from minedraft.serving import launcher
    from minedraft.serving.launcher import TritonServer

    monkeypatch.setattr(launcher, "find_tritonserver", lambda: SimpleNamespace(binary="tritonserver"))
    assert "--model-load-thread-count=1" in TritonServer(tmp_path).command()
    told = TritonServer(tmp_path, extra_args=["--model-load-thread-count=4"]).command()
    assert [arg for arg in told if arg.startswith("--model-load-thread-count")] == ["--model-load-thread-count=4"]
