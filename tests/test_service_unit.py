"""In-process checks of the service's pieces: settings, the input lookup table, the hot path's pieces."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from flask import request
from PIL import Image, PngImagePlugin

from fashion.contract import (
    CLASS_NAMES,
    FEATURE_TRANSFORM,
    INPUT_TABLE,
    INVERT_MODES,
    NUM_CLASSES,
    ModelConfig,
    build_model,
    canvases_to_input,
    pixels_to_input,
    to_fashion_mnist,
)
from fashion.images import ImageError, decode_image
from fashion.trust import Judge, TrustConfig, build_detector
from service.config import DEFAULT_MODEL_DIR, PROJECT_ROOT, ConfigError, Settings, usable_cpus
from service.logs import access_line
from service.model import DirectMLP, LoadedModel
from service.web import ServiceError, crop_pixels, decode_crop, prediction_json, to_inputs
from testing.images import encode, png


def test_served_inputs_are_bit_identical_to_the_training_transform(test_set):
    """A 28x28 PNG through the service's decode + lookup equals FEATURE_TRANSFORM exactly."""
    pixels = test_set.data.numpy()[:1000]
    blobs = [png(array) for array in pixels]
    served = to_inputs(blobs, "auto", 10**6)
    expected = torch.stack([FEATURE_TRANSFORM(Image.fromarray(array)) for array in pixels])
    assert served.dtype == torch.float32 and served.shape == (1000, 1, 28, 28)
    assert torch.equal(served, expected)


def test_input_table_is_pixels_to_input_per_value():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert np.array_equal(INPUT_TABLE, pixels_to_input(values).flatten().numpy())


def test_settings_defaults():
    settings = Settings.from_env({})
    assert settings.model_dir == DEFAULT_MODEL_DIR == PROJECT_ROOT / "models"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.workers == usable_cpus()
    assert settings.torch_threads == max(1, usable_cpus() // settings.workers)
    assert settings.device in ("cpu", "cuda")
    assert settings.max_batch == 64 and settings.max_upload_bytes == 16 * 1024 * 1024


def test_settings_from_values(tmp_path):
    settings = Settings.from_env(
        {
            "MODEL_DIR": str(tmp_path),
            "PORT": "9000",
            "WORKERS": "3",
            "DEVICE": "cpu",
            "MAX_BATCH": "8",
            "TORCH_THREADS": "2",
            "RELOAD_INTERVAL": "0",
            "ACCESS_LOG": "false",
            "HOST": "0.0.0.0",
        }
    )
    assert settings.model_dir == tmp_path and settings.port == 9000 and settings.workers == 3
    assert settings.device == "cpu" and settings.max_batch == 8 and settings.torch_threads == 2
    assert settings.reload_interval == 0 and settings.access_log is False and settings.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"PORT": "0"}, "PORT='0': must be at least 1"),
        ({"PORT": "1.5"}, "PORT='1.5': '1.5' is not an integer"),
        ({"DEVICE": "gpu"}, "DEVICE='gpu' is not one of auto, cpu, cuda"),
        ({"MAX_UPLOAD_BYTES": "10"}, "MAX_UPLOAD_BYTES='10': must be at least"),
        ({"RELOAD_INTERVAL": "-1"}, "RELOAD_INTERVAL='-1': must be a finite number at least 0"),
        ({"RELOAD_INTERVAL": "inf"}, "RELOAD_INTERVAL='inf': must be a finite number"),
        ({"HOST": "bad host"}, "HOST="),
    ],
)
def test_settings_refuse_bad_values(environ, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(environ)


def test_model_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        Settings.from_env({"MODEL_DIR": str(path)})


# --------------------------------------------------------------------------- hot-path pieces


@pytest.mark.parametrize("invert", INVERT_MODES)
def test_crop_fast_path_gives_the_general_pipelines_pixels(test_set, invert):
    for array in test_set.data.numpy()[:300]:
        image = decode_image(png(array))
        assert crop_pixels(image, invert) == to_fashion_mnist(decode_image(png(array)), invert).tobytes()
    light = decode_image(png(255 - test_set.data.numpy()[0]))  # a dark garment on white: auto inverts it
    assert crop_pixels(light, "auto") == to_fashion_mnist(light, "auto").tobytes()


def test_crop_decoder_gives_pillows_pixels_and_leaves_every_other_png_to_it(test_set):
    for array in test_set.data.numpy()[:300]:
        blob = png(array)
        assert decode_crop(blob).tobytes() == decode_image(blob).tobytes() == array.tobytes()
    blob = png(test_set.data.numpy()[0])
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "hello")
    header = blob[12:28] + b"\x01"  # IHDR with interlace method 1 (Adam7), and its CRC
    interlaced_header = blob[:12] + header + zlib.crc32(header).to_bytes(4, "big") + blob[33:]
    broken_crc = bytearray(blob)
    broken_crc[40] ^= 0xFF  # inside the IDAT data
    others = {
        "text chunk": encode(Image.fromarray(test_set.data.numpy()[0]), pnginfo=text),
        "interlaced": interlaced_header,
        "16-bit": encode(Image.fromarray(test_set.data.numpy()[0].astype(np.uint16) * 257)),
        "29 wide": png(np.zeros((28, 29), np.uint8)),
        "broken CRC": bytes(broken_crc),
        "truncated": blob[: len(blob) - 20],
        "no IEND": blob[:-12],
    }
    for name, other in others.items():
        assert decode_crop(other) is None, name
    # What the general path makes of them (pixels or a refusal) is what the service answers.
    for name, other in others.items():
        try:
            general = canvases_to_input([to_fashion_mnist(decode_image(other, 10**6), "auto")])
        except ImageError as error:
            general = (error.status, error.code)
        try:
            served = to_inputs([other], "auto", 10**6)
        except ServiceError as error:
            served = (error.status, error.code)
        assert type(served) is type(general), name
        assert served == general if isinstance(served, tuple) else torch.equal(served, general), name


