"""The service on a CUDA device answers as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import requests
import torch

from fashion.contract import CLASS_NAMES
from testing.images import png

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_server_matches_cpu_server(start_gunicorn, bundled_model_dir, test_set):
    cpu = start_gunicorn(bundled_model_dir, env={"DEVICE": "cpu"})
    gpu = start_gunicorn(bundled_model_dir, env={"DEVICE": "cuda"})
    assert requests.get(gpu.url + "/model", timeout=10).json()["device"].startswith("cuda")
    assert requests.get(gpu.url + "/readyz", timeout=10).status_code == 200
    files = []
    for i in range(0, 10_000, 100):
        files.append(("image", (f"{i}.png", png(test_set.data[i].numpy()), "image/png")))
    for start in range(0, len(files), 50):
        batch = files[start : start + 50]
        on_cpu = requests.post(cpu.url + "/predict", files=batch, timeout=60).json()["predictions"]
        on_gpu = requests.post(gpu.url + "/predict", files=batch, timeout=60).json()["predictions"]
        for a, b in zip(on_cpu, on_gpu, strict=True):
            assert a["class_id"] == b["class_id"]
            for name in CLASS_NAMES:
                assert abs(a["probabilities"][name] - b["probabilities"][name]) <= 1e-4
