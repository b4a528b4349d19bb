"""The Flask application: POST /predict, health and readiness probes, the model card, a web page.

``create_app(test_config=None)`` builds one app with its own ``ModelRunner`` (see
``service.model``), found again with ``runner_of(app)``. ``test_config`` maps environment
variable names (the README's table) to values that override the environment.

A prediction request runs as small steps: ``read_images`` (HTTP body -> image bytes),
``to_inputs`` (bytes -> decoded, preprocessed, normalized batch), the model's ``predict``
and ``encode_prediction`` (probabilities -> JSON). Every refusal is a ``ServiceError`` or a
werkzeug ``HTTPException`` rendered as ``{"error": {"status", "code", "message"}}``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from flask import Flask, Response, g, request, send_from_directory
from PIL import Image
from werkzeug.exceptions import HTTPException

from fashion.contract import CLASS_NAMES, INVERT_MODES, NUM_CLASSES, canvases_to_input, to_fashion_mnist
from fashion.images import ImageError, decode_image
from service.config import Settings
from service.model import ModelRunner

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

# Raw-body content types taken as an image; the bytes are sniffed anyway (decode_image), so
# application/octet-stream is fine for clients that do not know the type.
RAW_IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class ServiceError(Exception):
    """A refusal with its HTTP status, a stable machine-readable code and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def runner_of(app: Flask) -> ModelRunner:
    """The ModelRunner that serves ``app``'s predictions."""
    return app.extensions["model_runner"]


def json_response(payload: Any, status: int = 200) -> Response:
    """Compact JSON without Flask's jsonify machinery (this is on the hot path)."""
    return Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    g.error_code = code
    return json_response({"error": {"status": status, "code": code, "message": message}}, status)


# --------------------------------------------------------------------------- request steps


def parse_options(args: Mapping[str, str]) -> tuple[int, str]:
    """Query string -> (top_k, invert), refusing values outside their range."""
    top_k = 0
    raw = args.get("top_k")
    if raw is not None:
        try:
            top_k = int(raw)
        except ValueError:
            top_k = -1
        if not 1 <= top_k <= NUM_CLASSES:
            raise ServiceError(400, "invalid_parameter", f"top_k must be an integer from 1 to {NUM_CLASSES}")
    invert = args.get("invert", "auto").lower()
    if invert not in INVERT_MODES:
        raise ServiceError(400, "invalid_parameter", f"invert must be one of {', '.join(INVERT_MODES)}")
    return top_k, invert


def read_images(max_batch: int) -> tuple[list[bytes], bool]:
    """The request body -> (image bytes, whether the client sent a batch of form fields)."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = request.files.getlist("image")
        if not files:
            raise ServiceError(400, "missing_field", "the multipart form has no 'image' field")
        if len(files) > max_batch:
            raise ServiceError(
                413, "too_many_images", f"{len(files)} images in one request; the limit is MAX_BATCH={max_batch}"
            )
        return [file.read() for file in files], len(files) > 1
    if mimetype in RAW_IMAGE_TYPES:
        return [request.get_data(cache=False)], False
    if not mimetype:
        raise ServiceError(415, "unsupported_media_type", "send an image body with an image/* Content-Type")
    raise ServiceError(
        415, "unsupported_media_type", f"Content-Type {mimetype!r} is not taken; send image/png, image/jpeg, ..."
    )


def to_inputs(blobs: list[bytes], invert: str, max_pixels: int) -> torch.Tensor:
    """Image bytes -> the normalized [N, 1, 28, 28] batch, with the shared contract's preprocessing."""
    canvases = []
    for index, blob in enumerate(blobs):
        where = f"image {index}: " if len(blobs) > 1 else ""
        try:
            image = decode_image(blob, max_pixels)
        except ImageError as error:
            raise ServiceError(error.status, error.code, f"{where}{error}") from None
        try:
            canvases.append(to_fashion_mnist(image, invert))
        except Exception as error:  # a decodable image in a layout preprocessing cannot take
            log.warning("preprocessing failed for a %s %s image: %r", image.format, image.mode, error)
            raise ServiceError(400, "invalid_image", f"{where}the image cannot be converted to grayscale") from None
    return canvases_to_input(canvases)


def encode_prediction(probabilities: list[float], top_k: int) -> dict:
    """One row of probabilities -> label, class id, confidence, all probabilities, optional top_k."""
    class_id = max(range(NUM_CLASSES), key=probabilities.__getitem__)
    answer = {
        "label": CLASS_NAMES[class_id],
        "class_id": class_id,
        "confidence": probabilities[class_id],
        "probabilities": dict(zip(CLASS_NAMES, probabilities, strict=True)),
    }
    if top_k:
        order = sorted(range(NUM_CLASSES), key=probabilities.__getitem__, reverse=True)[:top_k]
        answer["top_k"] = [{"label": CLASS_NAMES[i], "class_id": i, "probability": probabilities[i]} for i in order]
    return answer


