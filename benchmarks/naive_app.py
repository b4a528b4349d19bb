"""The naive baseline for bench_serving.py: the 20-line Flask handler anyone would write first
(decode, normalize, forward, softmax, JSON), on the same gunicorn config as the product
(``benchmarks.naive_app:create_app()``, model from ``MODEL_DIR``); not part of the service."""

import io
import os

import numpy as np
import torch
from flask import Flask, jsonify, request
from PIL import Image

from fashion.checkpoint import load_checkpoint
from fashion.contract import CLASS_NAMES, MEAN, STD


def create_app(test_config=None) -> Flask:
    app = Flask(__name__)
    model, _card = load_checkpoint(os.environ.get("MODEL_DIR", "models"))
    torch.set_num_threads(1)

    @app.post("/predict")
    def predict():
        image = Image.open(io.BytesIO(request.get_data())).convert("L").resize((28, 28))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        with torch.no_grad():
            logits = model(((pixels - MEAN) / STD).reshape(1, 1, 28, 28))
        probabilities = torch.softmax(logits, dim=1)[0].tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return jsonify(
            label=CLASS_NAMES[best], class_id=best, probabilities=dict(zip(CLASS_NAMES, probabilities, strict=True))
        )

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
