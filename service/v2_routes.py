"""The Open Inference Protocol v2 routes under ``/v2``: the codec (``service.v2``) glued to the model runner."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from fashion.checkpoint import MODEL_NAME
from fashion.contract import CLASS_NAMES, INVERT_MODES
from service.v2 import (
    HEADER_LENGTH,
    InferRequest,
    V2Error,
    encode_response,
    model_batch,
    model_metadata,
    output_tensors,
    package_version,
    parse_infer_request,
    select_outputs,
    server_metadata,
)
from service.web import Budget, ServiceError, json_response, runner_of

if TYPE_CHECKING:
    from service.config import Settings
    from service.model import LoadedModel, ModelRunner


def _error(message: str, status: int = 400) -> Response:
    return json_response({"error": message}, status)


def _served_model(name: str, version: str | None):
    """The model a v2 URL names -> the served LoadedModel; V2Error for another name or version."""
    try:
        model = runner_of(current_app).require()
    except ServiceError as error:  # nothing to serve: only the default name can be "not ready"
        if name != MODEL_NAME:
            raise V2Error(f"unknown model '{name}'; this server serves '{MODEL_NAME}'") from None
        raise V2Error(f"model '{name}' is not ready: {error.message}", status=error.status) from None
    served_name = model.card.get("name")
    if name != served_name:
        raise V2Error(f"unknown model '{name}'; this server serves '{served_name}'")
    if version is not None and version != model.version:
        raise V2Error(f"unknown version '{version}' of model '{name}'; the served version is '{model.version}'")
    return model


def create_blueprint() -> Blueprint:
    """The v2 routes; the app must hold its ModelRunner in ``extensions`` (create_app puts it there)."""
    bp = Blueprint("v2", __name__, url_prefix="/v2")
    server_version = package_version()

    @bp.errorhandler(V2Error)
    def v2_error(error: V2Error) -> Response:
        return _error(error.message, error.status)

    @bp.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if error.code == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            return _error(f"the request body is larger than MAX_UPLOAD_BYTES={limit} bytes", 413)
        return _error(error.description or error.name, error.code or 400)

    @bp.get("")
    def metadata() -> Response:
        """Server metadata: name, version, supported extensions."""
        return json_response(server_metadata(server_version))

    @bp.get("/health/live")
    def live() -> Response:
        """Server liveness: the process answers."""
        return json_response({"live": True})

    @bp.get("/health/ready")
    def ready() -> Response:
        """Server readiness: the model is loaded and warmed up (503 otherwise)."""
        try:
            runner_of(current_app).require()
            is_ready = True
        except ServiceError:
            is_ready = False
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    @bp.get("/models/<name>")
    @bp.get("/models/<name>/versions/<version>")
    def model_info(name: str, version: str | None = None) -> Response:
        """Model metadata: platform, versions, input and output tensors."""
        model = _served_model(name, version)
        return json_response(model_metadata(name, model.version))

    @bp.get("/models/<name>/ready")
    @bp.get("/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        """Model readiness: 200 when it can serve, 503 while it cannot."""
        _served_model(name, version)
        return json_response({"name": name, "ready": True})

    @bp.post("/models/<name>/infer")
    @bp.post("/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str | None = None) -> Response:
        """Inference: JSON and/or binary input tensors -> output tensors."""
        model = _served_model(name, version)
        answer = infer_answer(runner_of(current_app), model, name, decode_request(), current_app.config["SETTINGS"])
        request.label = answer.label  # for the app's access log line
        return encode_http(answer.body, answer.header_length)

    return bp


@dataclass(frozen=True)
class InferAnswer:
    body: bytes
    header_length: int | None  # the JSON header's length when binary data follows it, else None
    label: str | list[str]  # the predicted label, or one per image of a batch


def infer_answer(
    runner: ModelRunner,
    model: LoadedModel,
    name: str,
    infer_request: InferRequest,
    settings: Settings,
    budget: Budget | None = None,
) -> InferAnswer:
    """A parsed inference request to ``model`` (served as ``name``) -> its answer, images decoded
    within ``budget`` (the Flask request's when None); every V2Error is raised before the forward
    pass, so a refused request leaves no trace in the metrics."""
    invert = infer_request.parameters.get("invert", "auto")
    if invert not in INVERT_MODES:
        raise V2Error(f"parameter 'invert' must be one of {', '.join(INVERT_MODES)}")
    outputs = select_outputs(infer_request)
    batch = model_batch(infer_request, settings.max_batch, settings.max_image_pixels, invert, budget)
    verdicts = runner.predict(model, batch)
    probabilities = verdicts.probabilities.numpy()
    uncertain = np.array([reason is not None for reason in verdicts.reasons], dtype=bool)
    labels = [CLASS_NAMES[i] for i in probabilities.argmax(axis=1).tolist()]
    body, header_length = encode_response(
        output_tensors(probabilities, outputs, uncertain), name, model.version, infer_request.id
    )
    return InferAnswer(body, header_length, labels[0] if len(labels) == 1 else labels)


def decode_request() -> InferRequest:
    """The HTTP request -> InferRequest (body, compressed or not, limited by MAX_CONTENT_LENGTH)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    body = request.get_data(cache=False)
    if encoding in ("gzip", "deflate"):  # tritonclient's request_compression_algorithm
        body = decompress(body, encoding, current_app.config.get("MAX_CONTENT_LENGTH") or 16 * 1024 * 1024)
    elif encoding not in ("", "identity"):
        raise V2Error(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity", 415)
    return parse_infer_request(body, request.headers.get(HEADER_LENGTH))


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) body -> its bytes, refusing more than ``limit`` (a zip bomb) before inflating it."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise V2Error(f"the {encoding} body cannot be decompressed: {error}") from None
    if len(data) > limit:
        raise V2Error(f"the body decompresses to more than MAX_UPLOAD_BYTES={limit} bytes", 413)
    if not inflater.eof:
        raise V2Error(f"the {encoding} body is truncated")
    return data


def encode_http(body: bytes, header_length: int | None) -> Response:
    """Encoded body -> the HTTP response (octet-stream with the JSON length when binary data follows)."""
    if header_length is None:
        return Response(body, mimetype="application/json")
    response = Response(body, mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(header_length)
    return response


def register(app: Flask) -> None:
    """Add the v2 routes (the app answers unknown /v2 URLs with ``routing_error``)."""
    app.register_blueprint(create_blueprint())


def routing_error(error: HTTPException) -> Response:
    """A 404 or 405 from URL routing under /v2, in the protocol's error form."""
    if error.code == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    elif error.code == 404:
        message = f"no such endpoint: {request.path}"
    else:
        message = error.description or error.name
    response = _error(message, error.code or 400)
    if error.code == 405:
        response.headers["Allow"] = dict(error.get_headers()).get("Allow", "")
    return response


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")
