"""Prometheus metrics: per-prediction observations, the gunicorn hooks, and exact counts across two workers."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from fashion.checkpoint import MODEL_NAME, load_checkpoint
from fashion.contract import CLASS_NAMES, NUM_CLASSES
from fashion.trust import LOW_CONFIDENCE, NOT_A_GARMENT, Verdicts
from service import metrics as service_metrics
from service import multiprocess
from testing.images import png
from testing.metrics import samples, value
from testing.models import TOY_MODEL_ENV, random_model_dir
from testing.server import start_server

# --------------------------------------------------------------------------- no server


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.delenv(multiprocess.MULTIPROC_ENV, raising=False)


def test_predictions_are_counted_by_class_with_their_confidence(in_process):
    metrics = service_metrics.Metrics()
    probabilities = np.full((5, NUM_CLASSES), 0.01, dtype=np.float32)
    for row, (class_id, confidence) in enumerate([(9, 0.91), (9, 0.55), (0, 0.91), (3, 0.3), (9, 0.99)]):
        probabilities[row, class_id] = confidence
    reasons = [None, LOW_CONFIDENCE, None, NOT_A_GARMENT, None]
    calibrated = torch.from_numpy(probabilities.max(axis=1))
    metrics.observe_prediction(Verdicts(torch.from_numpy(probabilities), calibrated, reasons), 0.002)
    metrics.observe_prediction(Verdicts(torch.from_numpy(probabilities[:1]), calibrated[:1], reasons[:1]), 0.0001)
    text = metrics.exposition().decode()
    assert value(text, "fashion_uncertain_predictions_total", reason="not_a_garment") == 1
    assert value(text, "fashion_uncertain_predictions_total", reason="low_confidence") == 1
    assert value(text, "fashion_predictions_total", label="Ankle boot", class_id="9") == 4
    assert value(text, "fashion_predictions_total", label="T-shirt/top") == 1
    assert value(text, "fashion_predictions_total", label="Dress") == 1
    assert value(text, "fashion_predictions_total") == 6
    assert value(text, "fashion_prediction_confidence_count") == 6
    assert value(text, "fashion_prediction_confidence_bucket", le="0.9") == 2  # 0.55 and 0.3
    assert value(text, "fashion_prediction_confidence_sum") == pytest.approx(0.91 * 3 + 0.55 + 0.3 + 0.99, abs=1e-5)
    assert value(text, "fashion_inference_batch_size_sum") == 6
    assert value(text, "fashion_inference_batch_size_count") == 2
    assert value(text, "fashion_inference_duration_seconds_count") == 2
    assert value(text, "fashion_inference_duration_seconds_bucket", le="0.001") == 1


def test_gunicorn_hooks_make_and_remove_a_fresh_directory(monkeypatch, tmp_path):
    # setenv first, so monkeypatch restores both variables after the hooks wrote them directly.
    for name in (multiprocess.MULTIPROC_ENV, multiprocess.OWNED_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    path = multiprocess.prepare_directory()
    assert os.environ[multiprocess.MULTIPROC_ENV] == path and os.path.isdir(path)
    assert multiprocess.prepare_directory() == path  # gunicorn re-reads its config on SIGHUP
    multiprocess.on_exit()
    assert not os.path.exists(path)
    # An operator's own directory is kept, emptied of old values, and never removed.
    own = tmp_path / "prom"
    own.mkdir()
    (own / "counter_123.db").write_bytes(b"old")
    (own / "notes.txt").write_text("keep")
    monkeypatch.setenv(multiprocess.MULTIPROC_ENV, str(own))
    assert multiprocess.prepare_directory() == str(own)
    assert sorted(p.name for p in own.iterdir()) == ["notes.txt"]
    multiprocess.on_exit()
    assert own.is_dir()


# --------------------------------------------------------------------------- two real workers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("metrics-model"), seed=2)


@pytest.fixture(scope="module")
def server(model_dir):
    with start_server(model_dir, env={"ACCESS_LOG": "false", **TOY_MODEL_ENV}, workers=2) as handle:
        # start_server returns once one worker answers; the other may still be building its app
        # (model load, warm-up), and the load spread below needs both. A worker's metrics exist
        # (its fashion_worker_requests series, 0 at first) once its app is built.
        deadline = time.monotonic() + 60
        while len(worker_series(scrape(handle))) < 2:
            assert time.monotonic() < deadline, "the second worker did not come up in 60 s"
            time.sleep(0.05)
        yield handle


def scrape(server) -> str:
    answer = requests.get(server.url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return answer.text


def worker_series(text: str) -> dict[str, float]:
    """fashion_worker_requests by worker pid: one series per live worker whose app is built."""
    return {s.labels["pid"]: s.value for s in samples(text) if s.name == "fashion_worker_requests"}


def test_counts_add_up_across_two_workers(server, model_dir, test_set):
    pixels = test_set.data[:3].numpy()
    pngs = [png(p) for p in pixels]
    v2_body = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 1, 28, 28],
                "datatype": "FP32",
                "data": test_set.inputs[:2].numpy().ravel().tolist(),
            }
        ]
    }
    predict, infer = server.url + "/predict", f"{server.url}/v2/models/{MODEL_NAME}/infer"

    def send(kind: str) -> int:
        # A new connection per request, so gunicorn's two workers share them.
        if kind == "single":
            return requests.post(predict, data=pngs[0], headers={"Content-Type": "image/png"}, timeout=30).status_code
        if kind == "batch":
            files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
            return requests.post(predict, files=files, timeout=30).status_code
        if kind == "v2":
            return requests.post(infer, json=v2_body, timeout=30).status_code
        if kind == "bad":
            return requests.post(predict, data=b"", headers={"Content-Type": "image/png"}, timeout=30).status_code
        if kind == "unknown-model":
            return requests.get(server.url + "/v2/models/nope", timeout=30).status_code
        return requests.get(server.url + "/no/such/page", timeout=30).status_code

    before = scrape(server)
    plan = ["single"] * 40 + ["batch"] * 10 + ["v2"] * 20 + ["bad"] * 10 + ["unknown-model"] * 5 + ["missing"] * 5
    with ThreadPoolExecutor(8) as pool:
        statuses = Tally(zip(plan, pool.map(send, plan), strict=True))
    assert statuses == {("single", 200): 40, ("batch", 200): 10, ("v2", 200): 20, ("bad", 400): 10,
                        ("unknown-model", 400): 5, ("missing", 404): 5}  # fmt: skip

    text = scrape(server)
    # Both workers served (one series per live worker), and together they served every request
    # (the plan and the first scrape; a scrape is counted after it has been answered).
    per_worker = worker_series(text)
    assert len(per_worker) == 2, per_worker
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) - value(before, "fashion_worker_requests") == len(plan) + 1

    def delta(name: str, **labels) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    requests_total = "fashion_http_requests_total"
    assert delta(requests_total, endpoint="/predict", method="POST", status="200") == 50
    assert delta(requests_total, endpoint="/predict", method="POST", status="400") == 10
    assert delta(requests_total, endpoint="/v2/models/<name>/infer", method="POST", status="200") == 20
    assert delta(requests_total, endpoint="/v2/models/<name>", method="GET", status="400") == 5
    assert delta(requests_total, endpoint="<unmatched>", method="GET", status="404") == 5
    assert delta(requests_total) == len(plan) + 1
    assert delta(requests_total, endpoint="/metrics", method="GET", status="200") == 1
    assert delta("fashion_http_request_duration_seconds_count", endpoint="/predict") == 60

    # 40 single images + 10 batches of 3 + 20 v2 batches of 2: 110 images, in 70 forward passes at most:
    # requests that reach the model at the same moment share one (service/batching.py).
    passes = delta("fashion_inference_batch_size_count")
    assert 0 < passes <= 70
    assert delta("fashion_inference_duration_seconds_count") == passes
    assert delta("fashion_inference_batch_size_sum") == 110
    assert delta("fashion_inference_batch_size_bucket", le="1.0") <= 40
    assert delta("fashion_prediction_confidence_count") == 110
    assert delta("fashion_predictions_total") == 110

    # The class counts are the offline model's argmax of the same images, counted the same way.
    model, card = load_checkpoint(model_dir)
    with torch.inference_mode():
        offline = torch.softmax(model(test_set.inputs[:3]), dim=1).argmax(1).tolist()
    expected = Tally()
    expected[offline[0]] += 40
    for class_id in offline:
        expected[class_id] += 10
    for class_id in offline[:2]:
        expected[class_id] += 20
    for class_id in range(NUM_CLASSES):
        counted = delta("fashion_predictions_total", class_id=str(class_id), label=CLASS_NAMES[class_id])
        assert counted == expected[class_id], (class_id, counted, expected)

    info = [s for s in samples(text) if s.name == "fashion_model_info" and s.value == 1]
    assert len(info) == 1
    assert info[0].labels == {
        "name": MODEL_NAME,
        "version": card["weights"]["sha256"][:12],
        "sha256": card["weights"]["sha256"],
        "accuracy": f"{card['metrics']['test_accuracy']}",
    }
    assert value(text, "fashion_model_test_accuracy") == card["metrics"]["test_accuracy"]
    load_times = [s.value for s in samples(text) if s.name == "fashion_model_load_seconds"]
    assert len(load_times) == 2 and all(0 < t < 60 for t in load_times), load_times


def test_a_dead_workers_counts_stay_and_its_live_gauges_go(server):
    before = scrape(server)
    pids = server.worker_pids()
    assert len(pids) == 2
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (victim in server.worker_pids() or len(server.worker_pids()) < 2):
        time.sleep(0.1)
    assert victim not in server.worker_pids()
    after = scrape(server)
    # Counters never go backwards: the dead worker's requests still count (plus the first scrape).
    total = "fashion_http_requests_total"
    assert value(after, total, endpoint="/predict") == value(before, total, endpoint="/predict")
    assert value(after, total) == value(before, total) + 1
    assert str(victim) not in worker_series(after)
    assert value(after, "fashion_model_info") == 1


def test_the_metrics_cost_benchmark_drives_the_real_hooks():
    """bench_v2's per-request metrics cost calls Metrics as the service does; when the hooks' signatures
    change, this fails here instead of in a benchmark run (it once passed a tensor for the Verdicts)."""
    from benchmarks.bench_v2 import _hook_cost_here

    assert _hook_cost_here(20) > 0
