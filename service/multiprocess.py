"""The directory of Prometheus' multi-process metric files, managed by the gunicorn master.

prometheus-client decides between in-process and file-backed values when it is first imported
(``PROMETHEUS_MULTIPROC_DIR`` set or not), so the gunicorn config calls ``prepare_directory``
before it imports the app, and this module never imports prometheus-client at module level.
The workers, forked later, inherit the variable.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by prepare_directory, so on_exit removes only a directory this server created.
OWNED_ENV = "FASHION_METRICS_DIR_OWNED"


def prepare_directory() -> str:
    """A fresh directory for the workers' metric files, in PROMETHEUS_MULTIPROC_DIR; returns it.

    An operator's own PROMETHEUS_MULTIPROC_DIR is kept, but its old ``*.db`` files are removed:
    values left by an earlier server would otherwise be added to this one's. Calling it again in
    the same server (gunicorn re-reads its config on SIGHUP) keeps the directory it made.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.environ.get(OWNED_ENV) == path:
        return path
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="fashion-metrics-")
        os.environ[OWNED_ENV] = path
    os.environ[MULTIPROC_ENV] = path
    return path


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook, master, after a worker exited: drop its live gauges (its counters stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any = None) -> None:
    """gunicorn hook, master, at shutdown: remove the directory prepare_directory created."""
    path = os.environ.get(OWNED_ENV)
    if path and path == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(path, ignore_errors=True)
