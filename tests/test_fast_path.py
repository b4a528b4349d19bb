"""The plain-crop fast path (service.fast_path) answers exactly as Flask's route would, or leaves the request to it.

Each request goes through the app as served (fast path in front of Flask) and through the
Flask app alone (the path's ``flask``), with the same X-Request-ID, and the two answers must
match byte for byte: status, headers, body; then the metrics and access lines they left.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from werkzeug.test import Client

from service import create_app
from service.app import ServiceRequest
from service.fast_path import STARTED_KEY, FastPath
from testing.attacks import BOUNDARY, multipart
from testing.images import encode, png
from testing.models import TOY_MODEL_ENV, random_model_dir

pytestmark = pytest.mark.usefixtures("bundled_model_dir")


class CountingFlask:
    """The Flask WSGI callable, counting the requests that reach it."""

    def __init__(self, flask) -> None:
        self.flask, self.calls = flask, 0

    def __call__(self, environ, start_response):
        self.calls += 1
        self.environ = environ
        return self.flask(environ, start_response)


def served_and_flask(model_dir, **env):
    """(client of the app as served, client of its Flask app alone, the counter in front of Flask)."""
    app = create_app({"MODEL_DIR": str(model_dir), "RELOAD_INTERVAL": "0", **env})
    fast_path = app.wsgi_app
    assert isinstance(fast_path, FastPath)
    counting = fast_path.flask = CountingFlask(fast_path.flask)
    return app, Client(app), Client(counting.flask), counting


def form(*files: bytes, field: str = "image", preamble: bytes = b"") -> dict:
    """A multipart/form-data request of ``files`` in the plain shape curl and requests send
    (``testing.attacks.multipart``), with ``preamble`` before its first boundary."""
    body, content_type = multipart(list(files), field)
    return {"data": preamble + body, "content_type": content_type}


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
    # Every fifth request with options, as the page and the README's examples send them.
    queries = ["", "top_k=3", "", "invert=true", "", "invert=false&top_k=10", "", "top_k=2&invert=auto&lang=en"]
    for index, body in enumerate(bodies):
        query = queries[index % len(queries)]
        request = {
            "path": "/predict",
            "method": "POST",
            "data": body,
            "content_type": "image/png",
            "query_string": query,
        }
        fast = answer(served, f"req-{index}", **request)
        assert counting.calls == 0, "a plain crop reached Flask"
        assert fast == answer(flask_only, f"req-{index}", **request)
        assert fast[0] == "200 OK"
        answers.append(json.loads(fast[2]))
    for index, files in enumerate([bodies[:3], bodies[3:4], bodies[4:40]]):  # a form of one is not a batch
        request = {"path": "/predict", "method": "POST", "query_string": "top_k=2" * (index == 0), **form(*files)}
        fast = answer(served, f"form-{index}", **request)
        assert counting.calls == 0, "a form of plain crops reached Flask"
        assert fast == answer(flask_only, f"form-{index}", **request)
        assert fast[0] == "200 OK"
        answers.append(json.loads(fast[2]))
    assert [len(a["predictions"]) for a in answers[-3::2]] == [3, 36] and "predictions" not in answers[-2]
    assert answers[-3]["predictions"][0]["top_k"][0]["label"] == answers[0]["label"]
    answers = answers[: len(bodies)]
    assert answers[-1]["uncertain"] and answers[-1]["reason"] == "not_a_garment"
    assert [len(a.get("top_k", [])) for a in answers[:8]] == [0, 3, 0, 0, 0, 10, 0, 2]
    assert len({a["label"] for a in answers}) > 5

    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"service.access"' in line]
    assert len(lines) == 2 * (len(bodies) + 3) and len(lines[-1]["label"]) == 36
    for line in lines:
        assert line.pop("ts") > 0 and line.pop("latency_ms") >= 0
    assert lines[0::2] == lines[1::2] and lines[0]["request_id"] == "req-0" and lines[0]["label"] == answers[0]["label"]
    assert metric_samples(app) == metric_samples(flask_app)
    assert (
        metric_samples(app)[
            ("fashion_http_requests_total", (("endpoint", "/predict"), ("method", "POST"), ("status", "200")))
        ]
        == len(bodies) + 3
    )


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
        pytest.param({"query_string": "top_k=0"}, id="top_k out of range"),
        pytest.param({"query_string": "invert=maybe"}, id="unknown invert"),
        pytest.param({"query_string": "top_k=3&top_k=4"}, id="a repeated option"),
        pytest.param({"query_string": "invert=%74rue"}, id="percent-encoded option"),
        pytest.param({"query_string": "top_k=3;invert=true"}, id="semicolon"),
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
        pytest.param({"data": "form without an image field"}, id="form without an image field"),
        pytest.param({"data": "form over MAX_BATCH"}, id="form over MAX_BATCH"),
        pytest.param({"data": "form with a preamble"}, id="form werkzeug parses"),
        pytest.param({"data": "form with a JPEG"}, id="form with a JPEG"),
        pytest.param({"data": "form of another type"}, id="multipart/form-data-x"),
    ],
)
def test_other_requests_reach_flask_and_get_its_answer(request_, bundled_model_dir, test_set):
    _, served, flask_only, counting = served_and_flask(bundled_model_dir, MAX_UPLOAD_BYTES="4096", MAX_BATCH="2")
    crop = png(test_set.data.numpy()[0])
    bodies = {
        None: b"",
        "truncated": crop[:-20],
        "rgb": encode(Image.fromarray(test_set.data.numpy()[0]).convert("RGB")),
        "jpeg": encode(Image.fromarray(test_set.data.numpy()[0]), "JPEG"),
        "large": crop + b"\0" * 4096,
    }
    jpeg = encode(Image.fromarray(test_set.data.numpy()[0]), "JPEG")
    forms = {
        "form without an image field": form(crop, field="file"),
        "form over MAX_BATCH": form(crop, crop, crop),
        "form with a preamble": form(crop, crop, preamble=b"a preamble\r\n"),
        "form with a JPEG": form(crop, jpeg),
        "form of another type": {**form(crop), "content_type": f"multipart/form-data-x; boundary={BOUNDARY}"},
    }
    request = {"path": "/predict", "method": "POST", "data": crop, "content_type": "image/png", **request_}
    if request["data"] in forms:
        request.update(forms[request["data"]])
    elif not isinstance(request["data"], bytes):
        request["data"] = bodies[request["data"]]
    fast = answer(served, "same", **request)
    assert counting.calls == 1
    assert fast == answer(flask_only, "same", **request)


def test_a_request_handed_on_keeps_its_start_time(bundled_model_dir):
    """Flask's deadline and latency for a request the fast path read and handed on count from when it arrived."""
    _, served, _, counting = served_and_flask(bundled_model_dir)
    before = time.perf_counter()
    status, _, _ = answer(
        served, "r", path="/predict", method="POST", data=b"\x89PNG not quite", content_type="image/png"
    )
    assert counting.calls == 1 and status.startswith("415")
    started = counting.environ[STARTED_KEY]
    assert before < started < time.perf_counter()
    assert ServiceRequest(counting.environ).started == started


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


