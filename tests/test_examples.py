"""The sample images in examples/ (the README's curl commands post them) get their own class from the real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}
# File name (without the "-photo" suffix) -> the class the README promises.
EXPECTED = {
    "ankle-boot": "Ankle boot",
    "bag": "Bag",
    "dress": "Dress",
    "sneaker": "Sneaker",
    "t-shirt": "T-shirt/top",
    "trouser": "Trouser",
}


def example_files() -> list[Path]:
    return sorted(path for path in EXAMPLES.iterdir() if path.suffix in CONTENT_TYPES)


def test_the_examples_cover_crops_and_a_product_photo():
    names = {path.name for path in example_files()}
    assert {f"{stem}.png" for stem in EXPECTED} <= names
    assert "ankle-boot-photo.jpg" in names


@pytest.mark.parametrize("path", example_files(), ids=lambda path: path.name)
def test_each_example_is_predicted_as_its_name(bundled_server, path):
    response = requests.post(
        bundled_server.url + "/predict",
        data=path.read_bytes(),
        headers={"Content-Type": CONTENT_TYPES[path.suffix]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["label"] == EXPECTED[path.stem.removesuffix("-photo")]