def test_crop_fast_path_leaves_other_images_to_the_general_pipeline():
    gray = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28).astype(np.uint8)
    rgb = encode(Image.fromarray(np.stack([gray] * 3, axis=-1)))
    larger = png(gray.repeat(2, axis=0))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate; only the general path applies it
    rotated = encode(Image.fromarray(gray), exif=exif.tobytes())
    jpeg = encode(Image.fromarray(gray), "JPEG")
    for blob in (rgb, larger, rotated, jpeg):
        assert crop_pixels(decode_image(blob), "auto") is None
    served = to_inputs([rotated], "false", 10**6)
    expected = canvases_to_input([to_fashion_mnist(decode_image(rotated), "false")])
    assert torch.equal(served, expected) and not torch.equal(served, to_inputs([png(gray)], "false", 10**6))


@pytest.mark.parametrize("top_k", [0, 1, 3, 10])
def test_prediction_json_is_the_documented_object(top_k):
    probabilities = torch.softmax(torch.randn(NUM_CLASSES), dim=0).tolist()
    best = max(range(NUM_CLASSES), key=probabilities.__getitem__)
    expected = {
        "label": CLASS_NAMES[best],
        "class_id": best,
        "confidence": probabilities[best],
        "probabilities": dict(zip(CLASS_NAMES, probabilities, strict=True)),
    }
    if top_k:
        order = sorted(range(NUM_CLASSES), key=probabilities.__getitem__, reverse=True)[:top_k]
        expected["top_k"] = [{"label": CLASS_NAMES[i], "class_id": i, "probability": probabilities[i]} for i in order]
    text, class_id = prediction_json(probabilities, top_k, ',"model":{"name":"m"}')
    assert class_id == best
    assert text == json.dumps({**expected, "model": {"name": "m"}}, separators=(",", ":"))