# --------------------------------------------------------------------------- v2


def v2_request(document: dict, *chunks: bytes, path: str = "/v2/models/fashion-mnist/infer", **headers) -> dict:
    head = json.dumps(document).encode()
    if chunks:
        headers["Inference-Header-Content-Length"] = str(len(head))
    content_type = "application/octet-stream" if chunks else "application/json"
    return {
        "path": path,
        "method": "POST",
        "data": head + b"".join(chunks),
        "content_type": content_type,
        "headers": headers,
    }


def fp32(array: np.ndarray, binary: bool = False) -> dict:
    if binary:
        return {
            "name": "input",
            "shape": list(array.shape),
            "datatype": "FP32",
            "parameters": {"binary_data_size": array.nbytes},
        }
    return {"name": "input", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}


def images(blobs: list[bytes], binary: bool = True) -> dict:
    """The BYTES ``image`` input of encoded files: binary (their lengths and bytes follow) or base64 in JSON."""
    if binary:
        size = sum(4 + len(blob) for blob in blobs)
        return {"name": "image", "shape": [len(blobs)], "datatype": "BYTES", "parameters": {"binary_data_size": size}}
    data = [base64.b64encode(blob).decode() for blob in blobs]
    return {"name": "image", "shape": [len(blobs)], "datatype": "BYTES", "data": data}


def bytes_chunk(blobs: list[bytes]) -> tuple[bytes]:
    return (b"".join(len(blob).to_bytes(4, "little") + blob for blob in blobs),)