# --------------------------------------------------------------------------- the app


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Build the service: settings from the environment (overridden by test_config), model, routes."""
    settings = Settings.from_env({**os.environ, **(test_config or {})})
    configure_logging()
    if torch.get_num_threads() != settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["SETTINGS"] = settings
    runner = ModelRunner(settings.model_dir, settings.device, settings.reload_interval)
    runner.maybe_reload()
    warm_up_decoding(settings.max_image_pixels)
    app.extensions["model_runner"] = runner

    register_request_hooks(app, settings)
    register_error_handlers(app)
    register_routes(app, settings, runner)
    # /metrics and its request hooks, the v2 protocol, /openapi.json, /docs. Imported here: the v2
    # protocol reuses this module's request steps (to_inputs, json_response, runner_of).
    from service.interop import register_interop

    register_interop(app)
    return app


def warm_up_decoding(max_pixels: int) -> None:
    """Decode and preprocess one small image, so Pillow's plugin registry is built before the first request."""
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 255).save(buffer, "PNG")
    to_inputs([buffer.getvalue()], "auto", max_pixels)


def register_routes(app: Flask, settings: Settings, runner: ModelRunner) -> None:
    max_batch, max_pixels = settings.max_batch, settings.max_image_pixels

    def serving_model():
        """The verified model to answer with (a newer one if it just landed), or a 503 saying why not."""
        runner.maybe_reload()
        model = runner.current
        if model is None:
            raise ServiceError(503, "model_not_ready", runner.reason)
        return model

    @app.post("/predict")
    def predict() -> Response:
        """Posted image(s) -> class probabilities and label(s)."""
        model = serving_model()
        top_k, invert = parse_options(request.args)
        blobs, batch = read_images(max_batch)
        # Through the metrics (service/metrics.py): inference time, batch size, classes, confidence.
        rows = app.extensions["metrics"].predict(model, to_inputs(blobs, invert, max_pixels)).tolist()
        answers = [encode_prediction(row, top_k) for row in rows]
        model_info = {"name": model.card.get("name"), "version": model.version, "sha256": model.sha256}
        if batch:
            g.label = [answer["label"] for answer in answers]
            return json_response({"predictions": answers, "model": model_info})
        g.label = answers[0]["label"]
        answers[0]["model"] = model_info
        return json_response(answers[0])

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: a verified model is loaded and warmed up."""
        model = serving_model()
        return json_response({"status": "ready", "model": {"name": model.card.get("name"), "version": model.version}})

    @app.get("/model")
    def model_card() -> Response:
        """The model card of the served model, plus where and how it runs."""
        model = serving_model()
        return json_response(
            {
                **model.card,
                "version": model.version,
                "sha256": model.sha256,
                "device": str(model.device),
                "torch_version": torch.__version__,
                "limits": {"max_batch": max_batch, "max_upload_bytes": settings.max_upload_bytes},
            }
        )

    @app.get("/")
    def index() -> Response:
        """The web page for trying the model in a browser."""
        return send_from_directory(app.static_folder, "index.html", max_age=0)


def register_request_hooks(app: Flask, settings: Settings) -> None:
    log_requests = settings.access_log

    @app.before_request
    def start_request() -> None:
        g.started = time.perf_counter()
        rid = request.headers.get("X-Request-ID", "")
        # Echo a client's id only when it is short and plain, so it cannot forge log lines.
        if not rid or len(rid) > 128 or not _REQUEST_ID_CHARS.issuperset(rid):
            rid = os.urandom(8).hex()
        g.request_id = rid

    @app.after_request
    def finish_request(response: Response) -> Response:
        rid = g.get("request_id") or os.urandom(8).hex()
        response.headers["X-Request-ID"] = rid
        if log_requests:
            started = g.get("started")
            entry = {
                "ts": round(time.time(), 3),
                "request_id": rid,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3) if started else None,
                "label": g.get("label"),
            }
            if "error_code" in g:
                entry["error"] = g.error_code
            access_log.info(entry)
        return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError) -> Response:
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"the request body is larger than MAX_UPLOAD_BYTES={limit} bytes"
        else:
            message = error.description or error.name
        response = error_response(status, HTTP_CODES.get(status, error.name.lower().replace(" ", "_")), message)
        if status == 405 and error.get_headers():
            response.headers["Allow"] = dict(error.get_headers()).get("Allow", "")
        return response

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        # The cause goes to the log (with the request id), never to the client.
        log.error(
            "unhandled error in %s %s (request %s)", request.method, request.path, g.get("request_id"), exc_info=error
        )
        return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: access entries as they are, other records as ts/level/logger/message."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            return json.dumps(record.msg, separators=(",", ":"))
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging() -> None:
    """Send the service's logs to stderr as JSON lines (once per process)."""
    logger = logging.getLogger("service")
    if any(getattr(h, "_fashion_json", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._fashion_json = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
