"""The HTTP ceiling for bench_serving.py and bench_v2.py: a constant-JSON Flask endpoint, served by the same
gunicorn config as the product (``benchmarks.ceiling_app:create_app()``); not part of the service."""

from flask import Flask, request

ANSWER = {"label": "Ankle boot", "class_id": 9, "confidence": 1.0}


def create_app(test_config=None) -> Flask:
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        """Read the posted body like the real endpoint must, then answer a constant."""
        request.get_data()
        return ANSWER

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app
