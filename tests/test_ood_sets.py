"""The out-of-distribution sets of testing/ood.py: they build, are deterministic, and are no Fashion-MNIST images."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torchvision.datasets import FashionMNIST

from fashion.contract import pixels_to_input
from fashion.images import DEFAULT_MAX_PIXELS
from service.web import to_inputs
from testing.ood import OOD_SET_NAMES, ood_samples, ood_sets, service_crop

EXPECTED_NAMES = {"photos", "digits", "characters", "noise", "blank", "textures"}


@pytest.fixture(scope="module")
def sets():
    return ood_sets(seed=0)


@pytest.fixture(scope="module")
def samples():
    return ood_samples(seed=0, per_set=6)


@pytest.fixture(scope="module")
def test_images(data_root) -> torch.Tensor:
    return FashionMNIST(str(data_root), train=False).data


def test_every_set_builds_as_uint8_crops(sets):
    assert set(sets) == EXPECTED_NAMES == set(OOD_SET_NAMES)
    for name, ood in sets.items():
        assert ood.name == name
        assert ood.description and "\n" not in ood.description
        assert ood.pixels.dtype == torch.uint8
        assert ood.pixels.shape[1:] == (28, 28)
        assert 200 <= len(ood) <= 1000, (name, len(ood))
        assert len(ood) == len(ood.pixels)


def test_samples_are_the_uploads_the_crops_come_from(sets, samples):
    """ood_samples' bytes preprocess to the set's first crops, through the service's own to_inputs."""
    for name, blobs in samples.items():
        assert len(blobs) == 6
        pixels = sets[name].pixels[: len(blobs)]
        assert [service_crop(blob) for blob in blobs] == [p.numpy().tobytes() for p in pixels]
        assert torch.equal(to_inputs(blobs, "auto", DEFAULT_MAX_PIXELS), pixels_to_input(pixels))


def test_deterministic_for_a_seed(sets):
    # A second build of the cheaper sets in full (photos' first crops are compared through ood_samples above).
    names = ("digits", "characters", "noise", "blank", "textures")
    again = ood_sets(seed=0, names=names)
    for name in names:
        assert torch.equal(again[name].pixels, sets[name].pixels), name
    other = ood_sets(seed=1, names=("noise",))["noise"].pixels
    assert not torch.equal(other, sets["noise"].pixels)


def test_unknown_set_is_refused():
    with pytest.raises(KeyError):
        ood_sets(names=("garments",))


def test_no_fashion_mnist_test_image_among_them(sets, test_images):
    """No crop equals a test image, and sampled crops are far (RMS > 8 gray levels) from every sampled one."""
    test_hashes = {hashlib.sha256(image.numpy().tobytes()).digest() for image in test_images}
    reference = test_images[::5].reshape(-1, 784).float()
    for name, ood in sets.items():
        assert not test_hashes & {hashlib.sha256(p.numpy().tobytes()).digest() for p in ood.pixels}, name
        sample = ood.pixels[:: max(1, len(ood) // 50)].reshape(-1, 784).float()
        nearest = (torch.cdist(sample, reference) / 28).amin(dim=1)  # RMS difference per pixel
        assert float(nearest.min()) > 8.0, name


def test_not_all_alike(sets):
    """Each set varies: not one crop repeated (blank is allowed its many identical black canvases)."""
    for name, ood in sets.items():
        distinct = len({p.numpy().tobytes() for p in ood.pixels})
        assert distinct >= (10 if name == "blank" else len(ood) // 2), (name, distinct)
