"""In-process checks of the service's pieces: settings, the input lookup table, the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fashion.contract import FEATURE_TRANSFORM, INPUT_TABLE, pixels_to_input
from service.config import DEFAULT_MODEL_DIR, PROJECT_ROOT, ConfigError, Settings, usable_cpus
from service.web import to_inputs
from testing.images import png


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
        ({"PORT": "0"}, "PORT=0 is out of range"),
        ({"PORT": "1.5"}, "PORT='1.5' is not an integer"),
        ({"DEVICE": "gpu"}, "DEVICE='gpu' is not one of auto, cpu, cuda"),
        ({"MAX_UPLOAD_BYTES": "10"}, "MAX_UPLOAD_BYTES=10 is out of range"),
        ({"RELOAD_INTERVAL": "-1"}, "RELOAD_INTERVAL=-1"),
        ({"RELOAD_INTERVAL": "inf"}, "RELOAD_INTERVAL=inf"),
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