def test_access_line_is_the_log_formats_json_and_escapes_client_text():
    line = access_line('id"1', "POST", '/predict"\n{"forged":1}', 200, 1.5, ["Bag", "Coat"], "x", "ab" * 16)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    entry = json.loads(line)
    assert entry["logger"] == "service.access" and entry["level"] == "info" and entry["message"] == "request"
    assert entry["path"] == '/predict"\n{"forged":1}' and entry["request_id"] == 'id"1'
    assert (entry["status"], entry["latency_ms"], entry["label"]) == (200, 1.5, ["Bag", "Coat"])
    assert (entry["error"], entry["trace_id"]) == ("x", "ab" * 16)
    assert "error" not in json.loads(access_line("r", "GET", "/", 200, 0.1, None))


def test_plain_crops_keep_the_request_budget(test_set, tmp_path):
    """The crop fast path counts its 784 pixels per image against MAX_REQUEST_PIXELS and stops at
    REQUEST_DEADLINE like the general path, and refuses with the general path's words."""
    from service.app import create_app

    app = create_app({"MODEL_DIR": str(tmp_path), "MAX_REQUEST_PIXELS": "1000", "ACCESS_LOG": "false"})
    crops = [png(array) for array in test_set.data.numpy()[:2]]
    with app.test_request_context("/predict", method="POST"):
        assert to_inputs(crops[:1], "auto", 10**6).shape == (1, 1, 28, 28)  # 784 pixels: within
        with pytest.raises(ServiceError) as refused:
            to_inputs(crops, "auto", 10**6)  # 1,568 pixels
    assert (refused.value.status, refused.value.code) == (413, "request_too_large")
    assert "MAX_REQUEST_PIXELS" in refused.value.message
    app = create_app({"MODEL_DIR": str(tmp_path), "REQUEST_DEADLINE": "0.1", "ACCESS_LOG": "false"})
    with app.test_request_context("/predict", method="POST"):
        request.started -= 1.0  # the request began a second ago: past its deadline
        with pytest.raises(ServiceError) as refused:
            to_inputs(crops, "auto", 10**6)
    assert (refused.value.status, refused.value.code) == (503, "deadline_exceeded")


# --------------------------------------------------------------------------- the served forward pass


@pytest.mark.parametrize(
    "hidden_sizes",
    [(256, 256), (512, 512), (16,), ()],
    ids=["bundled-shape", "first-default-shape", "one-hidden", "no-hidden"],
)
def test_direct_forward_gives_the_modules_logits_bit_for_bit(hidden_sizes, test_set):
    """The service's DirectMLP against the modules themselves, on real images at batch sizes 1 to 64:
    the same numbers, not close ones, and the same verdicts through LoadedModel.predict."""
    torch.manual_seed(0)
    if hidden_sizes:
        model = build_model(ModelConfig(hidden_sizes=hidden_sizes, dropout=0.2)).eval()
    else:  # Flatten, Linear(784, 10): no ReLU at all
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    judge = Judge(TrustConfig(temperature=1.5, detector_hidden=64, ood_threshold=0.0), build_detector(64))
    direct = DirectMLP.of(model)
    assert direct is not None
    inputs = test_set.inputs[:64]
    with torch.inference_mode():
        for size in (1, 2, 7, 64):
            assert torch.equal(direct(inputs[:size]), model(inputs[:size]))
        card = {"weights": {"sha256": "0" * 64}}
        loaded = LoadedModel(model=model, card=card, device=torch.device("cpu"), signature=None, judge=judge)
        assert loaded.direct is not None
        verdicts = loaded.predict(inputs[:5])
        expected = judge.judge(inputs[:5], model(inputs[:5]))
    assert torch.equal(verdicts.probabilities, expected.probabilities)
    assert verdicts.calibrated == expected.calibrated and verdicts.reasons == expected.reasons


def test_direct_forward_leaves_other_models_to_their_modules():
    """A CNN, a model in training mode or one that is not Flatten then Linear/ReLU is not a DirectMLP."""
    nn = torch.nn
    assert DirectMLP.of(build_model(ModelConfig(kind="cnn", channels=(4, 8), hidden_sizes=(8,))).eval()) is None
    assert DirectMLP.of(build_model(ModelConfig(hidden_sizes=(8,))).train()) is None
    assert DirectMLP.of(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU())) is None
    assert DirectMLP.of(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Sigmoid(), nn.Linear(8, 10))) is None
