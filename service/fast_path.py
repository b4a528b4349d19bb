"""The commonest predictions, answered in front of Flask: plain crops to POST /predict (one raw, or
a form's batch), and v2 inference requests.

Most predictions are 28x28 grayscale PNGs posted as the body or as a form, or a v2 client's
request. For such a request Flask's request and response objects, routing, context stack and
header handling cost about as much as decoding, the model and the JSON together
(``bench_serving.py --stages`` in the README). ``FastPath`` wraps the Flask app's WSGI callable
(``app.wsgi_app``, Flask's own place for middleware) and answers those shapes itself, with the
steps Flask's routes take (``file_parts``, ``parse_options``, ``plain_crop_inputs``,
``predictions_json``; ``v2_routes.infer_answer``) and the same traces (``RequestRecorder``:
metrics, access line, request id): the same bytes, status and headers, which tests compare
request by request.

Everything else goes to Flask untouched: other paths and methods, a chunked or compressed body, a
missing or too large Content-Length; for /predict a Content-Type that is neither exactly one of the
raw image types nor a multipart form, a form in a shape ``file_parts`` leaves to werkzeug, a query
string other than plain ``top_k``/``invert`` pairs, or an image that is not a plain crop; for v2 a
query string, another model name or version, or anything the protocol refuses. A body the path has
read is handed to Flask as the body, with the time the request started, so Flask sees the request
the client sent and answers it, refusals included, as it always has.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from werkzeug.http import parse_options_header

from service.multipart import file_parts
from service.v2 import HEADER_LENGTH, V2Error, parse_infer_request
from service.v2_routes import infer_answer
from service.web import (
    IMAGE_FIELD,
    RAW_IMAGE_TYPES,
    ServiceError,
    budget_of,
    parse_options,
    plain_crop_inputs,
    predictions_json,
    request_id_from,
)

if TYPE_CHECKING:
    from service.app import RequestRecorder
    from service.config import Settings
    from service.model import LoadedModel, ModelRunner

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
# The environ key with the request's time.perf_counter() start, for a request handed on to Flask.
STARTED_KEY = "fashion.started"
# A query string of plain name=value pairs, which werkzeug's request.args reads as they are written.
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9_.=&-]*")
# Flask's URL rules of the v2 inference routes: the metrics' endpoint label.
V2_INFER_RULE = "/v2/models/<name>/infer"
V2_INFER_VERSION_RULE = "/v2/models/<name>/versions/<version>/infer"


@dataclass(frozen=True)
class Answer:
    """A 200 answer: its body and Content-Type, any other headers, and what the request's traces say."""

    payload: bytes
    content_type: str
    endpoint: str  # the URL rule Flask would have matched
    label: str | list[str]
    headers: tuple[tuple[str, str], ...] = ()


