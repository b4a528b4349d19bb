"""The request steps every endpoint shares, and the service's error form.

A prediction request runs as small steps: ``read_images`` (HTTP body -> image bytes),
``to_inputs`` (bytes -> decoded, preprocessed, normalized batch), the model runner's
``predict`` and ``predictions_json`` (verdicts -> JSON text); ``service.fast_path`` runs the
same steps in front of Flask. Every refusal is a
``ServiceError`` or a werkzeug ``HTTPException``, rendered as
``{"error": {"status", "code", "message"}}``.

This module imports neither the app nor the routes, so ``service.app`` (POST /predict) and
``service.v2_routes`` (the v2 protocol) both build on it without an import cycle.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from flask import Flask, Response, current_app, has_request_context, request
from PIL import Image

from fashion.contract import (
    CLASS_NAMES,
    INPUT_HEIGHT,
    INPUT_WIDTH,
    INVERT_MODES,
    NUM_CLASSES,
    inverted_pixels,
    pixel_rows_to_input,
    preprocessed_row,
)
from fashion.images import MEDIA_TYPES, ImageError, decode_images
from service.multipart import file_parts

if TYPE_CHECKING:
    from fashion.trust import Verdicts
    from service.config import Settings
    from service.model import ModelRunner


# application/octet-stream is for clients that do not know the type: the bytes are sniffed anyway.
ANY_BYTES = "application/octet-stream"
# The raw-body Content-Types POST /predict takes: every format's types and aliases.
RAW_IMAGE_TYPES = frozenset({ANY_BYTES, *(media for types in MEDIA_TYPES.values() for media in types)})
# The same, one per format without the aliases: what the API documents.
DOCUMENTED_IMAGE_TYPES = (*(types[0] for types in MEDIA_TYPES.values()), ANY_BYTES)

_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")

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


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is short and plain (so it cannot forge log lines), else a new one."""
    if not header or len(header) > 128 or not _REQUEST_ID_CHARS.issuperset(header):
        return os.urandom(8).hex()
    return header


def runner_of(app: Flask) -> ModelRunner:
    """The ModelRunner that serves ``app``'s predictions."""
    return app.extensions["model_runner"]


def json_response(payload: Any, status: int = 200) -> Response:
    """Compact JSON without Flask's jsonify machinery."""
    return json_text_response(json.dumps(payload, separators=(",", ":")), status)


