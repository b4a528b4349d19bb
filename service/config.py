"""Service settings from environment variables, validated once at start.

Every variable is checked before the first request; a bad value raises ConfigError with a
message naming the variable, and the gunicorn config turns that into a clear line on stderr
and exit status 2 (instead of gunicorn restarting workers that can never boot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fashion.bounds import parse_bounded
from fashion.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS
from fashion.machine import usable_cpus
from fashion.policy import VERSION_PATTERN, ValidationPolicy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "models"
DEVICES = ("auto", "cpu", "cuda")
EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """An environment variable with a value the service cannot run with."""


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    return _bounded(environ, name, default, int, minimum=minimum, maximum=maximum)


def _float(environ: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    return _bounded(environ, name, default, float, minimum=minimum)


def _bounded(environ: Mapping[str, str], name: str, default: int | float, kind: type, **bounds) -> int | float:
    """The variable through the project's one bounded-number parser (shared with the training CLI)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_bounded(raw, kind, **bounds)
    except ValueError as error:
        raise ConfigError(f"{name}={raw!r}: {error}") from None


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


@dataclass(frozen=True)
class Settings:
    """What the service runs with; see the README's table of environment variables."""

    model_dir: Path = DEFAULT_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    device: str = "cpu"  # resolved: "cpu" or "cuda", never "auto"
    max_upload_bytes: int = 16 * 1024 * 1024
    max_batch: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    torch_threads: int = 1
    reload_interval: float = 2.0  # seconds between checks for a new model; 0 = never reload
    access_log: bool = True
    timeout: int = 30
    graceful_timeout: int = 30
    # Seconds a request may spend before it is answered 503 instead of running on until gunicorn kills
    # the worker at `timeout`; by default two thirds of it.
    request_deadline: float = 20.0
    # The probe validation a model must pass before it is served (fashion/probe.py, README "Model trust"):
    # MIN_PROBE_ACCURACY, MAX_PROBE_DROP, MIN_PROBE_AGREEMENT.
    probe_policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    # MODEL_VERSION: serve only this version (12 hex digits), from MODEL_DIR/history/ or MODEL_DIR.
    model_version: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment; raise ConfigError naming the first bad variable."""
        environ = os.environ if environ is None else environ
        raw_dir = environ.get("MODEL_DIR", "").strip()
        # A relative MODEL_DIR means relative to the working directory, like any path a user
        # types; only the default is anchored at the project root so it works from anywhere.
        model_dir = Path(raw_dir).expanduser().resolve() if raw_dir else DEFAULT_MODEL_DIR
        if model_dir.exists() and not model_dir.is_dir():
            raise ConfigError(f"MODEL_DIR={raw_dir!r} is not a directory")

        host = environ.get("HOST", "").strip() or cls.host
        if any(c.isspace() for c in host) or "/" in host:
            raise ConfigError(f"HOST={host!r} is not a host name or IP address")

        cpus = usable_cpus()
        workers = _int(environ, "WORKERS", cpus, 1, 256)
        device = environ.get("DEVICE", "").strip().lower() or "auto"
        if device not in DEVICES:
            raise ConfigError(f"DEVICE={device!r} is not one of {', '.join(DEVICES)}")
        values = dict(
            model_dir=model_dir,
            host=host,
            port=_int(environ, "PORT", cls.port, 1, 65535),
            workers=workers,
            max_upload_bytes=_int(environ, "MAX_UPLOAD_BYTES", cls.max_upload_bytes, 1024),
            max_batch=_int(environ, "MAX_BATCH", cls.max_batch, 1, 4096),
            max_image_pixels=_int(environ, "MAX_IMAGE_PIXELS", cls.max_image_pixels, 28 * 28),
            # One intra-op thread per core per worker: more threads than cores only adds contention.
            torch_threads=_int(environ, "TORCH_THREADS", max(1, cpus // workers), 1, 1024),
            reload_interval=_float(environ, "RELOAD_INTERVAL", cls.reload_interval, 0.0),
            access_log=_bool(environ, "ACCESS_LOG", cls.access_log),
            max_request_pixels=_int(environ, "MAX_REQUEST_PIXELS", cls.max_request_pixels, 28 * 28),
            timeout=_int(environ, "TIMEOUT", cls.timeout, 1, 3600),
            graceful_timeout=_int(environ, "GRACEFUL_TIMEOUT", cls.graceful_timeout, 0, 3600),
        )
        try:
            values["probe_policy"] = ValidationPolicy.from_env(environ)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        pin = environ.get("MODEL_VERSION", "").strip().lower()
        if pin and not VERSION_PATTERN.fullmatch(pin):
            raise ConfigError(
                f"MODEL_VERSION={pin!r} is not a model version (the first 12 hex digits of the weights' SHA-256, "
                "as /model and `fashion-models list` show it)"
            )
        values["model_version"] = pin or None
        values["request_deadline"] = _float(environ, "REQUEST_DEADLINE", values["timeout"] * 2 / 3, 0.1)
        if values["request_deadline"] >= values["timeout"]:
            raise ConfigError(
                f"REQUEST_DEADLINE={values['request_deadline']:g} must be below TIMEOUT={values['timeout']}: "
                "the service answers before gunicorn kills the worker"
            )
        # Last: probing for CUDA imports torch, which a typo elsewhere should not wait for.
        return cls(device=_resolve_device(device), **values)


def _resolve_device(device: str) -> str:
    """auto -> cuda when a GPU is usable, else cpu; cuda without a GPU is a configuration error."""
    if device == "cpu":
        return "cpu"
    import torch  # only here: the cpu path must not pay for CUDA probing

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ConfigError("DEVICE=cuda but no CUDA device is available (use DEVICE=auto or cpu)")
    return "cuda" if available else "cpu"
