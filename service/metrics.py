"""Prometheus metrics for the service, correct across gunicorn's worker processes.

Every worker is its own process with its own counters, and a scrape of ``GET /metrics`` lands
on one of them, so the numbers must be summed over all workers: prometheus-client's
multi-process mode. Each worker writes its values into memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape merges the files of all workers (and of dead
ones, so counters never go backwards).

The design, and why:

- The gunicorn config calls ``gunicorn_on_starting`` (master, once per server start): it
  points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh temporary directory, which the workers
  inherit when forked, and ``gunicorn_on_exit`` removes it. ``gunicorn_child_exit`` marks a
  dead worker's live gauges dead (``multiprocess.mark_process_dead``).
- prometheus-client picks in-process or file-backed values when it is first imported, and
  the gunicorn master imports it (through service.app) before ``on_starting`` runs, so
  ``Metrics()`` switches to file-backed values itself when the variable is set
  (``_use_multiprocess_values``). Outside gunicorn (the Flask test client, ``flask run``)
  the variable is unset and each app has its own in-process ``CollectorRegistry``, so
  importing or creating the app anywhere works and two apps never share a registry.
- Gauges say how they merge across workers: ``fashion_model_info`` uses ``livemax`` (1 for
  every model version some live worker serves; a dead worker's old model drops out), the
  per-worker gauges use ``liveall`` (one series per live worker ``pid``).

Hot path: a request costs one counter and one histogram update in ``after_request``, plus
one gauge increment; a prediction (``Metrics.predict``, used by ``POST /predict`` and the v2
infer route) adds its latency, batch size, class counts and confidences, batched per request
(``observe_many``). Label children are cached and the process id is cached (``_ProcessId``),
so a single-image request costs about 5 us in-process and 9 us in multi-process mode, some 2%
of a /predict request's CPU time (``benchmarks/bench_v2.py`` measures it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fashion.contract import CLASS_NAMES, NUM_CLASSES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by gunicorn_on_starting, so on_exit removes only a directory this server created.
_OWNED_ENV = "FASHION_METRICS_DIR_OWNED"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
UNMATCHED = "<unmatched>"  # the endpoint label of requests no route matched (never the raw path)


# --------------------------------------------------------------------------- gunicorn hooks


def gunicorn_on_starting(server: Any = None) -> str:
    """Master, before any worker: a fresh directory for the workers' metric files; returns it.

    An operator's own PROMETHEUS_MULTIPROC_DIR is kept, but its old ``*.db`` files are removed:
    values left by an earlier server would otherwise be added to this one's.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.environ.get(_OWNED_ENV) != path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="fashion-metrics-")
        os.environ[_OWNED_ENV] = path
    os.environ[MULTIPROC_ENV] = path
    if server is not None:
        server.log.info("fashion-serve: Prometheus multi-process metrics in %s", path)
    return path


