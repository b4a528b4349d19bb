"""The prediction service through the real gunicorn server and real HTTP.

Known answers come from models with hand-set weights whose softmax is computed here by hand.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from fashion.checkpoint import CARD_FILE, WEIGHTS_FILE, load_checkpoint, read_card
from fashion.contract import CLASS_NAMES, FEATURE_TRANSFORM, MEAN, NUM_CLASSES, STD, ModelConfig, build_model
from testing.images import encode, png
from testing.models import TOY_MODEL_ENV, save_model

# --------------------------------------------------------------------------- hand-set models


def save_bias_model(directory: Path, biases: list[float]) -> dict:
    """Every weight zero, last-layer bias = ``biases``: the logits are the biases whatever the image."""
    config = ModelConfig(hidden_sizes=(4,))
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model[-1].bias.copy_(torch.tensor(biases))
    return save_model(model, {"architecture": config.to_dict(), "note": "hand-set test model"}, directory)


# softmax(log(k)) = k / sum(k): probabilities 1/55, 2/55, ..., 10/55.
RISING = [math.log(k) for k in range(1, NUM_CLASSES + 1)]
RISING_PROBABILITIES = [k / 55 for k in range(1, NUM_CLASSES + 1)]
FALLING = RISING[::-1]


def save_brightness_model(directory: Path) -> dict:
    """Hidden unit 0 = mean of the normalized pixels, unit 1 = minus that mean (after ReLU);
    the "Ankle boot" logit is unit 0 and the "T-shirt/top" logit is unit 1."""
    config = ModelConfig(hidden_sizes=(2,))
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model[1].weight[0].fill_(1 / 784)
        model[1].weight[1].fill_(-1 / 784)
        model[-1].weight[9, 0] = 1.0
        model[-1].weight[0, 1] = 1.0
    return save_model(model, {"architecture": config.to_dict()}, directory)


def brightness_answer(pixel: int) -> list[float]:
    """The brightness model's probabilities for a uniform image of ``pixel``, by hand."""
    x = (pixel / 255 - MEAN) / STD
    logits = [0.0] * NUM_CLASSES
    if x > 0:
        logits[9] = x
    else:
        logits[0] = -x
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def post_png(server, data: bytes, params=None, headers=None) -> requests.Response:
    return requests.post(
        server.url + "/predict",
        data=data,
        params=params,
        headers={"Content-Type": "image/png", **(headers or {})},
        timeout=30,
    )


def assert_probabilities(answer: dict, expected: list[float], tolerance: float = 1e-6) -> None:
    probabilities = answer["probabilities"]
    assert list(probabilities) == list(CLASS_NAMES)
    for name, value in zip(CLASS_NAMES, expected, strict=True):
        assert probabilities[name] == pytest.approx(value, abs=tolerance), name
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    best = max(range(NUM_CLASSES), key=lambda i: expected[i])
    assert answer["class_id"] == best
    assert answer["label"] == CLASS_NAMES[best]
    assert answer["confidence"] == pytest.approx(expected[best], abs=tolerance)


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bias_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bias-model")
    save_bias_model(directory, RISING)
    return directory


@pytest.fixture(scope="module")
def brightness_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("brightness-model")
    save_brightness_model(directory)
    return directory


LIMITS = {"MAX_UPLOAD_BYTES": str(256 * 1024), "MAX_IMAGE_PIXELS": str(1_000_000), "MAX_BATCH": "4"}


@pytest.fixture(scope="module")
def limited_server(brightness_model, tmp_path_factory):
    """One worker on the brightness model with small limits, shared by the error-path tests."""
    from testing.server import start_server

    handle = start_server(
        brightness_model, env={**LIMITS, **TOY_MODEL_ENV}, workers=1, log_dir=tmp_path_factory.mktemp("limited")
    )
    yield handle
    handle.stop()


# --------------------------------------------------------------------------- known answers


