"""Start the real gunicorn server on a free loopback port, for tests and benchmarks.

    server = start_server(model_dir, env={"MAX_BATCH": "8"}, workers=1)
    requests.get(server.url + "/healthz")
    server.stop()          # SIGTERM, graceful; returns gunicorn's exit status

Only 127.0.0.1 is ever bound. The server's stderr (gunicorn's log and the service's JSON
lines) goes to a file, readable with ``server.log_text()`` / ``server.access_entries()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = PROJECT_ROOT / "service" / "gunicorn.conf.py"
DEFAULT_APP = "service:create_app()"


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command(app: str = DEFAULT_APP, root: Path = PROJECT_ROOT) -> list[str]:
    """gunicorn with ``root``'s config, which puts ``root`` first on the import path: its service is served."""
    return [sys.executable, "-m", "gunicorn", "-c", str(root / GUNICORN_CONF.relative_to(PROJECT_ROOT)), app]


def plain_gunicorn_command(app: str, port: int, workers: int) -> list[str]:
    """gunicorn on its own defaults, without this project's config: ``gunicorn -w N -b 127.0.0.1:PORT APP``
    (and no control socket, whose one path per user two such servers would share; it is not on a request's path)."""
    return [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--no-control-socket", app]


def server_env(model_dir: str | os.PathLike | None, port: int, workers: int, env: dict | None = None) -> dict:
    """The environment for a server on 127.0.0.1:port; ``env`` entries win, None values are removed."""
    merged = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": str(workers)}
    if model_dir is not None:
        merged["MODEL_DIR"] = str(model_dir)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    # The server imports the project from its root whatever the caller's working directory.
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), merged.get("PYTHONPATH")]))
    return merged


@dataclass
class ServerHandle:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    started_at: float
    _log_file: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_entries(self) -> list[dict]:
        """The service's per-request JSON log lines written so far."""
        entries = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and '"request_id"' in line:
                with contextlib.suppress(json.JSONDecodeError):
                    entries.append(json.loads(line))
        return entries

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master)."""
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(pid) for pid in children]

    def connections_per_worker(self) -> list[int]:
        """Established client connections each worker holds on the server's port, fewest first."""
        import psutil  # a test and benchmark dependency, not one of the service

        counts = []
        for pid in self.worker_pids():
            try:
                held = psutil.Process(pid).connections(kind="tcp")
            except psutil.NoSuchProcess:  # recycled meanwhile
                continue
            counts.append(sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port for c in held))
        return sorted(counts)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL after ``timeout``. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model_dir: str | os.PathLike | None,
    env: dict | None = None,
    workers: int = 1,
    *,
    app: str = DEFAULT_APP,
    wait: str | None = "/healthz",
    timeout: float = 60.0,
    log_dir: str | os.PathLike | None = None,
    root: str | os.PathLike = PROJECT_ROOT,
    project_config: bool = True,
) -> ServerHandle:
    """Start gunicorn on a free 127.0.0.1 port and wait until ``wait`` answers (any HTTP status).

    Raises RuntimeError with the server's log if it exits or does not answer in ``timeout``.
    ``wait=None`` returns at once (for tests of start-up failures and start-up time). ``root``: another
    checkout of the project whose service to serve (benchmarks compare commits this way).
    ``project_config=False``: gunicorn on its own defaults instead of service/gunicorn.conf.py (for the
    benchmarks' baseline apps; the service itself needs its config).
    """
    for _attempt in range(3):  # another process may take the free port before gunicorn binds it
        port = free_port()
        log_path = Path(tempfile.mkstemp(prefix=f"gunicorn-{port}-", suffix=".log", dir=log_dir)[1])
        log_file = open(log_path, "wb")  # noqa: SIM115 (closed by ServerHandle.stop)
        started = time.monotonic()
        command = gunicorn_command(app, Path(root)) if project_config else plain_gunicorn_command(app, port, workers)
        process = subprocess.Popen(
            command,
            cwd=root,
            env=server_env(model_dir, port, workers, env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        handle = ServerHandle(f"http://127.0.0.1:{port}", port, process, log_path, started, log_file)
        if wait is None:
            return handle
        deadline = started + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                requests.get(handle.url + wait, timeout=2)
                return handle
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a worker still booting
                time.sleep(0.05)
        handle.stop()
        text = handle.log_text()
        if "Address already in use" in text:
            continue
        raise RuntimeError(f"gunicorn did not come up (exit status {process.returncode}); log:\n{text[-4000:]}")
    raise RuntimeError("gunicorn could not bind a free port in 3 attempts")
