"""The plain-crop fast path (service.fast_path) answers exactly as Flask's route would, or leaves the request to it.

Each request goes through the app as served (fast path in front of Flask) and through the
Flask app alone (the path's ``flask``), with the same X-Request-ID, and the two answers must
match byte for byte: status, headers, body; then the metrics and access lines they left.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from werkzeug.test import Client

from service import create_app
from service.fast_path import PlainCropFastPath
from testing.images import encode, png
from testing.models import TOY_MODEL_ENV, random_model_dir

pytestmark = pytest.mark.usefixtures("bundled_model_dir")


class CountingFlask:
    """The Flask WSGI callable, counting the requests that reach it."""

    def __init__(self, flask) -> None:
        self.flask, self.calls = flask, 0

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.flask(environ, start_response)


def served_and_flask(model_dir, **env):
    """(client of the app as served, client of its Flask app alone, the counter in front of Flask)."""
    app = create_app({"MODEL_DIR": str(model_dir), "RELOAD_INTERVAL": "0", **env})
    fast_path = app.wsgi_app
    assert isinstance(fast_path, PlainCropFastPath)
    counting = fast_path.flask = CountingFlask(fast_path.flask)
    return app, Client(app), Client(counting.flask), counting


def answer(client, request_id, **request):
    response = client.open(headers={"X-Request-ID": request_id, **request.pop("headers", {})}, **request)
    return response.status, sorted(response.headers.items()), response.get_data()


def crops(test_set):
    """Real test crops, a light-bordered one (inverted by auto) and noise (flagged not a garment)."""
    pixels = test_set.data.numpy()
    rng = np.random.default_rng(0)
    return [png(image) for image in pixels[:40]] + [png(255 - pixels[40]), png(rng.integers(0, 256, (28, 28)))]


def test_plain_crops_are_answered_in_front_of_flask_with_flasks_bytes(bundled_model_dir, test_set, capfd):
    app, served, _, counting = served_and_flask(bundled_model_dir)
    flask_app, _, flask_only, _ = served_and_flask(bundled_model_dir)
    bodies = crops(test_set)
    capfd.readouterr()
    answers = []
    for index, body in enumerate(bodies):
        request = {"path": "/predict", "method": "POST", "data": body, "content_type": "image/png"}
        fast = answer(served, f"req-{index}", **request)
        assert counting.calls == 0, "a plain crop reached Flask"
        assert fast == answer(flask_only, f"req-{index}", **request)
        assert fast[0] == "200 OK"
        answers.append(json.loads(fast[2]))
    assert answers[-1]["uncertain"] and answers[-1]["reason"] == "not_a_garment"
    assert len({a["label"] for a in answers}) > 5

    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"service.access"' in line]
    assert len(lines) == 2 * len(bodies)
    for line in lines:
        assert line.pop("ts") > 0 and line.pop("latency_ms") >= 0
    assert lines[0::2] == lines[1::2] and lines[0]["request_id"] == "req-0" and lines[0]["label"] == answers[0]["label"]
    assert metric_samples(app) == metric_samples(flask_app)
    assert metric_samples(app)[
        ("fashion_http_requests_total", (("endpoint", "/predict"), ("method", "POST"), ("status", "200")))
    ] == len(bodies)


def metric_samples(app) -> Counter:
    """Every metric sample that does not measure time (the duration histograms keep their counts)."""
    samples = Counter()
    for metric in app.extensions["metrics"].registry.collect():
        for sample in metric.samples:
            timed = metric.name.endswith("_seconds") and not sample.name.endswith("_count")
            if not timed and not sample.name.endswith("_created"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
    return samples


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"query_string": "top_k=3"}, id="query string"),
        pytest.param({"content_type": "image/png; charset=binary"}, id="content type with parameters"),
        pytest.param({"content_type": "text/plain"}, id="not an image type"),
        pytest.param({"path": "/predict/"}, id="other path"),
        pytest.param({"method": "PUT"}, id="other method"),
        pytest.param({"data": None}, id="empty body"),
        pytest.param({"data": "truncated"}, id="truncated crop"),
        pytest.param({"data": "rgb"}, id="RGB PNG"),
        pytest.param({"data": "jpeg"}, id="JPEG"),
        pytest.param({"data": "large"}, id="over MAX_UPLOAD_BYTES"),
        pytest.param({"headers": {"Transfer-Encoding": "chunked"}}, id="chunked"),
    ],
)
def test_other_requests_reach_flask_and_get_its_answer(request_, bundled_model_dir, test_set):
    _, served, flask_only, counting = served_and_flask(bundled_model_dir, MAX_UPLOAD_BYTES="2048")
    crop = png(test_set.data.numpy()[0])
    bodies = {
        None: b"",
        "truncated": crop[:-20],
        "rgb": encode(Image.fromarray(test_set.data.numpy()[0]).convert("RGB")),
        "jpeg": encode(Image.fromarray(test_set.data.numpy()[0]), "JPEG"),
        "large": crop + b"\0" * 4096,
    }
    request = {"path": "/predict", "method": "POST", "data": crop, "content_type": "image/png", **request_}
    if not isinstance(request["data"], bytes):
        request["data"] = bodies[request["data"]]
    fast = answer(served, "same", **request)
    assert counting.calls == 1
    assert fast == answer(flask_only, "same", **request)


def test_a_model_not_ready_is_flasks_503(tmp_path, test_set):
    _, served, _, counting = served_and_flask(tmp_path / "empty")
    status, _, body = answer(
        served, "r", path="/predict", method="POST", data=png(test_set.data.numpy()[0]), content_type="image/png"
    )
    assert counting.calls == 1
    assert status.startswith("503") and json.loads(body)["error"]["code"] == "model_not_ready"


def test_the_fast_path_serves_the_model_that_replaced_the_old_one(tmp_path, test_set):
    """A model swapped in on disk is what the next plain crop is answered with (the runner's reload check)."""
    model_dir = tmp_path / "model"
    random_model_dir(model_dir, seed=1)
    app = create_app({"MODEL_DIR": str(model_dir), "RELOAD_INTERVAL": "0.01", "ACCESS_LOG": "false", **TOY_MODEL_ENV})
    client = app.test_client()
    crop = png(test_set.data.numpy()[0])
    first = client.post("/predict", data=crop, content_type="image/png").get_json()["model"]["version"]
    random_model_dir(model_dir, seed=2)
    deadline = time.monotonic() + 10
    version = first
    while version == first and time.monotonic() < deadline:
        time.sleep(0.05)
        version = client.post("/predict", data=crop, content_type="image/png").get_json()["model"]["version"]
    assert version != first
