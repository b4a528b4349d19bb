"""POST /predict of one plain Fashion-MNIST crop, answered in front of Flask.

Most predictions are one 28x28 grayscale PNG posted as the body, with no options. For such a
request Flask's request and response objects, routing, context stack and header handling cost
more than decoding, the model and the JSON together (``bench_serving.py --stages`` in the
README). ``PlainCropFastPath`` wraps the Flask app's WSGI callable (``app.wsgi_app``, Flask's own
place for middleware) and answers that one shape itself, with the same steps Flask's route takes
(``plain_crop_inputs``, the runner's ``predict``, ``prediction_json``) and the same traces
(``RequestRecorder``: metrics, access line, request id): the same bytes, status and headers, which
a test compares request by request.

Everything else goes to Flask untouched: other paths and methods, a query string, a Content-Type
that is not exactly one of the raw image types, a missing or too large Content-Length, and any
body that is not a plain crop. Those the path has read are handed to Flask as the body, so Flask
sees the request the client sent and answers it, refusals included, as it always has.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fashion.contract import CLASS_NAMES
from service.web import RAW_IMAGE_TYPES, plain_crop_inputs, prediction_json, request_id_from, verdict_json

if TYPE_CHECKING:
    from service.app import RequestRecorder
    from service.config import Settings
    from service.model import ModelRunner

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class PlainCropFastPath:
    """WSGI middleware: a single plain-crop POST /predict answered here, anything else by ``flask``."""

    def __init__(self, flask: WSGIApp, runner: ModelRunner, recorder: RequestRecorder, settings: Settings) -> None:
        self.flask = flask
        self.runner, self.record = runner, recorder.record
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_request_pixels, self.request_deadline = settings.max_request_pixels, settings.request_deadline

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if not self.takes(environ):
            return self.flask(environ, start_response)
        started = time.perf_counter()
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        answer = self.answer(body, time.monotonic() + self.request_deadline)
        if answer is None:
            environ["wsgi.input"] = io.BytesIO(body)  # what was read, for Flask to read again
            return self.flask(environ, start_response)
        text, label = answer
        payload = text.encode()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), ("X-Request-ID", request_id)],
        )
        seconds = time.perf_counter() - started
        self.record(
            "/predict", "POST", "/predict", 200, seconds, request_id, label, None, environ.get("HTTP_TRACEPARENT")
        )
        return [payload]

    def takes(self, environ: dict[str, Any]) -> bool:
        """Whether the request has the one shape this path answers (the body still unread)."""
        length = environ.get("CONTENT_LENGTH") or ""
        return (
            environ.get("PATH_INFO") == "/predict"
            and environ.get("REQUEST_METHOD") == "POST"
            and not environ.get("QUERY_STRING")
            and environ.get("CONTENT_TYPE") in RAW_IMAGE_TYPES
            and "HTTP_TRANSFER_ENCODING" not in environ
            and length.isascii()
            and length.isdigit()
            and 0 < int(length) <= self.max_upload_bytes
        )

    def answer(self, body: bytes, deadline: float) -> tuple[str, str] | None:
        """(the JSON answer, its label) for a body that is a plain crop, when a model is ready; else None.

        ``deadline``: REQUEST_DEADLINE as a time.monotonic() value, as Flask's route keeps it."""
        inputs = plain_crop_inputs([body], "auto", self.max_request_pixels, deadline)
        if inputs is None:
            return None
        runner = self.runner
        runner.maybe_reload()
        model = runner.current
        if model is None:  # Flask says why (503 model_not_ready)
            return None
        verdicts = runner.predict(model, inputs)
        verdict = verdict_json(verdicts.calibrated[0], verdicts.reasons[0])
        text, class_id = prediction_json(
            verdicts.probabilities[0].tolist(), 0, f',"model":{model.identity_json}', verdict
        )
        return text, CLASS_NAMES[class_id]
