"""Open Inference Protocol v2 (the KServe/Triton REST protocol): the codec, without Flask.

The routes that use it (a Flask blueprint in ``service.v2_routes``):

- ``GET /v2`` server metadata, ``GET /v2/health/live``, ``GET /v2/health/ready``
- ``GET /v2/models/{name}[/versions/{version}]`` model metadata, ``.../ready`` model readiness
- ``POST /v2/models/{name}[/versions/{version}]/infer`` inference

The model takes one of two inputs: ``input`` (FP32 ``[N, 1, 28, 28]``, already normalized with
the shared contract's mean and std) or ``image`` (BYTES ``[N]``, encoded image files: PNG, JPEG,
... decoded and preprocessed by the same code as ``POST /predict``; in JSON each element is the
file's base64 text, in binary form the raw file). It produces ``probabilities`` (FP32
``[N, 10]``, softmax) and ``label`` (BYTES ``[N]``, the argmax's class name).

Extensions (listed in ``GET /v2``): ``binary_tensor_data`` (Triton's binary tensor data:
``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``) and ``classification`` (an output parameter ``classification: k``
turns ``probabilities`` into BYTES ``[N, k]`` strings ``"score:index:label"``, best first).
Request bodies may be gzip or deflate compressed (tritonclient's request_compression_algorithm).

Every refusal is ``{"error": "<message naming the problem>"}`` with a 4xx status (503 while no
model is loaded). The parsing and encoding here are pure functions of bytes and arrays, so
they are unit-tested without a server; the routes only glue them to the runner.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fashion.contract import CLASS_NAMES, INPUT_SHAPE, NUM_CLASSES
from service.web import Budget, ServiceError, to_inputs

SERVER_NAME = "fashion-serve"
PLATFORM = "pytorch"  # eager PyTorch (not TorchScript, which Triton calls "pytorch_libtorch")
EXTENSIONS = ("binary_tensor_data", "classification")
HEADER_LENGTH = "Inference-Header-Content-Length"

INPUT_TENSOR = "input"
IMAGE_TENSOR = "image"
PROBABILITIES = "probabilities"
LABEL = "label"
UNCERTAIN = "uncertain"  # fashion.trust: true when the answer should not be trusted (not a garment, low confidence)

# Element sizes in bytes of the protocol's fixed-size data types (BYTES is variable).
DATATYPE_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
DATATYPES = frozenset(DATATYPE_SIZES) | {"BYTES"}

# "[N,1,28,28]": the shape of the FP32 input in messages, from the shared contract.
INPUT_SHAPE_TEXT = "[N," + ",".join(map(str, INPUT_SHAPE)) + "]"
MODEL_INPUTS = (
    {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]},
    {"name": IMAGE_TENSOR, "datatype": "BYTES", "shape": [-1]},
)
MODEL_OUTPUTS = (
    {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, NUM_CLASSES]},
    {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
    {"name": UNCERTAIN, "datatype": "BOOL", "shape": [-1]},
)
_LABELS = np.array([name.encode() for name in CLASS_NAMES], dtype=object)


class V2Error(Exception):
    """A request the protocol refuses: ``status`` and a message that names the problem."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


# --------------------------------------------------------------------------- request model


