"""Find a tritonserver, assemble a backend directory with the `minedraft` backend, run it.

Works with an NGC container (/opt/tritonserver) or the `nvidia-pytriton` wheel, whose
binary must run in place (its RPATH points into the wheel) and whose python backend needs
the stub built for the running Python copied next to it.
"""
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ADAPTER = Path(__file__).resolve().parent / "triton_model.py"  # Triton loads it as backends/minedraft/model.py
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[3] / "model_repository"
STUB = "triton_python_backend_stub"
RESTARTS_ENV = "MINEDRAFT_SERVER_RESTARTS"  # the supervisor tells a restarted server how many restarts so far


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path  # the python backend stub built for the running Python
    library_dirs: tuple[str, ...] = ()  # for the copied stub, whose RPATH is relative to its origin


def find_tritonserver() -> TritonInstall:
    on_path = shutil.which("tritonserver")
    for binary in filter(None, [on_path, "/opt/tritonserver/bin/tritonserver"]):
        root = Path(binary).resolve().parents[1]
        python_backend = root / "backends" / "python"
        if (python_backend / STUB).exists():
            return TritonInstall(Path(binary), python_backend, python_backend / STUB)
    try:
        import pytriton
    except ImportError:
        raise LaunchError("no tritonserver found: not on PATH, not in /opt/tritonserver, and the "
                          "nvidia-pytriton wheel is not installed (pip install 'minedraft[serve]')") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / STUB
    if not stub.exists():
        raise LaunchError(f"the nvidia-pytriton wheel has no python stub for Python {sys.version_info[:2]}")
    wheel_libs = Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"
    return TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python", stub, (str(wheel_libs),))


def assemble_backends(dest: Path) -> Path:
    """dest/python: Triton's python backend plus the stub; dest/minedraft/model.py: the adapter.

    Files are copied, not linked: Triton refuses backend files whose real path escapes the
    backend directory. model.py imports the installed `minedraft` package for the rest.
    """
    install = find_tritonserver()
    python_backend, stub = install.python_backend, install.stub
    (dest / "python").mkdir(parents=True, exist_ok=True)
    (dest / "minedraft").mkdir(exist_ok=True)
    for item in python_backend.iterdir():
        if item.is_file() and item.name != STUB:
            shutil.copy2(item, dest / "python" / item.name)
    shutil.copy2(stub, dest / "python" / STUB)
    shutil.copy2(ADAPTER, dest / "minedraft" / "model.py")
    return dest


def server_env() -> dict:
    """The stub embeds libpython and imports from the first python3 on PATH: make both ours."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", *find_tritonserver().library_dirs,
               env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, libdirs))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


LOAD_THREADS_FLAG = "--model-load-thread-count"


class TritonServer:
    """A running tritonserver serving `model_repository` with the minedraft backend."""

    def __init__(self, model_repository=DEFAULT_REPOSITORY, http_port=8000, grpc_port=8001, metrics_port=8002,
                 extra_args=(), log_path=None, ready_timeout: float = 300):
        """`ready_timeout`: how long `with` waits for every model to load (a quantized target's
        load takes minutes on two cores)."""
        self.ready_timeout = ready_timeout
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.process = None
        self._backends = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """Models load one at a time unless `extra_args` says otherwise: auto's calibration times
        the steps at load, and timed beside another entry's compiling on shared cores it chose AR
        for every step."""
        load_threads = [] if any(arg.startswith(LOAD_THREADS_FLAG) for arg in self.extra_args) else [
            f"{LOAD_THREADS_FLAG}=1"]
        return [str(find_tritonserver().binary), "--model-repository", str(self.model_repository),
                "--backend-directory", str(self._backends),
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port), *load_threads, *self.extra_args]

    def start(self, restarts: int = 0) -> "TritonServer":
        """`restarts`: how many times a supervisor has restarted this server (its metrics report it)."""
        self._backends = assemble_backends(Path(tempfile.mkdtemp(prefix="minedraft-backends-")))
        log = open(self.log_path, "a" if restarts else "w") if self.log_path else None
        env = {**server_env(), RESTARTS_ENV: str(restarts)}
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def restart(self, restarts: int) -> None:
        """Start afresh after the server exited on its own (a crash)."""
        self._reap_group()
        shutil.rmtree(self._backends, ignore_errors=True)
        self.start(restarts)

    def _reap_group(self) -> None:
        """The python backend's stubs and drafter workers live in the server's process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_ready(self, timeout: float = 300, stop=None) -> None:
        """Until /v2/health/ready and the metrics endpoint both answer (tritonserver opens the
        metrics port after HTTP reports ready); `stop` (a threading.Event) gives up early."""
        deadline = time.monotonic() + timeout
        pending = [f"http://localhost:{self.http_port}/v2/health/ready", self.metrics_url]
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.process.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.process.returncode}"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(pending[0], timeout=2) as response:
                    if response.status == 200:
                        pending.pop(0)
                        if not pending:
                            return
                        continue
            except OSError:
                pass
            time.sleep(0.5)
        raise LaunchError(f"tritonserver not ready after {timeout:.0f}s")

    def stop(self, timeout: float = 60) -> int:
        """Ask the server to exit (SIGINT: it finishes or aborts in-flight requests); after
        `timeout` kill it. Either way nothing of its process group is left behind."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap_group()
        self.process.wait()
        shutil.rmtree(self._backends, ignore_errors=True)
        return self.process.returncode

    def __enter__(self):
        self.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:  # __exit__ does not run when __enter__ raises: nothing may be left running
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