def json_text_response(text: str, status: int = 200) -> Response:
    """A body that is JSON text already."""
    return Response(text, status=status, mimetype="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    request.error_code = code  # for the access log line (service.app.ServiceRequest)
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


# The form field of POST /predict's images (one field per image; several make a batch).
IMAGE_FIELD = "image"


def read_images(max_batch: int) -> tuple[list[bytes], bool]:
    """The request body -> (image bytes, whether the client sent a batch of form fields)."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        # Kept after reading, so that werkzeug parses the same bytes when file_parts declines.
        body = request.get_data()
        boundary = request.mimetype_params.get("boundary", "")
        files = file_parts(body, boundary, IMAGE_FIELD, request.max_form_parts, request.max_form_memory_size)
        if files is None:
            files = [file.read() for file in request.files.getlist(IMAGE_FIELD)]
        if not files:
            raise ServiceError(400, "missing_field", "the multipart form has no 'image' field")
        if len(files) > max_batch:
            raise ServiceError(
                413, "too_many_images", f"{len(files)} images in one request; the limit is MAX_BATCH={max_batch}"
            )
        return files, len(files) > 1
    if mimetype in RAW_IMAGE_TYPES:
        return [request.get_data(cache=False)], False
    if not mimetype:
        raise ServiceError(415, "unsupported_media_type", "send an image body with an image/* Content-Type")
    raise ServiceError(
        415, "unsupported_media_type", f"Content-Type {mimetype!r} is not supported; send image/png, image/jpeg, ..."
    )


# Metadata that cannot change what the general pipeline makes of an 8-bit grayscale 28x28 PNG.
# Anything else (EXIF or XMP, which may rotate the image, above all) takes the general path.
_INERT_PNG_INFO = frozenset({"dpi", "aspect", "gamma", "srgb", "chromaticity", "transparency"})
_INERT_PNG_CHUNKS = frozenset({b"IDAT", b"IEND", b"pHYs", b"gAMA", b"sRGB", b"cHRM"})  # the same, as chunks
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR of a crop: 28x28, bit depth 8, colour type 0 (grayscale), deflate, standard filters, not interlaced.
_CROP_IHDR = b"\x00\x00\x00\x0dIHDR" + struct.pack(">IIBBBBB", INPUT_WIDTH, INPUT_HEIGHT, 8, 0, 0, 0, 0)
_CROP_PREFIX = _PNG_SIGNATURE + _CROP_IHDR  # a plain crop's first 29 bytes


def decode_crop(data: bytes) -> Image.Image | None:
    """A Fashion-MNIST crop sent as the plainest PNG (8-bit grayscale 28x28, not interlaced, no
    metadata that could change its pixels) -> its image; None for any other bytes, which take
    ``decode_images``' general path (and its refusals).

    The pixels come from Pillow's own PNG decoder (the "zip" decoder ``Image.open`` would set
    up), without the format detection and chunk machinery around it, which cost more than the
    decoding for an image this small. Every chunk's CRC is checked; anything unexpected
    (another chunk, a short or broken stream) returns None and the general path decides.
    """
    if not data.startswith(_CROP_PREFIX):
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    offset, idat = 33, []
    while True:
        if offset + 12 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if kind not in _INERT_PNG_CHUNKS or end > len(data):
            return None
        if zlib.crc32(data[offset + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat.append(data[offset + 8 : end - 4])
        offset = end
    try:
        return Image.frombytes("L", (INPUT_WIDTH, INPUT_HEIGHT), b"".join(idat), "zip", "L")
    except (ValueError, OSError):  # a short or corrupt stream: the general path says what is wrong
        return None


def crop_pixels(image: Image.Image, invert: str) -> bytes | None:
    """The 784 pixels ``to_fashion_mnist`` makes of an image that is already a Fashion-MNIST crop
    (an 8-bit grayscale 28x28 PNG without orientation metadata), without its general photo steps;
    None for any other image.

    For such an image ``to_grayscale`` is a copy, ``fit_to_canvas`` returns it as it is, and only
    the inversion remains, so the bytes are the same (tests compare both on the real test set).
    """
    if (
        image.format != "PNG"
        or image.mode != "L"
        or image.size != (INPUT_WIDTH, INPUT_HEIGHT)
        or not _INERT_PNG_INFO.issuperset(image.info)
    ):
        return None
    return inverted_pixels(image.tobytes(), INPUT_WIDTH, invert)


# (MAX_REQUEST_PIXELS, the request's deadline as a time.monotonic() value); None where there is no limit.
Budget = tuple[int | None, float | None]


def budget_of(settings: Settings, started: float | None) -> Budget:
    """A request's budget: MAX_REQUEST_PIXELS, and REQUEST_DEADLINE counted from ``started`` (its
    time.perf_counter() when it arrived; from now when None)."""
    spent = time.perf_counter() - started if started is not None else 0.0
    return settings.max_request_pixels, time.monotonic() + settings.request_deadline - spent


def request_budget() -> Budget:
    """The Flask request's budget (``budget_of``); no limits outside a request."""
    if not has_request_context():
        return None, None
    # time.perf_counter() when the request began (service.app.ServiceRequest)
    return budget_of(current_app.config["SETTINGS"], getattr(request, "started", None))


def to_inputs(blobs: list[bytes], invert: str, max_pixels: int, budget: Budget | None = None) -> torch.Tensor:
    """Image bytes -> the normalized [N, 1, 28, 28] batch, with the shared contract's preprocessing.

    Within the request's budget (fashion.images.decode_images; ``request_budget`` unless given): all
    headers are checked against MAX_REQUEST_PIXELS before anything is decoded, and REQUEST_DEADLINE
    before each image.
    """
    max_request_pixels, deadline = request_budget() if budget is None else budget
    inputs = plain_crop_inputs(blobs, invert, max_request_pixels, deadline)
    if inputs is not None:  # the common case: Fashion-MNIST crops as plain PNGs
        return inputs
    return pixel_rows_to_input(_general_rows(blobs, invert, max_pixels, max_request_pixels, deadline))


def plain_crop_inputs(
    blobs: list[bytes], invert: str, max_request_pixels: int | None, deadline: float | None
) -> torch.Tensor | None:
    """``to_inputs`` for images that are all plain crops (``decode_crop``), within the same budget;
    None when one is not, or when a budget would refuse: then the general path decides (and says why)."""
    if not all(blob.startswith(_CROP_PREFIX) for blob in blobs):
        return None
    if max_request_pixels is not None and len(blobs) * INPUT_WIDTH * INPUT_HEIGHT > max_request_pixels:
        return None
    rows = []
    for blob in blobs:
        if deadline is not None and time.monotonic() > deadline:
            return None
        crop = decode_crop(blob)
        if crop is None:
            return None
        rows.append(inverted_pixels(crop.tobytes(), INPUT_WIDTH, invert))
    return pixel_rows_to_input(rows)


