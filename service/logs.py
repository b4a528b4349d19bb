"""One log stream in one format: every record, gunicorn's and the service's, as one JSON line on stderr.

``JsonFormatter`` writes ``ts``, ``level``, ``logger`` and ``message``, then the fields a call
passed with ``extra=`` (``log.info("request", extra={"status": 200})``), then the exception.
The gunicorn config hands ``logging_config()`` to gunicorn (``logconfig_dict``, with
``ServiceGunicornLogger`` as its ``logger_class``), which applies it in the master before any
worker forks; outside gunicorn (``flask run``, a script) ``create_app`` applies it when nothing
else configured logging. Loggers are named after their modules
(``service.app``, ``service.model``, ...) and propagate to the root's one handler.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from json.encoder import encode_basestring_ascii as json_string  # json.dumps' own C string encoder

from gunicorn.glogging import Logger as GunicornLogger

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record -> one JSON object: ts, level, logger, message, the ``extra`` fields, the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def logging_config(level: str = "info") -> dict:
    """The ``logging.config.dictConfig`` schema: one JSON handler on the root, gunicorn's loggers into it."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            # No handlers of their own: they propagate to the root's, so the format is the same.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }


class ServiceGunicornLogger(GunicornLogger):
    """gunicorn's logger, minus its access line: the app writes its own (with the request id and label).

    gunicorn builds an access line for every request whenever ``logconfig_dict`` is set, even
    with ``accesslog = None``; this keeps ``accesslog`` the one switch for it."""

    def access(self, resp, req, environ, request_time) -> None:
        if self.cfg.accesslog is not None:
            super().access(resp, req, environ, request_time)


def access_line(
    request_id: str,
    method: str,
    path: str,
    status: int,
    latency_ms: float,
    label: str | list[str] | None,
    error: str | None = None,
    trace_id: str | None = None,
) -> bytes:
    """One request's log line, as JsonFormatter writes a ``service.access`` record with these fields.

    Built directly: a LogRecord, a dict and json.dumps per request cost several times more, on
    every request. Strings from the client (method, path, request id) are JSON-escaped."""
    if label is None:
        label_json = "null"
    elif isinstance(label, str):
        label_json = json_string(label)
    else:
        label_json = json.dumps(label, separators=(",", ":"))
    line = (
        f'{{"ts":{round(time.time(), 3)!r},"level":"info","logger":"service.access","message":"request",'
        f'"request_id":{json_string(request_id)},"method":{json_string(method)},"path":{json_string(path)},'
        f'"status":{status},"latency_ms":{latency_ms!r},"label":{label_json}'
    )
    if error is not None:
        line += f',"error":{json_string(error)}'
    if trace_id is not None:
        line += f',"trace_id":{json_string(trace_id)}'
    return f"{line}}}\n".encode()


def write_line(line: bytes, fd: int = 2) -> None:
    """Write a log line to stderr (the log's one stream) in one system call, so lines from several
    processes never interleave, without the logging module's lock and flush per record."""
    while line:
        line = line[os.write(fd, line) :]


def configure_logging() -> None:
    """Outside gunicorn: the same JSON stream, unless the process configured logging itself."""
    if not logging.getLogger().handlers:
        logging.config.dictConfig(logging_config())
