"""Prometheus metrics for the service, correct across gunicorn's worker processes.

Every worker is its own process with its own counters, and a scrape of ``GET /metrics`` lands
on one of them, so the numbers must be summed over all workers: prometheus-client's
multi-process mode. Each worker writes its values into memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and a scrape merges the files of all workers (and of dead
ones, so counters never go backwards).

The design, and why:

- The gunicorn config sets ``PROMETHEUS_MULTIPROC_DIR`` (``service.multiprocess``) before it
  imports the app, as prometheus-client asks: the library picks file-backed values at import.
  Outside gunicorn (the Flask test client, ``flask run``) the variable is unset and each app
  has its own in-process ``CollectorRegistry``, so two apps never share a registry.
- Gauges say how they merge across workers: ``fashion_model_info`` uses ``livemax`` (1 for
  every model version some live worker serves; a dead worker's old model drops out), the
  per-worker gauges use ``liveall`` (one series per live worker ``pid``).
- The model runner predicts; these metrics only observe (``observe_prediction`` is the
  runner's ``observer``). Label children are bound once, not looked up per request.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fashion.contract import CLASS_NAMES, NUM_CLASSES
from fashion.trust import REASONS, Verdicts
from service.multiprocess import MULTIPROC_ENV
from service.web import runner_of

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
UNMATCHED = "<unmatched>"  # the endpoint label of requests no route matched (never the raw path)


class Metrics:
    """The service's metrics and the request hooks and predict wrapper that update them."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
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
            "Time from the request reaching the app to its response being ready, by route and method.",
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
        self.uncertain = Counter(
            "fashion_uncertain_predictions",
            "Answers flagged uncertain, by reason (not_a_garment, low_confidence): a rising share is the drift signal.",
            ["reason"],
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
        self.rejections = Counter(
            "fashion_model_rejections",
            "Candidate models refused by the probe validation, by reason (counted by every worker that refused one).",
            ["reason"],
            registry=registry,
        )
        # Children are created once; a labels() call per observation would cost a lock and a dict lookup.
        self._class_counters = [self.predictions.labels(str(i), name) for i, name in enumerate(CLASS_NAMES)]
        self._uncertain_counters = {reason: self.uncertain.labels(reason) for reason in REASONS}
        self._request_children: dict[tuple, Any] = {}
        self._latency_children: dict[tuple, Any] = {}
        self._model_seen: Any = None
        self._info_child: Any = None

    # ------------------------------------------------------------------ inference

    def observe_prediction(self, verdicts: Verdicts, seconds: float) -> None:
        """Record one forward pass: its time, batch size, each row's argmax and confidence, and the uncertain ones."""
        self.inference_seconds.observe(seconds)
        probabilities = verdicts.probabilities
        for reason in verdicts.reasons:
            if reason is not None:
                self._uncertain_counters[reason].inc()
        count = len(probabilities)
        self.batch_size.observe(count)
        if count == 1:  # the common case, without numpy's per-call overhead
            row = probabilities[0].tolist()
            class_id = max(range(NUM_CLASSES), key=row.__getitem__)
            self._class_counters[class_id].inc()
            self.confidence.observe(row[class_id])
            return
        rows = probabilities.numpy()
        class_ids = rows.argmax(axis=1)
        per_class = np.bincount(class_ids, minlength=NUM_CLASSES)
        for class_id in np.flatnonzero(per_class).tolist():
            self._class_counters[class_id].inc(int(per_class[class_id]))
        for confidence in rows[np.arange(count), class_ids].tolist():
            self.confidence.observe(confidence)

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

    def observe_rejection(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

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


def register(app: Flask) -> Metrics:
    """Create the app's metrics, make them the model runner's observer, and add ``GET /metrics``.

    Requests are counted and timed by the app's one after-request hook (``observe_request``)."""
    metrics = Metrics()
    app.extensions["metrics"] = metrics
    runner = runner_of(app)
    runner.observer = metrics.observe_prediction
    runner.rejection_observer = metrics.observe_rejection

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        """Prometheus text exposition of the service's metrics, summed over all workers."""
        metrics.observe_model(runner.current)
        # The classic text format (0.0.4): every Prometheus version and most scrapers read it.
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)

    return metrics