@dataclass
class InputTensor:
    """One request input: its JSON description plus its binary data, when sent that way."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # the JSON "data" (nested lists), or None when raw is set
    raw: bytes | None = None  # binary tensor data extension


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output
    classification: int = 0


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None  # None: every output, default settings
    id: str | None = None
    parameters: dict = field(default_factory=dict)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(obj: Mapping, where: str) -> dict:
    """The optional ``parameters`` object: names mapped to a string, number or boolean each."""
    if "parameters" not in obj:
        return {}
    params = obj["parameters"]
    if not isinstance(params, dict):
        raise V2Error(f"{where}: 'parameters' must be a JSON object")
    for key, value in params.items():
        if not isinstance(value, str | int | float):  # bool is an int
            raise V2Error(f"{where}: parameter '{key}' must be a string, number or boolean")
    return params


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """HTTP body (+ Inference-Header-Content-Length) -> (the JSON object, the binary tail)."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            length = int(header_length.strip())
        except ValueError:
            raise V2Error(f"{HEADER_LENGTH}: {header_length[:40]!r} is not an integer") from None
        if not 0 < length <= len(body):
            raise V2Error(f"{HEADER_LENGTH}={length} is outside the body's {len(body)} bytes")
        head, tail = body[:length], body[length:]
    if not head:
        raise V2Error("the request body is empty; send an inference request JSON object")
    try:
        document = json.loads(head)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise V2Error(f"the request is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise V2Error("the request must be a JSON object with an 'inputs' list")
    return document, tail


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Bytes of an inference request (JSON, optionally followed by binary tensors) -> InferRequest."""
    document, tail = split_body(body, header_length)
    request_id = document.get("id")
    if "id" in document and not isinstance(request_id, str):
        raise V2Error("'id' must be a string")
    parameters = _parameters(document, "the request")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise V2Error("parameter 'binary_data_output' must be true or false")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2Error("'inputs' must be a non-empty list of input tensors")
    inputs, offset = [], 0
    for index, spec in enumerate(raw_inputs):
        tensor, size = _parse_input(spec, index)
        if size is not None:
            if offset + size > len(tail):
                raise V2Error(
                    f"input '{tensor.name}' claims binary_data_size={size} but only {len(tail) - offset} "
                    "bytes of binary data are left after the JSON header"
                )
            tensor.raw = tail[offset : offset + size]
            offset += size
        inputs.append(tensor)
    if offset != len(tail):
        raise V2Error(
            f"{len(tail) - offset} bytes of binary data follow the JSON header that no input's "
            f"binary_data_size accounts for (check {HEADER_LENGTH})"
        )
    names = [tensor.name for tensor in inputs]
    if len(set(names)) != len(names):
        raise V2Error("an input name appears more than once in 'inputs'")

    outputs = None
    if "outputs" in document:
        raw_outputs = document["outputs"]
        if not isinstance(raw_outputs, list):
            raise V2Error("'outputs' must be a list of requested outputs")
        outputs = [_parse_output(spec, index) for index, spec in enumerate(raw_outputs)] or None
        if outputs and len({o.name for o in outputs}) != len(outputs):
            raise V2Error("an output name appears more than once in 'outputs'")
    return InferRequest(inputs=inputs, outputs=outputs, id=request_id, parameters=parameters)


def _parse_input(spec: Any, index: int) -> tuple[InputTensor, int | None]:
    if not isinstance(spec, dict):
        raise V2Error(f"inputs[{index}] must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise V2Error(f"inputs[{index}] has no 'name' string")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise V2Error(f"input '{name}': datatype {datatype!r} is not one of {', '.join(sorted(DATATYPES))}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise V2Error(f"input '{name}': 'shape' must be a list of non-negative integers")
    params = _parameters(spec, f"input '{name}'")
    size = params.get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size < 0:
            raise V2Error(f"input '{name}': binary_data_size must be a non-negative integer")
        if "data" in spec:
            raise V2Error(f"input '{name}' has both 'data' and binary_data_size; send one of them")
    elif "data" not in spec:
        raise V2Error(f"input '{name}' has no 'data' (and no binary_data_size for binary data)")
    return InputTensor(name=name, datatype=datatype, shape=tuple(shape), data=spec.get("data")), size


def _parse_output(spec: Any, index: int) -> RequestedOutput:
    if not isinstance(spec, dict):
        raise V2Error(f"outputs[{index}] must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise V2Error(f"outputs[{index}] has no 'name' string")
    params = _parameters(spec, f"output '{name}'")
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise V2Error(f"output '{name}': binary_data must be true or false")
    count = params.get("classification", 0)
    if not _is_int(count) or count < 0:
        raise V2Error(f"output '{name}': classification must be a non-negative integer")
    return RequestedOutput(name=name, binary=binary, classification=count)


# --------------------------------------------------------------------------- tensor data


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def deserialize_bytes(raw: bytes, where: str = "input", max_elements: int | None = None) -> list[bytes]:
    """BYTES binary data (each element: 4-byte little-endian length, then the bytes) -> elements.

    Stops after ``max_elements + 1`` elements: a body of millions of empty elements is refused
    as soon as it has more than the shape allows, not after a long loop.
    """
    elements, offset = [], 0
    while offset < len(raw) and (max_elements is None or len(elements) <= max_elements):
        if offset + 4 > len(raw):
            raise V2Error(f"{where}: BYTES data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise V2Error(f"{where}: BYTES element {len(elements)} claims {length} bytes past the end of its data")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def serialize_bytes(elements: Any) -> bytes:
    """Elements (bytes or str) -> BYTES binary data, each prefixed with its 4-byte little-endian length."""
    parts = []
    for element in elements:
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def fp32_array(tensor: InputTensor) -> np.ndarray:
    """An FP32 input (JSON numbers, nested or flat, or binary) -> a float32 array of its shape."""
    if tensor.datatype != "FP32":
        raise V2Error(f"input '{tensor.name}' must have datatype FP32, got {tensor.datatype}")
    count = element_count(tensor.shape)
    if tensor.raw is not None:
        if len(tensor.raw) != 4 * count:
            raise V2Error(
                f"input '{tensor.name}': binary_data_size is {len(tensor.raw)} bytes but shape "
                f"{list(tensor.shape)} of FP32 needs {4 * count}"
            )
        array = np.frombuffer(tensor.raw, dtype="<f4").astype(np.float32)  # copy: writable, native order
    else:
        try:
            array = np.asarray(tensor.data)
        except (ValueError, TypeError, RecursionError, OverflowError):
            raise V2Error(f"input '{tensor.name}': 'data' is not a rectangular array of numbers") from None
        if array.dtype.kind not in "iuf":
            raise V2Error(f"input '{tensor.name}': 'data' must hold only numbers for datatype FP32")
        if array.size != count:
            raise V2Error(
                f"input '{tensor.name}': 'data' has {array.size} elements but shape {list(tensor.shape)} needs {count}"
            )
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise V2Error(f"input '{tensor.name}' contains NaN or infinite values")
    return array.reshape(tensor.shape)


def bytes_elements(tensor: InputTensor) -> list[bytes]:
    """A BYTES input -> its elements: raw files from binary data, base64-decoded from JSON strings."""
    if tensor.datatype != "BYTES":
        raise V2Error(f"input '{tensor.name}' must have datatype BYTES, got {tensor.datatype}")
    count = element_count(tensor.shape)
    if tensor.raw is not None:
        elements = deserialize_bytes(tensor.raw, f"input '{tensor.name}'", max_elements=count)
    else:
        data = tensor.data
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise V2Error(f"input '{tensor.name}': 'data' must be a list of base64 strings (one per image)")
        elements = []
        for index, text in enumerate(data):
            try:
                elements.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise V2Error(f"input '{tensor.name}' element {index} is not valid base64") from None
    if len(elements) != count:
        raise V2Error(
            f"input '{tensor.name}' has {len(elements)} elements but shape {list(tensor.shape)} needs {count}"
        )
    return elements


def model_batch(
    request: InferRequest, max_batch: int, max_pixels: int, invert: str = "auto", budget: Budget | None = None
) -> torch.Tensor:
    """The request's one model input -> the normalized float32 batch [N, 1, 28, 28] the model takes
    (encoded images within ``budget``, as ``to_inputs`` keeps it)."""
    known = {spec["name"] for spec in MODEL_INPUTS}
    for tensor in request.inputs:
        if tensor.name not in known:
            raise V2Error(
                f"unknown input '{tensor.name}'; the model takes '{INPUT_TENSOR}' (FP32 {INPUT_SHAPE_TEXT}) "
                f"or '{IMAGE_TENSOR}' (BYTES [-1])"
            )
    if len(request.inputs) != 1:
        raise V2Error(f"send exactly one of the inputs '{INPUT_TENSOR}' and '{IMAGE_TENSOR}', not both")
    tensor = request.inputs[0]
    shape = tensor.shape
    if tensor.name == INPUT_TENSOR:
        if tensor.datatype != "FP32":
            raise V2Error(f"input '{INPUT_TENSOR}' must have datatype FP32, got {tensor.datatype}")
        if len(shape) != 4 or tuple(shape[1:]) != INPUT_SHAPE:
            raise V2Error(f"input '{INPUT_TENSOR}' must have shape {INPUT_SHAPE_TEXT}, got {list(shape)}")
    else:
        if tensor.datatype != "BYTES":
            raise V2Error(f"input '{IMAGE_TENSOR}' must have datatype BYTES, got {tensor.datatype}")
        if len(shape) != 1:
            raise V2Error(f"input '{IMAGE_TENSOR}' must have shape [N] (one encoded image each), got {list(shape)}")
    batch = shape[0]
    if batch < 1:
        raise V2Error(f"input '{tensor.name}' holds no images (batch size 0)")
    if batch > max_batch:
        raise V2Error(f"batch size {batch} is over the limit MAX_BATCH={max_batch}", status=413)
    if tensor.name == INPUT_TENSOR:
        return torch.from_numpy(fp32_array(tensor))
    # The very steps POST /predict runs (fashion.images.decode_image, the contract's preprocessing),
    # so an image gets the same probabilities through either API.
    try:
        return to_inputs(bytes_elements(tensor), invert, max_pixels, budget)
    except ServiceError as error:
        raise V2Error(f"input '{IMAGE_TENSOR}': {error.message}", status=error.status) from None


# --------------------------------------------------------------------------- response


def classification_strings(probabilities: np.ndarray, count: int) -> np.ndarray:
    """[N, C] scores -> BYTES [N, count]: Triton's ``"score:index:label"``, highest score first.

    The score is the float32's shortest round-trip text, so parsing it gives back the exact value.
    """
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    rows = [
        [f"{probabilities[n, i]!s}:{i}:{CLASS_NAMES[i]}".encode() for i in row]  # !s: numpy's shortest text
        for n, row in enumerate(order.tolist())
    ]
    return np.array(rows, dtype=object).reshape(len(rows), count)


def select_outputs(request: InferRequest) -> list[RequestedOutput]:
    """The outputs to return, validated, with binary_data_output applied where not overridden."""
    default_binary = bool(request.parameters.get("binary_data_output", False))
    wanted = request.outputs or [RequestedOutput(spec["name"]) for spec in MODEL_OUTPUTS]
    known = {spec["name"] for spec in MODEL_OUTPUTS}
    selected = []
    for output in wanted:
        if output.name not in known:
            raise V2Error(
                f"unknown output '{output.name}'; the model produces '{PROBABILITIES}', '{LABEL}' and '{UNCERTAIN}'"
            )
        if output.classification:
            if output.name != PROBABILITIES:
                raise V2Error(f"classification applies to output '{PROBABILITIES}', not '{output.name}'")
            if output.classification > NUM_CLASSES:
                raise V2Error(f"classification must be between 1 and {NUM_CLASSES}, got {output.classification}")
        binary = default_binary if output.binary is None else output.binary
        selected.append(RequestedOutput(output.name, binary, output.classification))
    return selected


def output_tensors(
    probabilities: np.ndarray, outputs: list[RequestedOutput], uncertain: np.ndarray | None = None
) -> list[tuple[RequestedOutput, str, np.ndarray]]:
    """[N, 10] probabilities (and [N] uncertain flags) -> (output, datatype, array) for each requested output."""
    tensors = []
    for output in outputs:
        if output.name == UNCERTAIN:
            flags = np.zeros(len(probabilities), dtype=bool) if uncertain is None else uncertain
            tensors.append((output, "BOOL", flags))
        elif output.name == LABEL:
            tensors.append((output, "BYTES", _LABELS[probabilities.argmax(axis=1)]))
        elif output.classification:
            tensors.append((output, "BYTES", classification_strings(probabilities, output.classification)))
        else:
            tensors.append((output, "FP32", probabilities))
    return tensors


def encode_response(
    tensors: list[tuple[RequestedOutput, str, np.ndarray]],
    model_name: str,
    model_version: str | None,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Output tensors -> (HTTP body, JSON header length when binary data follows, else None)."""
    outputs, chunks = [], []
    for output, datatype, array in tensors:
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            if datatype == "BYTES":
                chunk = serialize_bytes(array.ravel())
            elif datatype == "BOOL":  # one byte per element, as the protocol's binary extension says
                chunk = array.astype(np.bool_).tobytes()
            else:
                chunk = array.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        elif datatype == "BYTES":
            entry["data"] = [element.decode() for element in array.ravel()]
        else:
            # float32 -> Python float is exact, so a client parsing the JSON gets the same float32 back.
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = outputs
    head = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, version: str | None) -> dict:
    return {
        "name": name,
        "versions": [version] if version else [],
        "platform": PLATFORM,
        "inputs": [dict(spec) for spec in MODEL_INPUTS],
        "outputs": [dict(spec) for spec in MODEL_OUTPUTS],
    }


def package_version() -> str:
    """The installed fashion-serve package's version (``0+unknown`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:
        return "0+unknown"