def _general_rows(
    blobs: list[bytes], invert: str, max_pixels: int, max_request_pixels: int | None, deadline: float | None
) -> list[bytes]:
    """Any images -> their 784 preprocessed pixels each, through fashion.images and the contract."""
    try:
        images = decode_images(blobs, max_pixels, max_request_pixels, deadline)
    except ImageError as error:
        where = f"image {error.index}: " if len(blobs) > 1 and error.index is not None else ""
        raise ServiceError(error.status, error.code, f"{where}{error}") from None
    rows = []
    for index, image in enumerate(images):
        pixels = crop_pixels(image, invert)
        if pixels is None:
            try:
                pixels = preprocessed_row(image, invert)
            except ImageError as error:
                where = f"image {index}: " if len(blobs) > 1 else ""
                raise ServiceError(error.status, error.code, f"{where}{error}") from None
        rows.append(pixels)
    return rows


# "label":..., "probabilities":{"T-shirt/top":...}: JSON text of the class names, made once.
_LABELS_JSON = [json.dumps(name) for name in CLASS_NAMES]
_PROBABILITY_KEYS = [f"{label}:" for label in _LABELS_JSON]


def verdict_json(calibrated: float, reason: str | None) -> str:
    """``,"calibrated_confidence":c,"uncertain":false`` (or ``true,"reason":...``): how far to trust an answer."""
    if reason is None:
        return f',"calibrated_confidence":{calibrated!r},"uncertain":false'
    return f',"calibrated_confidence":{calibrated!r},"uncertain":true,"reason":"{reason}"'


def prediction_json(probabilities: list[float], top_k: int, tail: str = "", verdict: str = "") -> tuple[str, int]:
    """One row of probabilities -> (the JSON text of its answer, the class id);
    ``verdict`` (verdict_json's text) follows ``confidence``; ``tail`` (``,"name":value`` text) is
    added as the object's last members.

    The object: ``label``, ``class_id``, ``confidence`` (the label's probability), the verdict
    (``calibrated_confidence``, ``uncertain`` and, when uncertain, ``reason``), ``probabilities``
    (class name -> probability, in class order) and, with ``top_k``, the ``top_k``
    best as ``{label, class_id, probability}``. Written directly rather than built as a dict and
    serialised, in a fraction of the time; floats are written by ``repr``, as json.dumps writes
    them, so the text is what json.dumps would give (a test compares them).
    """
    class_id = max(range(NUM_CLASSES), key=probabilities.__getitem__)
    members = ",".join(map(str.__add__, _PROBABILITY_KEYS, map(repr, probabilities)))
    text = (
        f'{{"label":{_LABELS_JSON[class_id]},"class_id":{class_id},'
        f'"confidence":{probabilities[class_id]!r}{verdict},"probabilities":{{{members}}}'
    )
    if top_k:
        order = sorted(range(NUM_CLASSES), key=probabilities.__getitem__, reverse=True)[:top_k]
        ranked = ",".join(
            f'{{"label":{_LABELS_JSON[i]},"class_id":{i},"probability":{probabilities[i]!r}}}' for i in order
        )
        text += f',"top_k":[{ranked}]'
    return f"{text}{tail}}}", class_id


def predictions_json(verdicts: Verdicts, top_k: int, batch: bool, identity_json: str) -> tuple[str, str | list[str]]:
    """A batch's verdicts -> (POST /predict's JSON answer, the label or labels for the access line):
    ``{"predictions": [...], "model": ...}`` for a batch of form fields, else one answer object with
    ``model`` as its last member."""
    rows = verdicts.probabilities.tolist()
    trust = list(map(verdict_json, verdicts.calibrated, verdicts.reasons))
    if batch:
        answers = [prediction_json(row, top_k, verdict=verdict) for row, verdict in zip(rows, trust, strict=True)]
        texts = ",".join(text for text, _ in answers)
        return f'{{"predictions":[{texts}],"model":{identity_json}}}', [CLASS_NAMES[i] for _, i in answers]
    text, class_id = prediction_json(rows[0], top_k, f',"model":{identity_json}', trust[0])
    return text, CLASS_NAMES[class_id]