def gunicorn_child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker exited: drop its live gauges (its counters stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def gunicorn_on_exit(server: Any = None) -> None:
    """Master, at shutdown: remove the metrics directory gunicorn_on_starting created."""
    path = os.environ.get(_OWNED_ENV)
    if path and path == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- metrics


class _ProcessId:
    """os.getpid(), remembered: file-backed values ask for it on every update to notice a fork,
    and the system call costs about a microsecond here, a tenth of the metrics' cost per request.
    The cache is refreshed in every forked child, so running processes still get distinct ids,
    which is all prometheus-client's ``MultiProcessValue(process_identifier)`` asks for."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        os.register_at_fork(after_in_child=self.refresh)

    def refresh(self) -> None:
        self.pid = os.getpid()

    def __call__(self) -> int:
        return self.pid


def _use_multiprocess_values() -> bool:
    """Make new metrics file-backed when PROMETHEUS_MULTIPROC_DIR is set; return whether they are."""
    from prometheus_client import values

    wanted = bool(os.environ.get(MULTIPROC_ENV))
    if wanted != getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue(_ProcessId()) if wanted else values.MutexValue
    return wanted


def observe_many(histogram: Any, samples: np.ndarray) -> None:
    """Observe many values at once: one update per touched bucket instead of one per value.

    Uses the histogram child's bucket and sum values (stable in prometheus-client for years);
    if they are ever missing, falls back to one ``observe`` per value.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in samples.tolist():
            histogram.observe(value)
        return
    # Bucket i takes bounds[i-1] < v <= bounds[i], the same rule as Histogram.observe.
    counts = np.bincount(np.searchsorted(np.asarray(bounds), samples, side="left"), minlength=len(bounds))
    for index in np.flatnonzero(counts).tolist():
        buckets[index].inc(int(counts[index]))
    total.inc(float(samples.sum(dtype=np.float64)))


class Metrics:
    """The service's metrics and the request hooks and predict wrapper that update them."""

    def __init__(self) -> None:
        self.multiprocess = _use_multiprocess_values()
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "fashion_http_requests",
            "HTTP requests answered, by route (URL rule, not raw path), method and status code.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "fashion_http_request_duration_seconds",
            "Time from the request reaching Flask to its response being ready, by route and method.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "fashion_inference_duration_seconds",
            "Model forward pass (softmax included) per batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fashion_inference_batch_size",
            "Images per model forward pass.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.predictions = Counter(
            "fashion_predictions",
            "Predicted classes (the argmax), to compare with the training class mix (10% each).",
            ["class_id", "label"],
            registry=registry,
        )
        self.confidence = Histogram(
            "fashion_prediction_confidence",
            "Probability of the predicted class; a shift to the left is a sign of drifting inputs.",
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "fashion_model_info",
            "1 for each model version some live worker serves: name, version, weights sha256, test accuracy.",
            ["name", "version", "sha256", "accuracy"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_accuracy = Gauge(
            "fashion_model_test_accuracy",
            "Test-set accuracy recorded in the served model's card.",
            ["version"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            "fashion_model_load_seconds",
            "Seconds the worker took to read, verify and warm up its current model (one series per live worker).",
            multiprocess_mode="liveall",
            registry=registry,
        )
        self.worker_requests = Gauge(
            "fashion_worker_requests",
            "Requests this worker answered since it started (one series per live worker), to see the load spread.",
            multiprocess_mode="liveall",
            registry=registry,
        )
        # Children are created once; a labels() call per observation would cost a lock and a dict lookup.
        self._class_counters = [self.predictions.labels(str(i), name) for i, name in enumerate(CLASS_NAMES)]
        self._request_children: dict[tuple, Any] = {}
        self._latency_children: dict[tuple, Any] = {}
        self._model_seen: Any = None
        self._info_child: Any = None

    # ------------------------------------------------------------------ inference

    def predict(self, model: Any, batch: Any) -> Any:
        """``model.predict(batch)``, timed, with batch size, predicted classes and confidences recorded."""
        started = time.perf_counter()
        probabilities = model.predict(batch)
        self.inference_seconds.observe(time.perf_counter() - started)
        self.observe_predictions(probabilities.numpy())
        return probabilities

    def observe_predictions(self, probabilities: np.ndarray) -> None:
        """Record a batch of [N, 10] probabilities: its size, each row's argmax and its confidence."""
        count = len(probabilities)
        self.batch_size.observe(count)
        if count == 1:
            row = probabilities[0]
            class_id = int(row.argmax())
            self._class_counters[class_id].inc()
            self.confidence.observe(float(row[class_id]))
            return
        class_ids = probabilities.argmax(axis=1)
        per_class = np.bincount(class_ids, minlength=NUM_CLASSES)
        for class_id in np.flatnonzero(per_class).tolist():
            self._class_counters[class_id].inc(int(per_class[class_id]))
        observe_many(self.confidence, probabilities[np.arange(count), class_ids])

    # ------------------------------------------------------------------ model

    def observe_model(self, model: Any) -> None:
        """Publish the served model's identity (once per model swap; a cheap identity check otherwise)."""
        if model is self._model_seen:
            return
        self._model_seen = model
        if self._info_child is not None:
            self._info_child.set(0)
        if model is None:
            self._info_child = None
            return
        card = model.card
        accuracy = (card.get("metrics") or {}).get("test_accuracy")
        self._info_child = self.model_info.labels(
            str(card.get("name")), model.version, model.sha256, "" if accuracy is None else f"{accuracy}"
        )
        self._info_child.set(1)
        if isinstance(accuracy, int | float):
            self.model_accuracy.labels(model.version).set(accuracy)
        load_seconds = getattr(model, "load_seconds", None)
        if load_seconds is not None:
            self.model_load_seconds.set(load_seconds)

    # ------------------------------------------------------------------ HTTP

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(endpoint, method, str(status))
        child.inc()
        key = (endpoint, method)
        latency = self._latency_children.get(key)
        if latency is None:
            latency = self._latency_children[key] = self.request_seconds.labels(endpoint, method)
        latency.observe(seconds)
        self.worker_requests.inc()

    def exposition(self) -> bytes:
        """The text format of every metric: merged over all workers' files in multi-process mode."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def metrics_of(app: Flask) -> Metrics:
    """The Metrics object of ``app`` (created by ``register``)."""
    return app.extensions["metrics"]


def register(app: Flask) -> Metrics:
    """Create the app's metrics, the hooks that update them and ``GET /metrics``."""
    metrics = Metrics()
    app.extensions["metrics"] = metrics
    runner = app.extensions.get("model_runner")
    perf_counter = time.perf_counter

    @app.before_request
    def metrics_start() -> None:
        g.metrics_started = perf_counter()

    @app.after_request
    def metrics_finish(response: Response) -> Response:
        started = g.get("metrics_started")
        rule = request.url_rule
        metrics.observe_request(
            rule.rule if rule is not None else UNMATCHED,
            request.method,
            response.status_code,
            perf_counter() - started if started is not None else 0.0,
        )
        if runner is not None:
            metrics.observe_model(runner.current)
        return response

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        """Prometheus text exposition of the service's metrics, summed over all workers."""
        if runner is not None:
            metrics.observe_model(runner.current)
        # The classic text format (0.0.4): every Prometheus version and most scrapers read it.
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)

    return metrics
