"""gunicorn settings for the service: ``gunicorn -c service/gunicorn.conf.py "service:create_app()"``.

Everything comes from the environment (service.config), validated here in the master so a
bad value stops the server with a clear message and exit status 2 before any worker starts.

Start-up and memory: the master imports torch, numpy, Pillow and Flask once and every worker
is forked from it, so those pages are shared copy-on-write. The app itself
(model load, warm-up, torch's thread setting) is built in each worker after the fork
(preload_app off): torch's intra-op thread pool must never be started before a fork, and a
worker replaced after max_requests starts without importing anything again (the README's
benchmark section has the measured start time).
"""

import errno
import json
import os
import socket
import sys

import gunicorn.util

# torch.cuda.is_available() through NVML does not initialise CUDA in the master, which would
# make CUDA unusable in the forked workers.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
# realpath: in the image this file is reached through a link in /app (see the Dockerfile).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from service.config import EXIT_CONFIG_ERROR, ConfigError, Settings

try:
    _settings = Settings.from_env(os.environ)
except ConfigError as _error:
    print(f"fashion-serve: configuration error: {_error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)


def _port_taken(host: str, port: int) -> bool:
    """Whether another program listens on host:port (SO_REUSEADDR, as gunicorn binds: TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


# gunicorn would retry a taken port for 5 s and then stop with "Can't connect"; say what to do instead.
# Skipped when the listening socket is inherited (a gunicorn re-exec, systemd socket activation).
if not (os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS")) and _port_taken(_settings.host, _settings.port):
    _other = _settings.port + 1
    print(
        f"fashion-serve: {_settings.host}:{_settings.port} is already in use by another program; "
        f"serve on another port: `make serve PORT={_other}` (or PORT={_other} in the environment)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(EXIT_CONFIG_ERROR)

# Prometheus multi-process mode (service/metrics.py): prometheus-client chooses file-backed
# values when it is first imported, so the directory is set before the app (and the library)
# is imported. Each server start gets a fresh one, which the workers inherit; a dead worker's
# live gauges are dropped (child_exit); the directory is removed at exit (on_exit).
from service.multiprocess import child_exit, on_exit, prepare_directory  # noqa: E402, F401

_metrics_dir = prepare_directory()

import service.app  # noqa: E402, F401  (imported in the master only to share its pages with the workers)

# The post_request hook: a connection that ends with its answer closes at once when nothing the client sent
# is left unread, instead of reading on for up to 2 s until the client closes first (service/connections.py).
from service.connections import post_request  # noqa: E402, F401
from service.logs import ServiceGunicornLogger, logging_config  # noqa: E402

bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
# One event loop per worker: connections kept alive, and the requests ready at the same moment answered
# by one pass through the model (service/worker.py). `GUNICORN_CMD_ARGS="--worker-class sync"` gives
# gunicorn's sync worker back (one request per connection, one forward pass per request).
worker_class = "service.worker.BatchingWorker"
# Seconds an idle connection is kept for its next request, and that a new one has to send its first byte.
keepalive = 5

# Inference is CPU-bound and answers in milliseconds: a worker silent this long is stuck.
timeout = _settings.timeout
# SIGTERM: stop accepting, let in-flight requests finish for up to this long, then exit.
graceful_timeout = _settings.graceful_timeout
# Recycle workers now and then so a slow leak (in a library, or a fragmenting heap) cannot grow
# for ever; the jitter keeps them from restarting all at once. Rarely: a worker's memory stays flat
# over 120,000 requests, and a sync worker answered about 1,300 requests a second under load, so at
# 20,000 it was replaced every 15 s, each time with a model load and probe, new per-worker metric series
# and a dead worker's metric files for every scrape to merge. At 1,000,000, and the batching worker's
# 2,400-2,600 a second under bench_serving's load at 32 connections (the README): about every 6-7 minutes.
max_requests = 1_000_000
max_requests_jitter = 100_000
preload_app = False
# The control socket (gunicorn >= 24) defaults to one path per user, so two servers would fight over it.
control_socket_disable = True
# The app writes one JSON line per request itself (service.app), with the request id and label.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# gunicorn's own messages in the app's JSON format, on the same stream (service/logs.py).
logconfig_dict = logging_config(loglevel)
logger_class = ServiceGunicornLogger
proc_name = "fashion-serve"
# Worker heartbeat files on tmpfs: a slow or full disk must not make gunicorn kill healthy workers.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None


def on_starting(server):
    server.log.info("fashion-serve: Prometheus multi-process metrics in %s", _metrics_dir)
    server.log.info(
        "fashion-serve: model_dir=%s device=%s workers=%d torch_threads=%d max_batch=%d max_upload_bytes=%d",
        _settings.model_dir,
        _settings.device,
        _settings.workers,
        _settings.torch_threads,
        _settings.max_batch,
        _settings.max_upload_bytes,
    )


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own error answers in the service's JSON error shape, instead of its HTML page.

    gunicorn answers by itself when it cannot parse a request (400) or when the request dies in the
    worker (500), which is what a request cut short by TIMEOUT looks like to its client.
    """
    if status_int >= 500:
        code, mesg = "internal_error", "the server failed to handle this request; it has been logged"
    else:
        code = reason.lower().replace(" ", "_")
    body = json.dumps({"error": {"status": status_int, "code": code, "message": mesg or reason}})
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    gunicorn.util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode("latin1"))


def post_fork(server, worker):
    gunicorn.util.write_error = _write_json_error
