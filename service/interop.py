"""Interop with the wider model-serving world: Prometheus metrics, Open Inference Protocol v2, OpenAPI.

``register_interop(app)`` is the one call ``create_app`` makes; it adds (see each module):

- ``service.metrics``: ``GET /metrics`` and the request hooks that count and time requests;
- ``service.v2``: the KServe/Triton v2 REST endpoints under ``/v2``;
- ``service.openapi``: ``GET /openapi.json`` and ``GET /docs``.
"""

from __future__ import annotations

from flask import Flask

from service import metrics, openapi, v2


def register_interop(app: Flask) -> None:
    """Add metrics (first, so its hooks time everything), the v2 protocol and the API documents."""
    metrics.register(app)
    v2.register(app)
    openapi.register(app)
