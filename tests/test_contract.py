"""The shared contract checked against the real data: class order, normalization, features, architecture."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.datasets import FashionMNIST

from fashion.contract import (
    CLASS_NAMES,
    FEATURE_TRANSFORM,
    INPUT_SHAPE,
    MEAN,
    NUM_CLASSES,
    STD,
    ModelConfig,
    build_model,
    inverted_as_asked,
    inverted_pixels,
    one_hot,
    pixels_to_input,
    preprocess,
)
from fashion.images import decode_image


def test_class_names_are_fashion_mnist_order():
    assert list(CLASS_NAMES) == FashionMNIST.classes
    assert NUM_CLASSES == 10 and INPUT_SHAPE == (1, 28, 28)


def test_mean_and_std_recomputed_from_the_training_images(train_set):
    pixels = train_set.data.to(torch.float64) / 255
    assert pixels.shape == (60_000, 28, 28)
    assert pixels.mean().item() == pytest.approx(MEAN, abs=1e-4)
    assert pixels.std().item() == pytest.approx(STD, abs=1e-4)


def test_normalized_training_images_have_zero_mean_unit_std(train_set):
    inputs = train_set.inputs.to(torch.float64)
    assert inputs.shape == (60_000, 1, 28, 28) and train_set.inputs.dtype == torch.float32
    assert inputs.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert inputs.std().item() == pytest.approx(1.0, abs=1e-3)


def test_one_hot_targets():
    for label in range(NUM_CLASSES):
        target = one_hot(label)
        assert target.dtype == torch.float32 and target.shape == (NUM_CLASSES,)
        assert target[label] == 1.0 and target.sum() == 1.0
    with pytest.raises(IndexError):
        one_hot(NUM_CLASSES)


def test_pixels_to_input_is_the_same_for_a_batch_and_for_one_image():
    pixels = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = pixels_to_input(pixels)
    assert batch.shape == (32, 1, 28, 28)
    for i in range(len(pixels)):
        single = FEATURE_TRANSFORM(Image.fromarray(pixels[i].numpy(), mode="L"))
        assert torch.equal(single, batch[i])  # bit-identical, not approximately equal
    assert pixels_to_input(torch.zeros(28, 28, dtype=torch.uint8))[0, 0, 0].item() == pytest.approx(-MEAN / STD)
    assert pixels_to_input(torch.full((28, 28), 255, dtype=torch.uint8))[0, 0, 0].item() == pytest.approx(
        (1 - MEAN) / STD
    )
    with pytest.raises(TypeError):
        pixels_to_input(torch.zeros(28, 28))


def test_preprocess_of_a_28x28_grayscale_png_is_the_training_transform(test_set):
    pixels = test_set.data[0].numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    served = preprocess(decode_image(buffer.getvalue()))
    assert torch.equal(served, test_set.inputs[0])


def test_model_maps_batches_to_ten_logits():
    model = build_model(ModelConfig())
    assert isinstance(model, torch.nn.Sequential)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 256), (256, 10)]
    for n in (1, 7):
        assert model(torch.zeros(n, *INPUT_SHAPE)).shape == (n, NUM_CLASSES)
    with_dropout = build_model(ModelConfig(hidden_sizes=(64,), dropout=0.25))
    assert any(isinstance(m, torch.nn.Dropout) for m in with_dropout)
    assert with_dropout(torch.zeros(3, *INPUT_SHAPE)).shape == (3, NUM_CLASSES)


def test_model_config_round_trip_and_validation():
    config = ModelConfig(hidden_sizes=(256, 128), dropout=0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    # A card that names no widths predates the 256-wide default: it was trained 784-512-512-10.
    assert ModelConfig.from_dict({}).hidden_sizes == (512, 512) != ModelConfig().hidden_sizes
    for bad in ({"hidden_sizes": ()}, {"hidden_sizes": (0,)}, {"dropout": 1.0}, {"kind": "cnn"}):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_known_answer_with_hand_set_weights():
    model = build_model(ModelConfig(hidden_sizes=(1,)))
    first, last = model[1], model[3]
    with torch.no_grad():
        first.weight.zero_()
        first.weight[0, 0] = 1.0  # the hidden unit reads the top-left pixel
        first.bias.zero_()
        last.weight.zero_()
        last.bias.zero_()
        last.weight[4, 0] = 1.0  # ... and votes for "Coat"
    x = torch.zeros(1, *INPUT_SHAPE)
    x[0, 0, 0, 0] = 2.0
    logits = model(x)
    assert logits.argmax().item() == CLASS_NAMES.index("Coat")
    assert np.allclose(logits.detach().numpy()[0], [0, 0, 0, 0, 2.0, 0, 0, 0, 0, 0])


def test_the_torchvision_transform_and_the_written_out_arithmetic_give_the_same_bits(test_set):
    transforms = [type(t).__name__ for t in FEATURE_TRANSFORM.transforms]
    assert transforms[:3] == ["ToImage", "ToDtype", "Normalize"]
    every_value = (torch.arange(784) % 256).to(torch.uint8).reshape(1, *INPUT_SHAPE)  # all 256 values, one image
    assert torch.equal(FEATURE_TRANSFORM(every_value), pixels_to_input(every_value))
    assert torch.equal(FEATURE_TRANSFORM(test_set.data.unsqueeze(1)), pixels_to_input(test_set.data))
    assert type(FEATURE_TRANSFORM(every_value)) is torch.Tensor  # not a tv_tensors.Image


def test_cnn_config_builds_a_sequential_and_round_trips():
    config = ModelConfig(kind="cnn", channels=(8, 16), hidden_sizes=(32,), dropout=0.25)
    assert ModelConfig.from_dict(config.to_dict()) == config
    model = build_model(config)
    assert isinstance(model, torch.nn.Sequential)
    assert [type(m).__name__ for m in model][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert model.eval()(torch.zeros(3, *INPUT_SHAPE)).shape == (3, NUM_CLASSES)
    assert "channels" not in ModelConfig().to_dict()  # an MLP's card is unchanged
    for bad in ({"kind": "cnn", "channels": ()}, {"kind": "cnn", "channels": (8, 8, 8, 8)}, {"channels": (8,)}):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_preprocessed_row_is_the_canvas_and_refuses_what_it_cannot_convert(tmp_path, capsys):
    """The one image-to-pixels step of the service's general path and fashion-predict."""
    from fashion.contract import preprocessed_row, to_fashion_mnist
    from fashion.images import ImageError
    from fashion.predict import main as fashion_predict

    photo = Image.new("RGB", (60, 90), (250, 250, 250))
    photo.paste((20, 20, 20), (10, 20, 50, 80))
    assert preprocessed_row(photo) == to_fashion_mnist(photo).tobytes()
    with pytest.raises(ImageError, match="cannot be converted to grayscale"):
        preprocessed_row(Image.new("LAB", (40, 30)))
    # The command line says the same, with the file's name: a TIFF can carry LAB.
    lab = tmp_path / "lab.tif"
    Image.new("LAB", (40, 30)).save(lab)
    assert fashion_predict([str(lab)]) == 2
    assert f"{lab}: the image cannot be converted to grayscale" in capsys.readouterr().err


@pytest.mark.parametrize("border", [20, 230], ids=["dark-border", "light-border"])
def test_the_one_inversion_rule_on_images_and_on_their_bytes(border):
    """``inverted_as_asked`` (the photo pipeline) and ``inverted_pixels`` (the service's crops) are one
    rule: "true" negates as ImageOps.invert does, "false" never, "auto" only a light border."""
    rng = np.random.default_rng(border)
    pixels = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    pixels[[0, -1], :] = border
    pixels[:, [0, -1]] = border
    gray = Image.fromarray(pixels, mode="L")
    negative = ImageOps.invert(gray).tobytes()
    expected = {"true": negative, "false": gray.tobytes(), "auto": negative if border > 127 else gray.tobytes()}
    for mode, want in expected.items():
        assert inverted_as_asked(gray, mode).tobytes() == want
        assert inverted_pixels(gray.tobytes(), 30, mode) == want
