"""The request cost budget in the service itself, without any proxy in front (make serve, Kubernetes).

The real gunicorn (testing/server.py) with the service's workers: a request whose images would decode to
more than MAX_REQUEST_PIXELS is refused from the headers, a JPEG counts at its draft scale, a request
that runs past REQUEST_DEADLINE is answered 503 by the worker itself, and no refusal is HTML.
"""

from __future__ import annotations

import io
import json
import socket
import time

import numpy as np
import pytest
import requests
from PIL import Image

from fashion.contract import to_fashion_mnist
from fashion.images import (
    DECODE_EDGE,
    DeadlineExceeded,
    ImageError,
    RequestTooLarge,
    decode_image,
    decode_images,
)
from testing.attacks import bombs_beside_a_normal_client, multipart


def _png(size: tuple[int, int], value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def _error(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:200]
    error = response.json()["error"]
    assert set(error) == {"status", "code", "message"} and error["status"] == response.status_code
    return error


# --------------------------------------------------------------------------- in process


def test_request_budget_is_checked_from_the_headers_before_any_decoding():
    blobs = [_png((100, 100))] * 3
    assert len(decode_images(blobs, max_request_pixels=30_000)) == 3
    with pytest.raises(RequestTooLarge, match=r"30,000 pixels in all; the limit is 29,999") as caught:
        decode_images(blobs, max_request_pixels=29_999)
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
    # Broken pixel data is never reached when the budget already refuses the request...
    truncated = _png((300, 300), 7)[:-30]
    with pytest.raises(RequestTooLarge):
        decode_images([*blobs, truncated], max_request_pixels=100)
    # ... and otherwise is reported with its position, in words without exception class names.
    with pytest.raises(ImageError) as caught:
        decode_images([blobs[0], truncated])
    assert caught.value.index == 1 and caught.value.code == "invalid_image"
    assert str(caught.value) == "the image data is truncated or corrupt"


def test_jpeg_is_decoded_at_draft_scale_and_counted_so():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (4096, 3072, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=80)
    # 12.6 M pixels in the header; decoded at 1/4 scale (the smallest that keeps DECODE_EDGE): 0.79 M.
    (image,) = decode_images([buffer.getvalue()], max_request_pixels=786_432)
    assert image.size == (768, 1024) and max(image.size) == DECODE_EDGE
    with pytest.raises(RequestTooLarge):
        decode_images([buffer.getvalue()], max_request_pixels=786_431)


def test_large_images_are_reduced_early_without_changing_what_the_model_sees(test_set):
    """A real test crop blown up to 2,800 pixels: reduced on decode, the 28x28 input barely moves."""
    for index in range(0, 50, 10):
        crop = Image.fromarray(255 - test_set.data[index].numpy(), mode="L")  # dark garment on white
        large = crop.resize((2800, 2800), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        large.save(buffer, "PNG")
        reduced = decode_image(buffer.getvalue())
        assert max(reduced.size) < 2800 and max(reduced.size) >= DECODE_EDGE
        full = np.asarray(to_fashion_mnist(large), dtype=np.float64)
        served = np.asarray(to_fashion_mnist(reduced), dtype=np.float64)
        assert np.abs(full - served).mean() < 2.0, index  # of 255 grey levels


def test_deadline_stops_decoding_between_images():
    with pytest.raises(DeadlineExceeded) as caught:
        decode_images([_png((64, 64))] * 2, deadline=time.monotonic() - 1)
    assert caught.value.status == 503 and caught.value.code == "deadline_exceeded"


# --------------------------------------------------------------------------- the real server


def test_the_bomb_request_gets_a_json_413_while_the_other_worker_keeps_answering(start_gunicorn, bundled_model_dir):
    """The issue's request: 64 PNGs of 7,999 x 7,999 pixels (4 G pixels). Two at once, twice over."""
    server = start_gunicorn(bundled_model_dir, workers=2)
    deadline = time.monotonic() + 30  # the server answers once one worker is up; wait for the second
    while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers_before = sorted(server.worker_pids())
    assert len(workers_before) == 2
    answers, elapsed = [], []
    for _round in range(2):
        bombs, seconds, normal = bombs_beside_a_normal_client(server.url, bombs=2, normal=5, interval=0.2)
        answers += bombs
        elapsed += seconds
        assert [status for status, _ in normal] == [200] * 5, normal
    print(f"bomb answered in {elapsed} s; normal requests meanwhile: {normal}")
    for response in answers:
        assert response.status_code == 413, response.text[:300]
        error = _error(response)
        assert error["code"] == "request_too_large" and "MAX_REQUEST_PIXELS" in error["message"]
    assert sorted(server.worker_pids()) == workers_before  # no worker was killed or replaced


def test_pixel_budget_and_deadline_through_the_server(start_gunicorn, bundled_model_dir):
    server = start_gunicorn(
        bundled_model_dir, env={"MAX_REQUEST_PIXELS": "20000", "REQUEST_DEADLINE": "0.3"}, workers=1
    )
    body, content_type = multipart([_png((100, 100), 255)] * 2)
    response = requests.post(f"{server.url}/predict", data=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2
    body, content_type = multipart([_png((100, 100), 255)] * 3)
    response = requests.post(f"{server.url}/predict", data=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    # A single image over the budget by itself, as a raw body.
    response = requests.post(
        f"{server.url}/predict", data=_png((200, 101)), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"


def test_a_request_past_its_deadline_is_answered_503_by_the_worker(start_gunicorn, bundled_model_dir):
    server = start_gunicorn(
        bundled_model_dir, env={"MAX_REQUEST_PIXELS": "1000000000", "REQUEST_DEADLINE": "0.2"}, workers=1
    )
    pid = server.worker_pids()
    # 40 images of 3,000 x 3,000: far more than 0.2 s of decoding on any machine.
    body, content_type = multipart([_png((3000, 3000), 255)] * 40)
    started = time.monotonic()
    response = requests.post(f"{server.url}/predict", data=body, headers={"Content-Type": content_type}, timeout=60)
    print(f"deadline answer after {time.monotonic() - started:.2f} s")
    assert response.status_code == 503, response.text[:300]
    assert _error(response)["code"] == "deadline_exceeded"
    assert server.worker_pids() == pid
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_gunicorn_own_answers_are_json_too(start_gunicorn, bundled_model_dir):
    """What gunicorn answers by itself: an unparsable request, and a worker killed at TIMEOUT."""
    server = start_gunicorn(bundled_model_dir, env={"TIMEOUT": "2", "REQUEST_DEADLINE": "1"}, workers=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "bad_request"
    # A body that never arrives holds the worker until gunicorn kills it (the proxy exists for this).
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n1")
        head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500") and b"application/json" in head, head
    assert json.loads(body)["error"] == {
        "status": 500,
        "code": "internal_error",
        "message": "the server failed to handle this request; it has been logged",
    }


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