def test_known_answer_from_hand_set_bias(start_gunicorn, bias_model):
    server = start_gunicorn(bias_model, env=TOY_MODEL_ENV)
    response = post_png(server, png(0), params={"top_k": "3"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_probabilities(answer, RISING_PROBABILITIES)
    assert answer["label"] == "Ankle boot" and answer["confidence"] == pytest.approx(10 / 55, abs=1e-6)
    assert [entry["class_id"] for entry in answer["top_k"]] == [9, 8, 7]
    assert [entry["probability"] for entry in answer["top_k"]] == pytest.approx([10 / 55, 9 / 55, 8 / 55], abs=1e-6)
    card = read_card(bias_model)
    assert answer["model"]["sha256"] == card["weights"]["sha256"]
    assert answer["model"]["version"] == card["weights"]["sha256"][:12]
    assert answer["model"]["name"] == "fashion-mnist"


@pytest.mark.parametrize(
    ("pixel", "invert", "seen"),
    [
        (255, "false", 255),  # white, taken as it is: bright garment -> "Ankle boot" unit
        (0, "false", 0),  # black -> "T-shirt/top" unit
        (255, "true", 0),  # white, inverted on request
        (0, "true", 255),
        (255, "auto", 0),  # a light border means a product photo: inverted automatically
        (0, "auto", 0),  # Fashion-MNIST's black background: left alone
    ],
)
def test_known_answer_depends_on_the_pixels_and_invert(limited_server, pixel, invert, seen):
    response = post_png(limited_server, png(pixel), params={"invert": invert})
    assert response.status_code == 200, response.text
    assert_probabilities(response.json(), brightness_answer(seen))


def test_batch_answers_in_order(limited_server):
    files = [("image", (f"{i}.png", png(p), "image/png")) for i, p in enumerate([255, 0, 255])]
    response = requests.post(limited_server.url + "/predict?invert=false", files=files, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["label"] for p in body["predictions"]] == ["Ankle boot", "T-shirt/top", "Ankle boot"]
    for prediction, pixel in zip(body["predictions"], [255, 0, 255], strict=True):
        assert_probabilities(prediction, brightness_answer(pixel))
    assert body["model"]["sha256"]
    # One form field is one image: the single-image answer.
    single = requests.post(limited_server.url + "/predict", files=files[:1], params={"invert": "false"}, timeout=30)
    assert_probabilities(single.json(), brightness_answer(255))


# --------------------------------------------------------------------------- no skew


def test_no_skew_against_the_offline_model(bundled_server, bundled_model_dir, test_set):
    """500 real test images over HTTP give the offline model's probabilities and accuracy."""
    model, _card = load_checkpoint(bundled_model_dir)
    indices = range(0, 10_000, 20)
    pixels = test_set.data.numpy()
    offline_inputs = torch.stack([FEATURE_TRANSFORM(Image.fromarray(pixels[i])) for i in indices])
    with torch.inference_mode():
        offline = torch.softmax(model(offline_inputs), dim=1)
    labels = test_set.targets[list(indices)]

    served = []
    with requests.Session() as session:
        for i in indices:
            response = session.post(
                bundled_server.url + "/predict", data=png(pixels[i]), headers={"Content-Type": "image/png"}, timeout=30
            )
            assert response.status_code == 200, response.text
            served.append([response.json()["probabilities"][name] for name in CLASS_NAMES])
    served = torch.tensor(served, dtype=torch.float64)

    assert len(served) == 500
    assert torch.equal(served.argmax(1), offline.argmax(1))
    assert (served - offline.double()).abs().max().item() <= 1e-5
    http_accuracy = (served.argmax(1) == labels).double().mean().item()
    offline_accuracy = (offline.argmax(1) == labels).double().mean().item()
    assert http_accuracy == offline_accuracy
    assert http_accuracy > 0.8


# --------------------------------------------------------------------------- errors


def _truncated_png() -> bytes:
    data = png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    return data[: len(data) // 2]


def _ppm() -> bytes:
    return encode(Image.new("L", (28, 28)), "PPM")


ERROR_CASES = [
    # (id, method, path, request kwargs, status, code)
    ("empty body", "POST", "/predict", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "invalid_image"),
    (
        "truncated png",
        "POST",
        "/predict",
        {"data": _truncated_png(), "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_image",
    ),
    (
        "png header only",
        "POST",
        "/predict",
        {"data": png(0)[:33], "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_image",
    ),
    (
        "random bytes",
        "POST",
        "/predict",
        {"data": os.urandom(500), "headers": {"Content-Type": "image/png"}},
        415,
        "unsupported_media_type",
    ),
    (
        "format not allowed",
        "POST",
        "/predict",
        {"data": _ppm(), "headers": {"Content-Type": "image/png"}},
        415,
        "unsupported_media_type",
    ),
    (
        "text content type",
        "POST",
        "/predict",
        {"data": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "no content type",
        "POST",
        "/predict",
        {"data": png(0), "headers": {"Content-Type": ""}},
        415,
        "unsupported_media_type",
    ),
    (
        "svg content type",
        "POST",
        "/predict",
        {"data": b"<svg/>", "headers": {"Content-Type": "image/svg+xml"}},
        415,
        "unsupported_media_type",
    ),
    (
        "form without image field",
        "POST",
        "/predict",
        {"files": {"picture": ("a.png", png(0), "image/png")}},
        400,
        "missing_field",
    ),
    (
        "form with empty file",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", b"", "image/png")}},
        400,
        "invalid_image",
    ),
    (
        "form, second image broken",
        "POST",
        "/predict",
        {"files": [("image", ("a.png", png(0), "image/png")), ("image", ("b.png", b"xx", "image/png"))]},
        415,
        "unsupported_media_type",
    ),
    (
        "too many images",
        "POST",
        "/predict",
        {"files": [("image", ("a.png", png(0), "image/png"))] * 5},
        413,
        "too_many_images",
    ),
    (
        "body over MAX_UPLOAD_BYTES",
        "POST",
        "/predict",
        {"data": b"\x89PNG" + bytes(300 * 1024), "headers": {"Content-Type": "image/png"}},
        413,
        "payload_too_large",
    ),
    (
        "form over MAX_UPLOAD_BYTES",
        "POST",
        "/predict",
        {"files": {"image": ("a.png", bytes(300 * 1024), "image/png")}},
        413,
        "payload_too_large",
    ),
    (
        "decompression bomb",
        "POST",
        "/predict",
        {"data": png(0, (1100, 1000)), "headers": {"Content-Type": "image/png"}},
        413,
        "image_too_large",
    ),
    (
        "top_k zero",
        "POST",
        "/predict?top_k=0",
        {"data": png(0), "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_parameter",
    ),
    (
        "top_k eleven",
        "POST",
        "/predict?top_k=11",
        {"data": png(0), "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_parameter",
    ),
    (
        "top_k text",
        "POST",
        "/predict?top_k=all",
        {"data": png(0), "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_parameter",
    ),
    (
        "invert unknown",
        "POST",
        "/predict?invert=maybe",
        {"data": png(0), "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_parameter",
    ),
    ("GET predict", "GET", "/predict", {}, 405, "method_not_allowed"),
    ("POST healthz", "POST", "/healthz", {}, 405, "method_not_allowed"),
    ("unknown path", "GET", "/v1/nothing-here", {}, 404, "not_found"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error_paths_answer_json_with_the_right_status(limited_server, method, path, kwargs, status, code):
    response = requests.request(method, limited_server.url + path, timeout=30, **kwargs)
    assert_error(response, status, code)
    if status == 405:
        assert response.headers.get("Allow")
    # The worker survived and still answers correctly.
    after = post_png(limited_server, png(0), params={"invert": "false"})
    assert after.status_code == 200
    assert_probabilities(after.json(), brightness_answer(0))


def test_no_error_killed_a_worker_or_answered_500(limited_server):
    """Every error case in a row on the one worker: none is a 5xx, and the worker that booted still answers.

    Sends the cases itself rather than relying on the test above having run first on the shared server."""
    for _name, method, path, kwargs, status, _code in ERROR_CASES:
        assert requests.request(method, limited_server.url + path, timeout=30, **kwargs).status_code == status
    assert post_png(limited_server, png(0)).status_code == 200
    time.sleep(0.2)  # the last access line reaches the log file
    entries = limited_server.access_entries()
    assert len(entries) > len(ERROR_CASES)
    assert all(entry["status"] < 500 for entry in entries)
    assert "Worker exiting" not in limited_server.log_text()
    assert limited_server.log_text().count("Booting worker") == 1


def test_unexpected_exception_is_a_json_500_and_logged(bias_model, caplog):
    from service import create_app

    app = create_app({"MODEL_DIR": str(bias_model), "RELOAD_INTERVAL": "0", **TOY_MODEL_ENV})

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger="service.app"):
        response = client.get("/boom")
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True)
    # The cause is logged, with the request id the client got back (generated here, none was sent).
    (record,) = [r for r in caplog.records if r.name == "service.app"]
    assert record.exc_info and "secret internal detail" in str(record.exc_info[1])
    assert record.request_id == response.headers["X-Request-ID"] and len(record.request_id) == 16
    assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- probes, card, logs


def test_health_ready_and_model_card(start_gunicorn, bias_model):
    server = start_gunicorn(bias_model, env=TOY_MODEL_ENV)
    assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    card = requests.get(server.url + "/model", timeout=10).json()
    expected = read_card(bias_model)
    assert card["classes"] == list(CLASS_NAMES)
    assert card["normalization"] == {"mean": MEAN, "std": STD}
    assert card["input"] == {"channels": 1, "height": 28, "width": 28}
    assert card["sha256"] == expected["weights"]["sha256"]
    assert card["device"] == "cpu"
    assert card["torch_version"] == torch.__version__
    assert card["architecture"]["hidden_sizes"] == [4]


def test_request_id_echoed_and_one_json_log_line_per_request(start_gunicorn, bias_model):
    server = start_gunicorn(bias_model, env=TOY_MODEL_ENV)
    given = post_png(server, png(0), headers={"X-Request-ID": "client-id-42"})
    assert given.headers["X-Request-ID"] == "client-id-42"
    generated = post_png(server, png(0))
    assert len(generated.headers["X-Request-ID"]) == 16
    forged = post_png(server, png(0), headers={"X-Request-ID": 'x" "status": 200'})
    assert forged.headers["X-Request-ID"] != 'x" "status": 200'
    requests.get(server.url + "/missing", timeout=10)
    time.sleep(0.2)
    entries = server.access_entries()
    by_id = {entry["request_id"]: entry for entry in entries}
    entry = by_id["client-id-42"]
    assert entry["method"] == "POST" and entry["path"] == "/predict" and entry["status"] == 200
    assert entry["label"] == "Ankle boot" and entry["latency_ms"] > 0
    assert by_id[generated.headers["X-Request-ID"]]["label"] == "Ankle boot"
    assert any(e["path"] == "/missing" and e["status"] == 404 and e["error"] == "not_found" for e in entries)
    # One line per request: the start-up probe on /healthz plus the four above.
    assert [e["path"] for e in entries] == ["/healthz", "/predict", "/predict", "/predict", "/missing"]


# --------------------------------------------------------------------------- not ready, hot reload


def test_bad_hash_is_live_but_not_ready(start_gunicorn, bias_model, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(bias_model, directory)
    card = json.loads((directory / CARD_FILE).read_text())
    card["weights"]["sha256"] = "0" * 64
    (directory / CARD_FILE).write_text(json.dumps(card))

    server = start_gunicorn(directory, env={"RELOAD_INTERVAL": "0.2", **TOY_MODEL_ENV})
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    error = assert_error(requests.get(server.url + "/readyz", timeout=10), 503, "model_not_ready")
    assert "SHA-256" in error["message"]
    assert_error(post_png(server, png(0)), 503, "model_not_ready")
    assert_error(requests.get(server.url + "/model", timeout=10), 503, "model_not_ready")

    # A good model committed into the directory is picked up without a restart.
    save_bias_model(directory, FALLING)
    answer = _wait_for_sha(server, read_card(directory)["weights"]["sha256"])
    assert_probabilities(answer, RISING_PROBABILITIES[::-1])
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200


def _wait_for_sha(server, sha: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = post_png(server, png(0))
        if response.status_code == 200 and response.json()["model"]["sha256"] == sha:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"the server did not start serving {sha[:12]} in {timeout} s")


def test_hot_reload_swaps_only_a_complete_pair(start_gunicorn, bias_model, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(bias_model, directory)
    old_sha = read_card(directory)["weights"]["sha256"]
    server = start_gunicorn(directory, env={"RELOAD_INTERVAL": "0.2", **TOY_MODEL_ENV}, workers=2)
    assert post_png(server, png(0)).json()["model"]["sha256"] == old_sha
    # Both workers hold the old model before the files change (a worker still booting would
    # find nothing it may serve and rightly answer 503).
    deadline = time.monotonic() + 60
    while server.log_text().count(f"version {old_sha[:12]} on") < 2:
        assert time.monotonic() < deadline, "the second worker did not load the model"
        time.sleep(0.1)

    staging = tmp_path / "staging"
    new_sha = save_bias_model(staging, FALLING)["weights"]["sha256"]
    # A writer caught between its two renames: new weights, old card. Never served.
    os.replace(staging / WEIGHTS_FILE, directory / WEIGHTS_FILE)
    for _ in range(10):
        time.sleep(0.1)
        response = post_png(server, png(0))
        assert response.status_code == 200
        assert response.json()["model"]["sha256"] == old_sha
        assert_probabilities(response.json(), RISING_PROBABILITIES)
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200

    os.replace(staging / CARD_FILE, directory / CARD_FILE)
    answer = _wait_for_sha(server, new_sha)
    assert_probabilities(answer, RISING_PROBABILITIES[::-1])
    # Both workers switch: each checks on its own requests, at most RELOAD_INTERVAL apart.
    time.sleep(0.5)
    shas = {post_png(server, png(0)).json()["model"]["sha256"] for _ in range(20)}
    assert shas == {new_sha}


def test_missing_model_dir_is_not_ready_until_a_model_appears(start_gunicorn, tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    server = start_gunicorn(directory, env={"RELOAD_INTERVAL": "0.1", **TOY_MODEL_ENV})
    error = assert_error(requests.get(server.url + "/readyz", timeout=10), 503, "model_not_ready")
    assert "no model" in error["message"]
    sha = save_bias_model(directory, RISING)["weights"]["sha256"]
    _wait_for_sha(server, sha)


# --------------------------------------------------------------------------- start-up and shutdown


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"MAX_BATCH": "-1"}, "MAX_BATCH"),
        ({"MAX_UPLOAD_BYTES": "lots"}, "MAX_UPLOAD_BYTES"),
        ({"TORCH_THREADS": "0"}, "TORCH_THREADS"),
        ({"RELOAD_INTERVAL": "nan"}, "RELOAD_INTERVAL"),
        ({"ACCESS_LOG": "perhaps"}, "ACCESS_LOG"),
    ],
)
def test_bad_configuration_exits_with_a_clear_message(start_gunicorn, bias_model, env, variable):
    server = start_gunicorn(bias_model, env=env, wait=None)
    assert server.process.wait(timeout=60) == 2
    log = server.log_text()
    assert f"configuration error: {variable}=" in log
    assert "Traceback" not in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_configuration_error(start_gunicorn, bias_model):
    server = start_gunicorn(bias_model, env={"DEVICE": "cuda", **TOY_MODEL_ENV}, wait=None)
    assert server.process.wait(timeout=60) == 2
    assert "DEVICE=cuda" in server.log_text()


def test_sigterm_lets_the_request_in_flight_finish(start_gunicorn, bias_model):
    server = start_gunicorn(bias_model, env=TOY_MODEL_ENV)
    body = png(0)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.3)  # the worker is now inside the request, waiting for the rest of the body
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[10:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 200 " in status_line, reply[:300]
    answer = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert_probabilities(answer, RISING_PROBABILITIES)
    assert server.process.wait(timeout=30) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/healthz", timeout=5)
