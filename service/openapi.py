"""``GET /openapi.json`` (OpenAPI 3.0.3 of every endpoint) and ``GET /docs`` (Swagger UI, no CDN).

The document is written by hand next to the code it describes, from the same constants
(class names, tensor names, limits), and a test runs schemathesis against the live server
from it, so a response that drifts from the document fails the build.

``/docs`` is Swagger UI 4.15 from the ``swagger-ui-bundle`` wheel on PyPI, served by the app
itself: no CDN, no node build, nothing fetched from outside (the online spec validator
badge is switched off). Version 4 renders OpenAPI 3.0, hence 3.0.3 rather than 3.1.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, send_from_directory
from PIL import Image

from fashion.checkpoint import MODEL_NAME
from fashion.contract import CLASS_NAMES, INPUT_HEIGHT, INPUT_SHAPE, INPUT_WIDTH, INVERT_MODES, MEAN, NUM_CLASSES, STD
from fashion.trust import REASONS
from service import v2
from service.web import DOCUMENTED_IMAGE_TYPES, IMAGE_FIELD, runner_of

STATIC_DIR = Path(__file__).resolve().parent / "static"
SWAGGER_ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"})


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _service_error(description: str) -> dict:
    return {"description": description, "content": _json_content(_ref("Error"))}


def _v2_error(description: str) -> dict:
    return {"description": description, "content": _json_content(_ref("V2Error"))}


def _schemas() -> dict[str, Any]:
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    label = {"type": "string", "enum": list(CLASS_NAMES)}
    class_id = {"type": "integer", "minimum": 0, "maximum": NUM_CLASSES - 1}
    model_ref = {
        "type": "object",
        "required": ["name", "version", "sha256"],
        "properties": {
            "name": {"type": "string", "nullable": True},
            "version": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        "additionalProperties": False,
    }
    prediction = {
        "type": "object",
        "required": ["label", "class_id", "confidence", "calibrated_confidence", "uncertain", "probabilities"],
        "properties": {
            "label": label,
            "class_id": class_id,
            "confidence": probability,
            "calibrated_confidence": {
                **probability,
                "description": "The label's probability after temperature scaling (the card's trust section): "
                "of answers with calibrated confidence 0.8, about 80% are right.",
            },
            "uncertain": {
                "type": "boolean",
                "description": "True when the answer should not be trusted; 'reason' then says why.",
            },
            "reason": {
                "type": "string",
                "enum": list(REASONS),
                "description": "Present when uncertain: not_a_garment (the detector says the image is not "
                "clothing) or low_confidence (a garment, but the calibrated confidence is low).",
            },
            "probabilities": {
                "type": "object",
                "description": "Softmax probability of every class (they sum to 1).",
                "required": list(CLASS_NAMES),
                "properties": {name: probability for name in CLASS_NAMES},
                "additionalProperties": False,
            },
            "top_k": {
                "type": "array",
                "description": "Present with ?top_k=K: the K most probable classes, best first.",
                "minItems": 1,
                "maxItems": NUM_CLASSES,
                "items": {
                    "type": "object",
                    "required": ["label", "class_id", "probability"],
                    "properties": {"label": label, "class_id": class_id, "probability": probability},
                    "additionalProperties": False,
                },
            },
            "model": _ref("ModelRef"),
        },
        "additionalProperties": False,
    }
    parameter_value = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    parameters = {"type": "object", "additionalProperties": parameter_value}
    datatype = {"type": "string", "enum": sorted(v2.DATATYPES)}
    tensor_data = {
        "type": "array",
        "description": "Elements in row-major order, flat or nested; BYTES elements are strings "
        "(for the 'image' input: base64 of the image file).",
        "items": {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "array"}]},
    }
    tensor_metadata = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": datatype,
            "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        },
        "additionalProperties": False,
    }
    return {
        "Error": {
            "type": "object",
            "description": "Every refusal of the service's own endpoints.",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["status", "code", "message"],
                    "properties": {
                        "status": {"type": "integer", "minimum": 400, "maximum": 599},
                        "code": {"type": "string", "description": "Stable machine-readable reason."},
                        "message": {"type": "string", "description": "What is wrong, for people."},
                    },
                    "additionalProperties": False,
                }
            },
            "additionalProperties": False,
        },
        "V2Error": {
            "type": "object",
            "description": "Every refusal of the Open Inference Protocol (v2) endpoints, as the protocol defines it.",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "additionalProperties": False,
        },
        "ModelRef": model_ref,
        "Prediction": prediction,
        "BatchPrediction": {
            "type": "object",
            "required": ["predictions", "model"],
            "properties": {"predictions": {"type": "array", "items": _ref("Prediction")}, "model": _ref("ModelRef")},
            "additionalProperties": False,
        },
        "ModelCard": {
            "type": "object",
            "description": "The model card written at training time, plus how this server runs it.",
            "required": ["name", "version", "sha256", "device", "torch_version", "limits"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "sha256": {"type": "string"},
                "device": {"type": "string"},
                "torch_version": {"type": "string"},
                "limits": {
                    "type": "object",
                    "required": ["max_batch", "max_upload_bytes"],
                    "properties": {"max_batch": {"type": "integer"}, "max_upload_bytes": {"type": "integer"}},
                },
            },
            "additionalProperties": True,
        },
        "V2Parameters": parameters,
        "V2TensorData": tensor_data,
        "V2TensorMetadata": tensor_metadata,
        "V2InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": _ref("V2Parameters"),
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "datatype": datatype,
                            "parameters": _ref("V2Parameters"),
                            "data": _ref("V2TensorData"),
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": _ref("V2Parameters")},
                    },
                },
            },
        },
        "V2InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": _ref("V2Parameters"),
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"type": "string", "enum": [spec["name"] for spec in v2.MODEL_OUTPUTS]},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "datatype": {"type": "string", "enum": ["FP32", "BYTES", "BOOL"]},
                            "parameters": _ref("V2Parameters"),
                            "data": _ref("V2TensorData"),
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
        "V2ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "V2ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("V2TensorMetadata")},
            },
            "additionalProperties": False,
        },
    }


def _infer_examples() -> dict[str, Any]:
    """Two ready-to-send requests for Swagger UI's "try it out" (and schemathesis' examples phase)."""
    blank = Image.new("L", (INPUT_WIDTH, INPUT_HEIGHT), 0)
    png = io.BytesIO()
    blank.save(png, format="PNG")
    background = (0.0 - MEAN) / STD  # a black pixel after the contract's normalization
    return {
        "pixels": {
            "summary": "Normalized FP32 pixels [1,1,28,28], top-3 classification",
            "value": {
                "id": "example-1",
                "inputs": [
                    {
                        "name": v2.INPUT_TENSOR,
                        "shape": [1, *INPUT_SHAPE],
                        "datatype": "FP32",
                        "data": [background] * (INPUT_HEIGHT * INPUT_WIDTH),
                    }
                ],
                "outputs": [{"name": v2.PROBABILITIES, "parameters": {"classification": 3}}, {"name": v2.LABEL}],
            },
        },
        "image": {
            "summary": "An encoded image file (base64 PNG) in the BYTES input",
            "value": {
                "inputs": [
                    {
                        "name": v2.IMAGE_TENSOR,
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(png.getvalue()).decode()],
                    }
                ],
                "parameters": {"invert": "false"},
            },
        },
    }


def _v2_paths(model_name: str, model_version: str | None) -> dict[str, Any]:
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "example": model_name,
        "description": f"The model's name: {model_name}.",
    }
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The served model's version (first 12 hex digits of its weights' SHA-256).",
    }
    if model_version:
        version_param["example"] = model_version
    not_ready = _v2_error("The model is not loaded (yet); the message says why.")
    unknown = _v2_error("Unknown model name or version.")
    infer_body = {
        "required": True,
        "description": "An inference request. With binary tensor data, the JSON object is followed by the "
        "tensors' bytes and the Inference-Header-Content-Length header gives the JSON's length.",
        "content": {
            "application/json": {"schema": _ref("V2InferenceRequest"), "examples": _infer_examples()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    infer_responses = {
        "200": {
            "description": "Output tensors: JSON, or JSON followed by binary tensor data (octet-stream; "
            "Inference-Header-Content-Length gives the JSON's length).",
            "headers": {
                v2.HEADER_LENGTH: {
                    "description": "Length of the JSON object at the start of a binary response.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
            "content": {
                "application/json": {"schema": _ref("V2InferenceResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "400": _v2_error("Malformed request, unknown model/version/input/output, wrong datatype, shape or size."),
        "413": _v2_error("Body over MAX_UPLOAD_BYTES, batch over MAX_BATCH or an image over the pixel limit."),
        "415": _v2_error(
            "An image element in a format that is not taken, or a Content-Encoding other than gzip/deflate."
        ),
        "503": not_ready,
    }

    def model_routes(suffix: str, method: str, operation: dict) -> dict[str, Any]:
        """One operation at /v2/models/{name}<suffix> and at /v2/models/{name}/versions/{version}<suffix>."""
        versioned = {"operationId": operation["operationId"] + "Version", "parameters": [name, version_param]}
        return {
            f"/v2/models/{{name}}{suffix}": {method: {"tags": ["v2"], **operation, "parameters": [name]}},
            f"/v2/models/{{name}}/versions/{{version}}{suffix}": {method: {"tags": ["v2"], **operation, **versioned}},
        }

    metadata_op = {
        "summary": "Model metadata",
        "operationId": "v2ModelMetadata",
        "responses": {
            "200": {"description": "Inputs, outputs, platform.", "content": _json_content(_ref("V2ModelMetadata"))},
            "400": unknown,
            "503": not_ready,
        },
    }
    ready_op = {
        "summary": "Model readiness",
        "operationId": "v2ModelReady",
        "responses": {
            "200": {
                "description": "The model can serve.",
                "content": _json_content(
                    {
                        "type": "object",
                        "required": ["name", "ready"],
                        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
                        "additionalProperties": False,
                    }
                ),
            },
            "400": unknown,
            "503": not_ready,
        },
    }
    infer_op = {
        "summary": "Inference (JSON or binary tensors; classification extension)",
        "description": (
            f"Inputs: '{v2.INPUT_TENSOR}' FP32 {v2.INPUT_SHAPE_TEXT} (normalized) or '{v2.IMAGE_TENSOR}' BYTES [N] "
            f"(encoded image files; base64 strings in JSON). Outputs: '{v2.PROBABILITIES}' FP32 [N,{NUM_CLASSES}], "
            f"'{v2.LABEL}' BYTES [N]. Output parameter classification=k returns BYTES [N,k] 'score:index:label'. "
            f"Request parameter invert={'|'.join(INVERT_MODES)} applies to '{v2.IMAGE_TENSOR}'."
        ),
        "operationId": "v2Infer",
        "requestBody": infer_body,
        "responses": infer_responses,
    }

    ready_body = {
        "type": "object",
        "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}},
        "additionalProperties": False,
    }
    return {
        "/v2": {
            "get": {
                "tags": ["v2"],
                "summary": "Server metadata",
                "operationId": "v2ServerMetadata",
                "responses": {
                    "200": {
                        "description": "Name, version, extensions.",
                        "content": _json_content(_ref("V2ServerMetadata")),
                    }
                },
            }
        },
        "/v2/health/live": {
            "get": {
                "tags": ["v2"],
                "summary": "Server liveness",
                "operationId": "v2Live",
                "responses": {
                    "200": {
                        "description": "The server answers.",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["live"],
                                "properties": {"live": {"type": "boolean"}},
                                "additionalProperties": False,
                            }
                        ),
                    }
                },
            }
        },
        "/v2/health/ready": {
            "get": {
                "tags": ["v2"],
                "summary": "Server readiness",
                "operationId": "v2Ready",
                "responses": {
                    "200": {"description": "Ready.", "content": _json_content(ready_body)},
                    "503": {"description": "Not ready.", "content": _json_content(ready_body)},
                },
            }
        },
        **model_routes("", "get", metadata_op),
        **model_routes("/ready", "get", ready_op),
        **model_routes("/infer", "post", infer_op),
    }


def _service_paths() -> dict[str, Any]:
    not_ready = _service_error("No model is loaded (yet); the message says why.")
    image_body = {"type": "string", "format": "binary"}
    return {
        "/predict": {
            "post": {
                "tags": ["service"],
                "summary": "Classify one image (raw body) or a batch (multipart 'image' fields)",
                "operationId": "predict",
                "parameters": [
                    {
                        "name": "top_k",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": NUM_CLASSES},
                        "description": "Add the K most probable classes, sorted.",
                    },
                    {
                        "name": "invert",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(INVERT_MODES), "default": "auto"},
                        "description": "Invert a dark-on-light image: auto (from its border), true, false.",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        **{media: {"schema": image_body} for media in DOCUMENTED_IMAGE_TYPES},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": [IMAGE_FIELD],
                                "properties": {IMAGE_FIELD: {"type": "array", "items": image_body, "minItems": 1}},
                            }
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": "One image: a Prediction (with 'model'); several fields: a BatchPrediction.",
                        "content": _json_content({"anyOf": [_ref("Prediction"), _ref("BatchPrediction")]}),
                    },
                    "400": _service_error("Empty, truncated or undecodable image, missing field, bad parameter."),
                    "413": _service_error(
                        "Body over MAX_UPLOAD_BYTES, image over the pixel limit, batch over MAX_BATCH."
                    ),
                    "415": _service_error("Content type or image format not taken."),
                    "503": not_ready,
                },
            }
        },
        "/healthz": {
            "get": {
                "tags": ["service"],
                "summary": "Liveness",
                "operationId": "healthz",
                "responses": {
                    "200": {
                        "description": "The process answers.",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                "additionalProperties": False,
                            }
                        ),
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["service"],
                "summary": "Readiness",
                "operationId": "readyz",
                "responses": {
                    "200": {
                        "description": "A verified model is loaded and warmed up.",
                        "content": _json_content(
                            {
                                "type": "object",
                                "required": ["status", "model"],
                                "properties": {
                                    "status": {"type": "string", "enum": ["ready"]},
                                    "model": {
                                        "type": "object",
                                        "required": ["name", "version"],
                                        "properties": {
                                            "name": {"type": "string", "nullable": True},
                                            "version": {"type": "string"},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                                "additionalProperties": False,
                            }
                        ),
                    },
                    "503": not_ready,
                },
            }
        },
        "/model": {
            "get": {
                "tags": ["service"],
                "summary": "The model card",
                "operationId": "modelCard",
                "responses": {
                    "200": {"description": "Card, version, device.", "content": _json_content(_ref("ModelCard"))},
                    "503": not_ready,
                },
            }
        },
        "/": {
            "get": {
                "tags": ["service"],
                "summary": "Web page to try the model in a browser",
                "operationId": "index",
                "responses": {
                    "200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["operations"],
                "summary": "Prometheus metrics (text format 0.0.4), summed over all workers",
                "operationId": "metrics",
                "responses": {
                    "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["operations"],
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.0.3.", "content": _json_content({"type": "object"})}},
            }
        },
        "/docs": {
            "get": {
                "tags": ["operations"],
                "summary": "Interactive API documentation (Swagger UI, served locally)",
                "operationId": "docs",
                "responses": {
                    "200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/docs/{asset}": {
            "get": {
                "tags": ["operations"],
                "summary": "Swagger UI's script, style sheet and icons",
                "operationId": "docsAsset",
                "parameters": [
                    {
                        "name": "asset",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": "swagger-ui.css",
                        "description": "docs.js or one of " + ", ".join(sorted(SWAGGER_ASSETS)),
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in ("text/javascript", "text/css", "image/png")
                        },
                    },
                    "404": _service_error("Not one of the files /docs uses."),
                },
            }
        },
    }


def build_spec(server_version: str, model_name: str = MODEL_NAME, model_version: str | None = None) -> dict[str, Any]:
    """The OpenAPI document; every response carries the X-Request-ID header the app always sets.

    The served model's name and version only fill in examples; the document stays valid after a reload.
    """
    paths = {**_service_paths(), **_v2_paths(model_name, model_version)}
    request_id = {"$ref": "#/components/headers/RequestId"}
    for operations in paths.values():
        for operation in operations.values():
            for response in operation["responses"].values():
                response.setdefault("headers", {})["X-Request-ID"] = request_id
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Fashion-MNIST classifier",
            "version": server_version,
            "description": "Classifies clothing images into the ten Fashion-MNIST classes. The service's own "
            "JSON API (/predict), health probes, Prometheus metrics, and the Open Inference Protocol v2 "
            "(KServe/Triton REST, with the binary tensor data and classification extensions).",
        },
        "tags": [
            {"name": "service", "description": "The service's own API."},
            {"name": "v2", "description": "Open Inference Protocol v2 (KServe / Triton / MLServer clients)."},
            {"name": "operations", "description": "Metrics and documentation."},
        ],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "headers": {
                "RequestId": {
                    "description": "The client's X-Request-ID when short and plain, else a generated one.",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        },
    }


def register(app: Flask) -> None:
    """Add ``GET /openapi.json``, ``GET /docs`` and the locally served Swagger UI assets."""
    model = runner_of(app).current
    name = model.card.get("name", MODEL_NAME) if model else MODEL_NAME
    spec = build_spec(v2.package_version(), name, model.version if model else None)
    document = json.dumps(spec, separators=(",", ":"))
    import swagger_ui_bundle  # the Swagger UI files, from PyPI, served from the wheel

    assets = str(swagger_ui_bundle.swagger_ui_path)

    @app.get("/openapi.json")
    def openapi() -> Response:
        """This service's OpenAPI document."""
        return Response(document, mimetype="application/json")

    @app.get("/docs")
    def docs() -> Response:
        """Swagger UI for /openapi.json, with every file served by the app."""
        return send_from_directory(STATIC_DIR, "docs.html", max_age=0)

    @app.get("/docs/<asset>")
    def docs_asset(asset: str) -> Response:
        """Swagger UI's script, style and icons (an allow-list, not a directory listing)."""
        if asset == "docs.js":
            return send_from_directory(STATIC_DIR, "docs.js", max_age=0)
        if asset not in SWAGGER_ASSETS:
            abort(404)
        return send_from_directory(assets, asset, max_age=3600)