class FastPath:
    """WSGI middleware: the requests described above answered here, anything else by ``flask``."""

    def __init__(
        self, flask: WSGIApp, runner: ModelRunner, recorder: RequestRecorder, settings: Settings, config: Mapping
    ) -> None:
        self.flask = flask
        self.runner, self.record, self.settings = runner, recorder.record, settings
        self.config = config  # the Flask app's, for the form limits werkzeug's parser applies

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        handler = self.handler(environ)
        if handler is None:
            return self.flask(environ, start_response)
        started = time.perf_counter()
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        answer = handler(body, environ, started)
        if answer is None:
            environ["wsgi.input"] = io.BytesIO(body)  # what was read, for Flask to read again
            # The request's clock keeps running in Flask: its deadline and latency count this attempt.
            environ[STARTED_KEY] = started
            return self.flask(environ, start_response)
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        payload = answer.payload
        start_response(
            "200 OK",
            [
                ("Content-Type", answer.content_type),
                ("Content-Length", str(len(payload))),
                *answer.headers,
                ("X-Request-ID", request_id),
            ],
        )
        seconds = time.perf_counter() - started
        path, traceparent = environ["PATH_INFO"], environ.get("HTTP_TRACEPARENT")
        self.record(answer.endpoint, "POST", path, 200, seconds, request_id, answer.label, None, traceparent)
        return [payload]

    def handler(self, environ: dict[str, Any]) -> Callable[[bytes, dict, float], Answer | None] | None:
        """The step that may answer this request, from its method, path and headers (the body still unread)."""
        length = environ.get("CONTENT_LENGTH") or ""
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or "HTTP_TRANSFER_ENCODING" in environ
            or not (length.isascii() and length.isdigit() and 0 < int(length) <= self.settings.max_upload_bytes)
        ):
            return None
        path = environ.get("PATH_INFO", "")
        if path == "/predict":
            content_type = environ.get("CONTENT_TYPE", "")
            if content_type in RAW_IMAGE_TYPES or content_type.lower().startswith("multipart/form-data"):
                return self.predict
            return None
        if (
            path.startswith("/v2/models/")
            and path.endswith("/infer")
            and not environ.get("QUERY_STRING")
            and "HTTP_CONTENT_ENCODING" not in environ
        ):
            return self.v2_infer
        return None

    def ready_model(self) -> LoadedModel | None:
        """The model to answer with (a newer one if it just landed); None while there is none (Flask says why)."""
        self.runner.maybe_reload()
        return self.runner.current

    def predict(self, body: bytes, environ: dict[str, Any], started: float) -> Answer | None:
        """POST /predict of plain crops (``plain_crop_inputs``), one raw or a form's ``image`` fields in
        the plain shape ``file_parts`` reads: Flask's ``predict`` route, for these cases."""
        options = query_options(environ.get("QUERY_STRING", ""))
        if options is None:
            return None
        top_k, invert = options
        blobs, batch = self.images(body, environ)
        if not blobs or len(blobs) > self.settings.max_batch:  # Flask says what is wrong
            return None
        inputs = plain_crop_inputs(blobs, invert, *budget_of(self.settings, started))
        model = self.ready_model() if inputs is not None else None
        if model is None:
            return None
        text, label = predictions_json(self.runner.predict(model, inputs), top_k, batch, model.identity_json)
        return Answer(text.encode(), "application/json", "/predict", label)

    def images(self, body: bytes, environ: dict[str, Any]) -> tuple[list[bytes] | None, bool]:
        """(the image files, whether they are a batch of form fields), as ``read_images`` finds them; no
        files when the body is a form ``file_parts`` leaves to werkzeug."""
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type in RAW_IMAGE_TYPES:
            return [body], False
        mimetype, params = parse_options_header(content_type)
        if mimetype.lower() != "multipart/form-data":
            return None, False
        config = self.config
        boundary = params.get("boundary", "")
        files = file_parts(body, boundary, IMAGE_FIELD, config["MAX_FORM_PARTS"], config["MAX_FORM_MEMORY_SIZE"])
        return files, files is not None and len(files) > 1

    def v2_infer(self, body: bytes, environ: dict[str, Any], started: float) -> Answer | None:
        """v2 inference to the served model (tensors or encoded images, JSON or binary): the ``infer``
        route's ``infer_answer``, within the request's budget."""
        model = self.ready_model()
        if model is None:
            return None
        name, path = model.card.get("name"), environ["PATH_INFO"]
        if not name:  # no name to match the URL against: Flask's route decides
            return None
        if path == f"/v2/models/{name}/infer":
            endpoint = V2_INFER_RULE
        elif path == f"/v2/models/{name}/versions/{model.version}/infer":
            endpoint = V2_INFER_VERSION_RULE
        else:
            return None
        budget = budget_of(self.settings, started)
        try:
            infer_request = parse_infer_request(body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"))
            answer = infer_answer(self.runner, model, name, infer_request, self.settings, budget)
        except V2Error:
            return None
        if answer.header_length is None:
            return Answer(answer.body, "application/json", endpoint, answer.label)
        headers = ((HEADER_LENGTH, str(answer.header_length)),)
        return Answer(answer.body, "application/octet-stream", endpoint, answer.label, headers)


def query_options(query: str) -> tuple[int, str] | None:
    """(top_k, invert) from a query string of plain, distinct name=value pairs (``parse_options``);
    None for any other query string, or one ``parse_options`` refuses: Flask reads those."""
    if not _PLAIN_QUERY.fullmatch(query):
        return None
    args: dict[str, str] = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            if name in args:
                return None
            args[name] = value
    try:
        return parse_options(args)
    except ServiceError:
        return None