def test_v2_requests_are_answered_in_front_of_flask_with_flasks_bytes(bundled_model_dir, test_set, capfd):
    app, served, _, counting = served_and_flask(bundled_model_dir)
    flask_app, _, flask_only, _ = served_and_flask(bundled_model_dir)
    version = app.extensions["model_runner"].current.version
    one, three = test_set.inputs[:1].numpy(), test_set.inputs[1:4].numpy()
    crops_ = [png(image) for image in test_set.data.numpy()[:2]]
    jpeg = encode(Image.fromarray(test_set.data.numpy()[2]), "JPEG")
    outputs = [{"name": "probabilities", "parameters": {"classification": 3}}, {"name": "label"}, {"name": "uncertain"}]
    requests_ = [
        v2_request({"inputs": [fp32(one)]}),
        v2_request({"id": "batch-3", "inputs": [fp32(three)], "outputs": outputs}),
        v2_request({"inputs": [fp32(one, binary=True)], "parameters": {"binary_data_output": True}}, one.tobytes()),
        v2_request({"inputs": [fp32(three, binary=True)], "outputs": outputs[:2]}, three.tobytes()),
        v2_request({"inputs": [fp32(one)]}, path=f"/v2/models/fashion-mnist/versions/{version}/infer"),
        v2_request(
            {"inputs": [images(crops_[:2])], "parameters": {"binary_data_output": True}}, *bytes_chunk(crops_[:2])
        ),
        v2_request({"inputs": [images([jpeg], binary=False)]}),
    ]
    capfd.readouterr()
    answers = []
    for index, request in enumerate(requests_):
        fast = answer(served, f"v2-{index}", **request)
        assert counting.calls == 0, f"request {index} reached Flask"
        assert fast == answer(flask_only, f"v2-{index}", **request)
        assert fast[0] == "200 OK"
        answers.append(dict(fast[1]))
    binary = ["application/octet-stream" in headers["Content-Type"] for headers in answers]
    assert binary == [False, False, True, False, False, True, False]  # binary output only where asked for
    assert int(answers[2]["Inference-Header-Content-Length"]) < int(answers[2]["Content-Length"])
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"service.access"' in line]
    for line in lines:
        assert line.pop("ts") > 0 and line.pop("latency_ms") >= 0
    assert lines[0::2] == lines[1::2] and len(lines) == 2 * len(requests_) and len(lines[3]["label"]) == 3
    assert metric_samples(app) == metric_samples(flask_app)
    endpoints = {labels for name, labels in metric_samples(app) if name == "fashion_http_requests_total"}
    assert {dict(labels)["endpoint"] for labels in endpoints} == {
        "/v2/models/<name>/infer",
        "/v2/models/<name>/versions/<version>/infer",
    }


@pytest.mark.parametrize(
    "case",
    [
        "an image over MAX_REQUEST_PIXELS",
        "not an image",
        "other model",
        "other version",
        "gzip",
        "not JSON",
        "bad invert",
        "wrong shape",
        "over MAX_BATCH",
        "unknown output",
        "query string",
    ],
)
def test_other_v2_requests_reach_flask_and_get_its_answer(case, bundled_model_dir, test_set):
    _, served, flask_only, counting = served_and_flask(bundled_model_dir, MAX_BATCH="2", MAX_REQUEST_PIXELS="1000")
    one = test_set.inputs[:1].numpy()
    crop = png(test_set.data.numpy()[0])
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(crop)}}
    request = {
        "an image over MAX_REQUEST_PIXELS": lambda: v2_request(
            {"inputs": [{**image, "shape": [2], "parameters": {"binary_data_size": 8 + 2 * len(crop)}}]},
            2 * (len(crop).to_bytes(4, "little") + crop),
        ),
        "not an image": lambda: v2_request(
            {"inputs": [{**image, "parameters": {"binary_data_size": 4 + 9}}]}, (9).to_bytes(4, "little") + b"not a png"
        ),
        "other model": lambda: v2_request({"inputs": [fp32(one)]}, path="/v2/models/mnist/infer"),
        "other version": lambda: v2_request({"inputs": [fp32(one)]}, path="/v2/models/fashion-mnist/versions/1/infer"),
        "gzip": lambda: v2_request({"inputs": [fp32(one)]}, **{"Content-Encoding": "gzip"}),
        "not JSON": lambda: {**v2_request({}), "data": b"{not json"},
        "bad invert": lambda: v2_request({"inputs": [fp32(one)], "parameters": {"invert": "maybe"}}),
        "wrong shape": lambda: v2_request({"inputs": [fp32(one.reshape(1, 784))]}),
        "over MAX_BATCH": lambda: v2_request({"inputs": [fp32(test_set.inputs[:3].numpy())]}),
        "unknown output": lambda: v2_request({"inputs": [fp32(one)], "outputs": [{"name": "logits"}]}),
        "query string": lambda: {**v2_request({"inputs": [fp32(one)]}), "query_string": "x=1"},
    }[case]()
    fast = answer(served, "same", **request)
    assert counting.calls == 1
    assert fast == answer(flask_only, "same", **request)
    assert fast[0] != "200 OK" or case == "query string"


