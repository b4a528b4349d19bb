"""Real-world images made from the real test set, through the real server: accuracy per encoding.

The same 200 test images are posted as plain 28x28 PNGs and as product-style photos in every
encoding a client may send (testing/realimages.py); each encoding must stay close to the plain
accuracy. benchmarks/real_images.py prints the full table on more images.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from fashion.contract import CLASS_NAMES
from testing.realimages import ENCODINGS, product_photo

SAMPLE = range(0, 10_000, 50)  # 200 images, 20 per class on average
BATCH = 50


def accuracy(server, blobs: list[bytes], labels: np.ndarray, params=None) -> float:
    """Post ``blobs`` as multipart batches; the fraction answered with the true label."""
    predicted = []
    for start in range(0, len(blobs), BATCH):
        chunk = blobs[start : start + BATCH]
        files = [("image", (f"{i}", blob, "application/octet-stream")) for i, blob in enumerate(chunk)]
        response = requests.post(server.url + "/predict", files=files, params=params, timeout=120)
        assert response.status_code == 200, response.text
        predicted += [p["class_id"] for p in response.json()["predictions"]]
    return float(np.mean(np.array(predicted) == labels))


@pytest.fixture(scope="module")
def sample(test_set):
    return test_set.data.numpy()[list(SAMPLE)], test_set.targets.numpy()[list(SAMPLE)]


@pytest.fixture(scope="module")
def plain_accuracy(bundled_server, sample):
    pixels, labels = sample
    return accuracy(bundled_server, [ENCODINGS["plain PNG 28x28"](p) for p in pixels], labels)


@pytest.mark.parametrize("encoding", [name for name in ENCODINGS if name != "plain PNG 28x28"])
def test_each_encoding_is_close_to_plain_accuracy(bundled_server, sample, plain_accuracy, encoding):
    pixels, labels = sample
    value = accuracy(bundled_server, [ENCODINGS[encoding](p) for p in pixels], labels)
    print(f"{encoding}: {value:.3f} (plain PNG {plain_accuracy:.3f})")
    assert plain_accuracy > 0.8
    assert value >= plain_accuracy - 0.06, f"{encoding}: {value:.3f} vs plain {plain_accuracy:.3f}"


def test_invert_controls_the_background_detection(bundled_server, sample):
    """Product photos need inverting: auto finds it, true forces it, false shows what skipping it costs."""
    pixels, labels = sample
    blobs = [ENCODINGS["product photo PNG (RGB)"](p) for p in pixels]
    auto = accuracy(bundled_server, blobs, labels, {"invert": "auto"})
    forced = accuracy(bundled_server, blobs, labels, {"invert": "true"})
    skipped = accuracy(bundled_server, blobs, labels, {"invert": "false"})
    assert auto == forced
    assert skipped < auto - 0.3


def test_one_product_photo_by_raw_body(bundled_server, sample):
    import io

    pixels, labels = sample
    buffer = io.BytesIO()
    product_photo(pixels[0]).save(buffer, "JPEG", quality=90)
    response = requests.post(
        bundled_server.url + "/predict", data=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}, timeout=30
    )
    assert response.status_code == 200
    assert response.json()["label"] == CLASS_NAMES[labels[0]]
