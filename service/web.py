"""The request steps every endpoint shares, and the service's error form.

A prediction request runs as small steps: ``read_images`` (HTTP body -> image bytes),
``to_inputs`` (bytes -> decoded, preprocessed, normalized batch), the model runner's
``predict`` and ``encode_prediction`` (probabilities -> JSON). Every refusal is a
``ServiceError`` or a werkzeug ``HTTPException``, rendered as
``{"error": {"status", "code", "message"}}``.

This module imports neither the app nor the routes, so ``service.app`` (POST /predict) and
``service.v2_routes`` (the v2 protocol) both build on it without an import cycle.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from flask import Flask, Response, current_app, g, has_request_context, request

from fashion.contract import CLASS_NAMES, INVERT_MODES, NUM_CLASSES, canvases_to_input, to_fashion_mnist
from fashion.images import MEDIA_TYPES, ImageError, decode_images

if TYPE_CHECKING:
    from service.model import ModelRunner

log = logging.getLogger(__name__)

# application/octet-stream is for clients that do not know the type: the bytes are sniffed anyway.
ANY_BYTES = "application/octet-stream"
# The raw-body Content-Types POST /predict takes: every format's types and aliases.
RAW_IMAGE_TYPES = frozenset({ANY_BYTES, *(media for types in MEDIA_TYPES.values() for media in types)})
# The same, one per format without the aliases: what the API documents.
DOCUMENTED_IMAGE_TYPES = (*(types[0] for types in MEDIA_TYPES.values()), ANY_BYTES)

HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


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
    g.error_code = code  # for the access log line
    return json_response({"error": {"status": status, "code": code, "message": message}}, status)


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
        415, "unsupported_media_type", f"Content-Type {mimetype!r} is not supported; send image/png, image/jpeg, ..."
    )


def request_budget() -> tuple[int | None, float | None]:
    """(MAX_REQUEST_PIXELS, the request's deadline as a time.monotonic() value); no limits outside a request."""
    if not has_request_context():
        return None, None
    settings = current_app.config["SETTINGS"]
    started = g.get("started")  # time.perf_counter() at the start of the request (service.app)
    spent = time.perf_counter() - started if started is not None else 0.0
    return settings.max_request_pixels, time.monotonic() + settings.request_deadline - spent


def to_inputs(blobs: list[bytes], invert: str, max_pixels: int) -> torch.Tensor:
    """Image bytes -> the normalized [N, 1, 28, 28] batch, with the shared contract's preprocessing.

    Within the request's budget (fashion.images.decode_images): all headers are checked against
    MAX_REQUEST_PIXELS before anything is decoded, and REQUEST_DEADLINE before each image.
    """
    max_request_pixels, deadline = request_budget()
    try:
        images = decode_images(blobs, max_pixels, max_request_pixels, deadline)
    except ImageError as error:
        where = f"image {error.index}: " if len(blobs) > 1 and error.index is not None else ""
        raise ServiceError(error.status, error.code, f"{where}{error}") from None
    canvases = []
    for index, image in enumerate(images):
        try:
            canvases.append(to_fashion_mnist(image, invert))
        except Exception as error:  # a decodable image in a layout preprocessing cannot take
            log.warning(
                "preprocessing failed",
                extra={"image_format": image.format, "image_mode": image.mode, "error": repr(error)},
            )
            where = f"image {index}: " if len(blobs) > 1 else ""
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