# --------------------------------------------------------------------------- under gunicorn


def test_under_gunicorn_both_paths_give_the_same_answers(bundled_server, test_set):
    """Through the real server, a request the fast path answers and the same request in a form it hands
    on to Flask (a percent-encoded option, a query string on v2) get the same bytes; a body it reads and
    hands on is read again by Flask from gunicorn's request, and refused in the JSON error form."""
    import requests

    url = bundled_server.url
    crop = png(test_set.data.numpy()[7])

    def post(path, data, content_type, request_id):
        headers = {"Content-Type": content_type, "X-Request-ID": request_id}
        response = requests.post(url + path, data=data, headers=headers, timeout=10)
        return response.status_code, response.headers["X-Request-ID"], response.content

    fast = post("/predict?top_k=3", crop, "image/png", "g-1")
    assert fast == post("/predict?top_k=%33", crop, "image/png", "g-1")
    assert fast[0] == 200 and len(json.loads(fast[2])["top_k"]) == 3

    status, _, body = post("/predict", crop[:45], "image/png", "g-2")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_image"

    request = v2_request({"inputs": [fp32(test_set.inputs[7:9].numpy())]})
    v2_fast = post(request["path"], request["data"], "application/json", "g-3")
    assert v2_fast == post(request["path"] + "?via=flask", request["data"], "application/json", "g-3")
    assert v2_fast[0] == 200 and json.loads(v2_fast[2])["outputs"][0]["shape"] == [2, 10]


def test_the_stage_benchmark_times_every_step_the_fast_path_takes_then_puts_them_back(bundled_model_dir, test_set):
    """bench_serving --stages times the fast path's steps inside whole requests by replacing what the
    requests call; each step must be seen once per request (else its figure would silently be 0) and
    the replaced functions restored, with the answers unchanged meanwhile."""
    from werkzeug.test import EnvironBuilder

    from benchmarks.bench_serving import _steps_of_a_request, steps_inside_requests

    app, served, _, counting = served_and_flask(bundled_model_dir, ACCESS_LOG="false")
    blobs = [png(image) for image in test_set.data.numpy()[:6]]
    environs = [
        EnvironBuilder(path="/predict", method="POST", data=blob, content_type="image/png").get_environ()
        for blob in blobs
    ]
    before = {name: vars(owner)[attribute] for name, (owner, attribute) in _steps_of_a_request(app).items()}
    expected = [served.post("/predict", data=blob, content_type="image/png").get_data() for blob in blobs]

    inside = steps_inside_requests(app, blobs, environs, rounds=2)

    assert set(inside) == {*before, "whole request"}
    assert all(microseconds > 0 for microseconds in inside.values())
    # A step inside another takes no longer than it: the forward pass is part of the model's predict.
    assert inside["    the MLP's forward (DirectMLP)"] < inside["  model forward + softmax + judge"]
    assert inside["  model forward + softmax + judge"] < inside["whole request"]
    assert counting.calls == 0  # all of them took the fast path
    after = {name: vars(owner)[attribute] for name, (owner, attribute) in _steps_of_a_request(app).items()}
    assert after == before
    assert [served.post("/predict", data=blob, content_type="image/png").get_data() for blob in blobs] == expected


def test_the_stage_benchmark_says_when_the_fast_path_skipped_a_step(bundled_model_dir, test_set):
    """A request that does not reach a timed step (here: Flask answers an image that is not a plain crop)
    is an error, not a row of zeros."""
    from werkzeug.test import EnvironBuilder

    from benchmarks.bench_serving import steps_inside_requests

    app, *_ = served_and_flask(bundled_model_dir, ACCESS_LOG="false")
    rgb = encode(Image.new("RGB", (28, 28), (9, 9, 9)))
    environ = EnvironBuilder(path="/predict", method="POST", data=rgb, content_type="image/png").get_environ()
    with pytest.raises(RuntimeError, match="decode_crop"):
        steps_inside_requests(app, [rgb], [environ], rounds=1)
