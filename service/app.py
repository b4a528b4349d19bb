"""The Flask application: POST /predict, health and readiness probes, the model card, a web page.

``create_app(test_config=None)`` builds one app with its own ``ModelRunner`` (see
``service.model``), found again with ``runner_of(app)``. ``test_config`` maps environment
variable names (the README's table) to values that override the environment. The request
steps and the error form are in ``service.web``; the v2 protocol, metrics and API documents
register their own routes here, at the top of the factory.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Mapping

import torch
from flask import Flask, Response, g, request, send_from_directory
from PIL import Image
from werkzeug.exceptions import HTTPException

from service import metrics, openapi, v2_routes
from service.config import Settings
from service.logs import configure_logging
from service.model import ModelRunner
from service.web import (
    HTTP_CODES,
    ServiceError,
    encode_prediction,
    error_response,
    json_response,
    parse_options,
    read_images,
    to_inputs,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")

_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; its trace id is logged.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


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
    app.extensions["model_runner"] = runner

    # Metrics first, so their hooks time everything; then the routes of the other modules.
    metrics.register(app)
    v2_routes.register(app)
    register_request_hooks(app, settings)
    register_error_handlers(app)
    register_routes(app, settings, runner)

    runner.maybe_reload()
    warm_up_decoding(settings.max_image_pixels)
    # The document names the served model, so it is built once the model is loaded.
    openapi.register(app)
    return app


def warm_up_decoding(max_pixels: int) -> None:
    """Decode and preprocess one small image, so Pillow's plugin registry is built before the first request."""
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 255).save(buffer, "PNG")
    to_inputs([buffer.getvalue()], "auto", max_pixels)


def register_routes(app: Flask, settings: Settings, runner: ModelRunner) -> None:
    max_batch, max_pixels = settings.max_batch, settings.max_image_pixels

    @app.post("/predict")
    def predict() -> Response:
        """Posted image(s) -> class probabilities and label(s)."""
        model = runner.require()
        top_k, invert = parse_options(request.args)
        blobs, batch = read_images(max_batch)
        rows = runner.predict(model, to_inputs(blobs, invert, max_pixels)).tolist()
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
        model = runner.require()
        return json_response({"status": "ready", "model": {"name": model.card.get("name"), "version": model.version}})

    @app.get("/model")
    def model_card() -> Response:
        """The model card of the served model, plus where and how it runs."""
        model = runner.require()
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
        traceparent = request.headers.get("traceparent")
        if traceparent:
            match = _TRACEPARENT.fullmatch(traceparent.strip())
            if match:
                g.trace_id = match.group(1)

    @app.after_request
    def finish_request(response: Response) -> Response:
        rid = g.get("request_id") or os.urandom(8).hex()
        response.headers["X-Request-ID"] = rid
        if log_requests:
            started = g.get("started")
            entry = {
                "request_id": rid,
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3) if started else None,
                "label": g.get("label"),
            }
            if "error_code" in g:
                entry["error"] = g.error_code
            if "trace_id" in g:
                entry["trace_id"] = g.trace_id
            access_log.info("request", extra=entry)
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
            "unhandled error in %s %s",
            request.method,
            request.path,
            extra={"request_id": g.get("request_id")},
            exc_info=error,
        )
        return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")
