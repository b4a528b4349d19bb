"""The Flask application: POST /predict, health and readiness probes, the model card, a web page.

``create_app(test_config=None)`` builds one app with its own ``ModelRunner`` (see
``service.model``), found again with ``runner_of(app)``. ``test_config`` maps environment
variable names (the README's table) to values that override the environment. The request
steps and the error form are in ``service.web``; the v2 protocol, metrics and API documents
register their own routes here, at the top of the factory. The commonest predictions are answered
in front of Flask by ``service.fast_path``, with the same steps and traces.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch
from flask import Flask, Request, Response, request, send_from_directory
from PIL import Image
from werkzeug.exceptions import HTTPException

from service import metrics, openapi, v2_routes
from service.config import Settings
from service.fast_path import STARTED_KEY, FastPath
from service.logs import access_line, configure_logging, write_line
from service.model import ModelRunner
from service.web import (
    HTTP_CODES,
    ServiceError,
    error_response,
    json_response,
    json_text_response,
    parse_options,
    predictions_json,
    read_images,
    request_id_from,
    to_inputs,
)

log = logging.getLogger(__name__)

# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; its trace id is logged.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


class ServiceRequest(Request):
    """A request that knows when it started, and carries what its log line and metrics report."""

    label: str | list[str] | None = None  # the predicted label(s), set by the prediction routes
    error_code: str | None = None  # set by service.web.error_response

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A request the fast path handed on started there (service.fast_path).
        self.started = self.environ.get(STARTED_KEY) or time.perf_counter()

    @cached_property
    def request_id(self) -> str:
        """The request's id (``request_id_from``)."""
        return request_id_from(self.headers.get("X-Request-ID"))


class ServiceFlask(Flask):
    request_class = ServiceRequest

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_functions: dict[Callable, Callable] = {}

    def ensure_sync(self, func: Callable) -> Callable:
        """Flask's check for async views and hooks, asked once per function instead of on every call
        (inspect's coroutine test was a visible share of a request's time)."""
        try:
            return self._sync_functions[func]
        except KeyError:
            sync = self._sync_functions[func] = super().ensure_sync(func)
            return sync
        except TypeError:  # an unhashable callable: ask every time
            return super().ensure_sync(func)


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Build the service: settings from the environment (overridden by test_config), model, routes."""
    settings = Settings.from_env({**os.environ, **(test_config or {})})
    configure_logging()
    if torch.get_num_threads() != settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    app = ServiceFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["SETTINGS"] = settings
    policy = settings.probe_policy
    runner = ModelRunner(settings.model_dir, settings.device, settings.reload_interval, policy, settings.model_version)
    app.extensions["model_runner"] = runner

    service_metrics = metrics.register(app)
    v2_routes.register(app)
    recorder = RequestRecorder(settings, service_metrics, runner)
    register_request_hook(app, recorder)
    register_error_handlers(app)
    register_routes(app, settings, runner)
    # The commonest predictions are answered in front of Flask (service.fast_path); everything else reaches it.
    app.wsgi_app = FastPath(app.wsgi_app, runner, recorder, settings, app.config)  # type: ignore[method-assign]

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
        req = request._get_current_object()  # one context lookup instead of one per attribute
        top_k, invert = parse_options(req.args)
        blobs, batch = read_images(max_batch)
        verdicts = runner.predict(model, to_inputs(blobs, invert, max_pixels))
        text, req.label = predictions_json(verdicts, top_k, batch, model.identity_json)
        return json_text_response(text)

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness: a verified model is loaded and warmed up."""
        model = runner.require()
        answer = {"status": "ready", "model": {"name": model.card.get("name"), "version": model.version}}
        warning = runner.warning
        if warning is not None:
            # Still 200: the previous model serves on; the warning is for the operator, not the balancer.
            answer["warning"] = warning
        return json_response(answer)

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
                # This model's probe scores when it was accepted, and the rule it passed.
                "validation": {**(model.validation or {}), "policy": runner.policy.describe()},
                "pinned": runner.pin,
                # The last refused candidate (null when the newest model in MODEL_DIR is the one served).
                "candidate": runner.candidate,
            }
        )

    @app.get("/")
    def index() -> Response:
        """The web page for trying the model in a browser."""
        return send_from_directory(app.static_folder, "index.html", max_age=0)


class RequestRecorder:
    """What every answer leaves behind: the request's metrics and, with ACCESS_LOG on, its access line.

    Called by Flask's after-request hook and by the fast path (service.fast_path), which must
    leave the same traces."""

    def __init__(self, settings: Settings, observed: metrics.Metrics, runner: ModelRunner) -> None:
        self.log_requests = settings.access_log
        self.observe_request, self.observe_model = observed.observe_request, observed.observe_model
        self.runner = runner

    def record(
        self,
        endpoint: str,
        method: str,
        path: str,
        status: int,
        seconds: float,
        request_id: str,
        label: str | list[str] | None,
        error_code: str | None,
        traceparent: str | None,
    ) -> None:
        """Count and time the request under ``endpoint`` (its URL rule), then write its access line."""
        self.observe_request(endpoint, method, status, seconds)
        self.observe_model(self.runner.current)
        if self.log_requests:
            match = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
            write_line(
                access_line(
                    request_id,
                    method,
                    path,
                    status,
                    round(seconds * 1000, 3),
                    label,
                    error_code,
                    match.group(1) if match else None,
                )
            )


def register_request_hook(app: Flask, recorder: RequestRecorder) -> None:
    """One hook after every request Flask answers (errors included): request id, metrics, the access line."""
    perf_counter, record = time.perf_counter, recorder.record

    @app.after_request
    def finish_request(response: Response) -> Response:
        req = request._get_current_object()
        seconds = perf_counter() - req.started
        rule = req.url_rule
        rid = response.headers["X-Request-ID"] = req.request_id
        record(
            rule.rule if rule is not None else metrics.UNMATCHED,
            req.method,
            req.path,
            response.status_code,
            seconds,
            rid,
            req.label,
            req.error_code,
            req.headers.get("traceparent"),
        )
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
        if request.url_rule is None and v2_routes.is_v2_path(request.path):
            # URL routing errors under /v2 never reach the v2 blueprint's handlers; answer them in
            # the protocol's own error form, which v2 clients read.
            return v2_routes.routing_error(error)
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
            extra={"request_id": request.request_id},
            exc_info=error,
        )
        return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")
