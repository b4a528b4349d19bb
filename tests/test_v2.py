"""Open Inference Protocol v2: the parsing/encoding functions, then the real server with real clients.

The server tests start the real gunicorn and talk to it with tritonclient[http] and the kserve
package's REST client, unmodified, and check that their answers equal POST /predict's.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from fashion.checkpoint import MODEL_NAME
from fashion.contract import CLASS_NAMES, INPUT_SHAPE, NUM_CLASSES
from service import v2
from testing.images import png
from testing.models import TOY_MODEL_ENV, known_answer_model_dir, known_probabilities, random_model_dir
from testing.server import start_server

MAX_BATCH = 16
B64_PNG = base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode()


def request_body(document: dict, *chunks: bytes) -> tuple[bytes, str | None]:
    head = json.dumps(document).encode()
    return head + b"".join(chunks), (str(len(head)) if chunks else None)


def fp32_input(array: np.ndarray, name: str = "input", **extra) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist(), **extra}


# --------------------------------------------------------------------------- parsing (no server)


def test_json_request_flat_and_nested_data_give_the_same_batch():
    x = np.random.default_rng(0).standard_normal((2, *INPUT_SHAPE)).astype(np.float32)
    flat = v2.parse_infer_request(request_body({"inputs": [fp32_input(x)]})[0])
    nested = v2.parse_infer_request(
        request_body({"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}]})[
            0
        ]
    )
    a = v2.model_batch(flat, MAX_BATCH, 10**6)
    b = v2.model_batch(nested, MAX_BATCH, 10**6)
    assert a.dtype == torch.float32 and a.shape == (2, *INPUT_SHAPE)
    assert torch.equal(a, b) and torch.equal(a, torch.from_numpy(x))


def test_binary_request_splits_json_header_and_tensors_in_order():
    x = np.arange(784, dtype=np.float32).reshape(1, 1, 28, 28) / 784
    raw = x.astype("<f4").tobytes()
    body, header = request_body(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        },
        raw,
    )
    parsed = v2.parse_infer_request(body, header)
    assert parsed.inputs[0].raw == raw
    assert torch.equal(v2.model_batch(parsed, MAX_BATCH, 10**6), torch.from_numpy(x))


@pytest.mark.parametrize(
    ("document", "chunks", "header", "message"),
    [
        ({"inputs": []}, (), None, "non-empty list"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [0]}]}, (), None, "no 'name'"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FLOAT", "data": [0]}]}, (), None, "datatype 'FLOAT'"),
        ({"inputs": [{"name": "input", "shape": [-1], "datatype": "FP32", "data": [0]}]}, (), None, "non-negative"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}, (), None, "has no 'data'"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0]}], "id": 7}, (), None, "'id'"),
        # binary tensor data: sizes that do not add up
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
         (b"\0" * 4,), None, "binary_data_size=8"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
         (b"\0" * 6,), None, "2 bytes of binary data"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": -4}}]},
         (b"\0" * 4,), None, "binary_data_size must be"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1],
                      "parameters": {"binary_data_size": 4}}]}, (b"\0" * 4,), None, "both 'data'"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}, (b"\0",), "x",
         "not an integer"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]}, (b"\0",), "9999",
         "outside"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]},
                     {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}, (), None, "more than once"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}],
          "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}, (), None, "binary_data must"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_naming_the_problem(document, chunks, header, message):
    head = json.dumps(document).encode()
    body = head + b"".join(chunks)
    if header is None and chunks:
        header = str(len(head))
    with pytest.raises(v2.V2Error) as caught:
        v2.parse_infer_request(body, header)
    assert caught.value.status == 400
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"", "empty"), (b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"\xff\xfe", "not valid JSON"),
     (b"[" * 100_000, "not valid JSON")],
)  # fmt: skip
def test_bodies_that_are_not_json_objects_are_refused(body, message):
    with pytest.raises(v2.V2Error, match=message):
        v2.parse_infer_request(body)


@pytest.mark.parametrize(
    ("tensor", "message", "status"),
    [
        ({"name": "pixels", "shape": [1], "datatype": "FP32", "data": [0]}, "unknown input 'pixels'", 400),
        ({"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP64", "data": [0] * 784}, "got FP64", 400),
        ({"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [0] * 784}, "shape [N,1,28,28]", 400),
        ({"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0] * 783}, "783 elements", 400),
        ({"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["0"] * 784}, "only numbers", 400),
        ({"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [[0, 1], [2]]}, "rectangular", 400),
        ({"name": "input", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}, "batch size 0", 400),
        ({"name": "input", "shape": [17, 1, 28, 28], "datatype": "FP32", "data": [0] * 784 * 17}, "MAX_BATCH=16", 413),
        ({"name": "image", "shape": [1], "datatype": "FP32", "data": [0]}, "datatype BYTES", 400),
        ({"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["AA=="]}, "shape [N]", 400),
        ({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}, "1 elements", 400),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}, "not valid base64", 400),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}, "not an image", 415),
        ({"name": "image", "shape": [2], "datatype": "BYTES", "data": [B64_PNG, ""]}, "image 1: the image is", 400),
    ],
)  # fmt: skip
def test_inputs_the_model_cannot_take_are_refused(tensor, message, status):
    parsed = v2.parse_infer_request(json.dumps({"inputs": [tensor]}).encode())
    with pytest.raises(v2.V2Error) as caught:
        v2.model_batch(parsed, MAX_BATCH, 10**6)
    assert message in caught.value.message
    assert caught.value.status == status


def test_non_finite_values_are_refused():
    parsed = v2.parse_infer_request(
        b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[NaN' + b",0" * 783 + b"]}]}"
    )
    with pytest.raises(v2.V2Error, match="NaN or infinite"):
        v2.model_batch(parsed, MAX_BATCH, 10**6)


def test_bytes_elements_round_trip_and_truncation_is_refused():
    elements = [b"", b"\x00\x01", b"Ankle boot", bytes(range(256))]
    raw = v2.serialize_bytes(elements)
    assert raw[:4] == struct.pack("<I", 0) and raw[4:8] == struct.pack("<I", 2)
    assert v2.deserialize_bytes(raw) == elements
    with pytest.raises(v2.V2Error, match="length prefix"):
        v2.deserialize_bytes(raw + b"\x01\x00")
    with pytest.raises(v2.V2Error, match="past the end"):
        v2.deserialize_bytes(raw[:-1])
    assert len(v2.deserialize_bytes(b"\0\0\0\0" * 1_000_000, max_elements=3)) == 4  # stops early


def test_classification_strings_are_triton_score_index_label_best_first():
    probabilities = np.array([[0.05, 0.6, 0.1, 0.25, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    strings = v2.classification_strings(probabilities, 3)
    assert strings.shape == (1, 3)
    assert [s.decode() for s in strings[0]] == ["0.6:1:Trouser", "0.25:3:Dress", "0.1:2:Pullover"]
    # The score text parses back to the exact float32.
    assert np.float32(float(strings[0, 0].decode().split(":")[0])) == probabilities[0, 1]


def test_output_selection_validates_names_and_classification():
    base = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [0]}]}
    for outputs, message in [
        ([{"name": "logits"}], "unknown output 'logits'"),
        ([{"name": "label", "parameters": {"classification": 2}}], "classification applies"),
        ([{"name": "probabilities", "parameters": {"classification": 11}}], "between 1 and 10"),
    ]:
        parsed = v2.parse_infer_request(json.dumps({**base, "outputs": outputs}).encode())
        with pytest.raises(v2.V2Error, match=message):
            v2.select_outputs(parsed)
    parsed = v2.parse_infer_request(json.dumps({**base, "parameters": {"binary_data_output": True},
                                                "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                                                            {"name": "probabilities"}]}).encode())  # fmt: skip
    assert [(o.name, o.binary) for o in v2.select_outputs(parsed)] == [("label", False), ("probabilities", True)]


def test_binary_response_is_read_back_by_tritonclient():
    """encode_response's binary layout, decoded by tritonclient's own response parser."""
    probabilities = np.array([[0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0.25, 0.75]], np.float32)
    outputs = [
        v2.RequestedOutput("probabilities", binary=True),
        v2.RequestedOutput("label", binary=True),
        v2.RequestedOutput("probabilities", binary=False, classification=2),
    ]
    body, header_length = v2.encode_response(v2.output_tensors(probabilities, outputs[:2]), MODEL_NAME, "abc", "7")
    assert header_length is not None and json.loads(body[:header_length])["id"] == "7"
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.as_numpy("label").tolist() == [b"T-shirt/top", b"Ankle boot"]
    body, header_length = v2.encode_response(v2.output_tensors(probabilities, outputs[2:]), MODEL_NAME, "abc")
    assert header_length is None
    assert json.loads(body)["outputs"][0] == {
        "name": "probabilities",
        "datatype": "BYTES",
        "shape": [2, 2],
        "data": ["0.5:0:T-shirt/top", "0.5:1:Trouser", "0.75:9:Ankle boot", "0.25:8:Bag"],
    }


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = random_model_dir(tmp_path_factory.mktemp("v2-model"), seed=1)
    with start_server(
        model_dir, env={"MAX_BATCH": str(MAX_BATCH), "ACCESS_LOG": "false", **TOY_MODEL_ENV}, workers=1
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def images(test_set):
    """Eight real test images: their uint8 pixels, PNG bytes and the normalized inputs."""
    pixels = test_set.data[:8].numpy()
    return {"pixels": pixels, "png": [png(p) for p in pixels], "inputs": test_set.inputs[:8].numpy()}


def predict_probabilities(server, png: bytes) -> np.ndarray:
    answer = requests.post(server.url + "/predict", data=png, headers={"Content-Type": "image/png"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return np.array([answer.json()["probabilities"][name] for name in CLASS_NAMES], dtype=np.float32)


def test_tritonclient_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    metadata = client.get_server_metadata()
    assert set(metadata["extensions"]) >= {"binary_tensor_data", "classification"}
    model = client.get_model_metadata(MODEL_NAME)
    version = requests.get(server.url + "/model", timeout=10).json()["version"]
    assert model["name"] == MODEL_NAME and model["versions"] == [version] and model["platform"] == "pytorch"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]} in model["inputs"]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]} in model["outputs"]
    assert client.is_model_ready(MODEL_NAME, model_version=version)
    assert client.get_model_metadata(MODEL_NAME, model_version=version)["versions"] == [version]
    assert not client.is_model_ready(MODEL_NAME, model_version="0" * 12)
    assert not client.is_model_ready("mnist")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_fp32_input_equals_predict(client, server, images, binary):
    for index in range(3):
        x = images["inputs"][index : index + 1]
        inputs = [triton.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
        result = client.infer(MODEL_NAME, inputs, outputs=outputs, request_id=f"r{index}")
        probabilities = result.as_numpy("probabilities")
        assert probabilities.dtype == np.float32 and probabilities.shape == (1, NUM_CLASSES)
        # Same pixels, same model, batch of one on both sides: bit-identical, not merely close.
        np.testing.assert_array_equal(probabilities[0], predict_probabilities(server, images["png"][index]))
        label = result.as_numpy("label")[0]  # str from JSON, bytes from binary data
        assert (label if binary else label.encode()) == CLASS_NAMES[int(probabilities[0].argmax())].encode()
        assert result.get_response()["id"] == f"r{index}"


def test_tritonclient_batch_with_default_outputs_and_classification(client, server, images):
    x = images["inputs"]
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)  # binary by default; no outputs named: binary_data_output=true
    result = client.infer(MODEL_NAME, inputs)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (8, NUM_CLASSES)
    single = np.stack([predict_probabilities(server, png) for png in images["png"]])
    np.testing.assert_allclose(probabilities, single, rtol=0, atol=1e-6)  # a batch may sum in another order
    assert result.get_output("label")["parameters"]["binary_data_size"] > 0

    outputs = [triton.InferRequestedOutput("probabilities", class_count=3)]
    top3 = client.infer(MODEL_NAME, inputs, outputs=outputs).as_numpy("probabilities")
    assert top3.shape == (8, 3)
    for row, scores in zip(top3, probabilities, strict=True):
        parsed = [item.decode().split(":", 2) for item in row]
        order = np.argsort(-scores, kind="stable")[:3]
        assert [int(index) for _, index, _ in parsed] == order.tolist()
        assert [label for _, _, label in parsed] == [CLASS_NAMES[i] for i in order]
        assert [np.float32(float(score)) for score, _, _ in parsed] == scores[order].tolist()


@pytest.mark.parametrize("binary", [False, True], ids=["base64-json", "binary"])
def test_encoded_images_through_the_bytes_input_equal_predict(client, server, images, binary):
    pngs = images["png"][:4]
    if binary:
        inputs = [triton.InferInput("image", [len(pngs)], "BYTES")]
        inputs[0].set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
        result = client.infer(MODEL_NAME, inputs, outputs=[triton.InferRequestedOutput("probabilities")])
        probabilities = result.as_numpy("probabilities")
    else:
        document = {"inputs": [{"name": "image", "shape": [len(pngs)], "datatype": "BYTES",
                                "data": [base64.b64encode(png).decode() for png in pngs]}]}  # fmt: skip
        answer = requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=document, timeout=10)
        assert answer.status_code == 200, answer.text
        probabilities = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(-1, NUM_CLASSES)
    single = np.stack([predict_probabilities(server, png) for png in pngs])
    np.testing.assert_allclose(probabilities, single, rtol=0, atol=1e-6)
    assert probabilities.argmax(1).tolist() == single.argmax(1).tolist()


def test_tritonclient_sees_errors_with_their_reason(client, images):
    x = images["inputs"][:1].reshape(1, 28, 28)
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"shape \[N,1,28,28\]") as caught:
        client.infer(MODEL_NAME, inputs)
    assert caught.value.status() == "400"
    x64 = images["inputs"][:1].astype(np.float64)
    inputs = [triton.InferInput("input", list(x64.shape), "FP64")]
    inputs[0].set_data_from_numpy(x64)
    with pytest.raises(InferenceServerException, match="datatype FP32, got FP64"):
        client.infer(MODEL_NAME, inputs)
    with pytest.raises(InferenceServerException, match="unknown model 'mnist'"):
        client.infer("mnist", inputs)
    with pytest.raises(InferenceServerException, match="unknown version '1'"):
        client.infer(MODEL_NAME, inputs, model_version="1")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(client, server, images, algorithm):
    x = images["inputs"][:2]
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = client.infer(MODEL_NAME, inputs, request_compression_algorithm=algorithm)
    single = np.stack([predict_probabilities(server, png) for png in images["png"][:2]])
    np.testing.assert_allclose(result.as_numpy("probabilities"), single, rtol=0, atol=1e-6)


def test_kserve_rest_client_v2(server, images):
    kserve = pytest.importorskip("kserve")

    async def run():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=30))
        try:
            assert await client.is_server_live(server.url)
            assert await client.is_server_ready(server.url)
            assert await client.is_model_ready(server.url, MODEL_NAME)
            x = images["inputs"][:2]
            plain = kserve.InferInput("input", list(x.shape), "FP32", data=x)
            json_result = await client.infer(
                server.url, kserve.InferRequest(MODEL_NAME, [plain], request_id="k1"), model_name=MODEL_NAME
            )
            packed = kserve.InferInput("input", list(x.shape), "FP32")
            packed.set_data_from_numpy(x, binary_data=True)
            binary_result = await client.infer(
                server.url, kserve.InferRequest(MODEL_NAME, [packed]), model_name=MODEL_NAME
            )
            return json_result, binary_result
        finally:
            await client.close()

    json_result, binary_result = asyncio.run(run())
    assert json_result.id == "k1"
    by_name = {output.name: output for output in json_result.outputs}
    probabilities = by_name["probabilities"].as_numpy()
    assert probabilities.shape == (2, NUM_CLASSES)
    single = np.stack([predict_probabilities(server, png) for png in images["png"][:2]])
    np.testing.assert_allclose(probabilities, single, rtol=0, atol=1e-6)
    np.testing.assert_array_equal({o.name: o for o in binary_result.outputs}["probabilities"].as_numpy(), probabilities)
    assert [label for label in by_name["label"].data] == [CLASS_NAMES[i] for i in probabilities.argmax(1)]


def post_infer(server, body: bytes, headers: dict | None = None, path: str = f"/v2/models/{MODEL_NAME}/infer"):
    return requests.post(server.url + path, data=body, headers=headers or {}, timeout=10)


def test_raw_http_errors_are_4xx_json_and_the_server_keeps_answering(server, images):
    x = images["inputs"][:1]
    raw = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    cases = [
        (head + raw[:-4], {v2.HEADER_LENGTH: str(len(head))}, 400, "binary_data_size=3136"),
        (head + raw + b"xx", {v2.HEADER_LENGTH: str(len(head))}, 400, "2 bytes of binary data"),
        (head + raw, {v2.HEADER_LENGTH: str(len(head) + 5)}, 400, "not valid JSON"),
        (head + raw, {}, 400, "not valid JSON"),
        (b'{"inputs": [', {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"{}", {}, 400, "'inputs'"),
        (json.dumps({"inputs": [fp32_input(x)]}).encode(), {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (json.dumps({"inputs": [fp32_input(x)]}).encode(), {"Content-Encoding": "gzip"}, 400, "cannot be decompressed"),
        (gzip.compress(b"{" + b" " * 17_000_000 + b"}"), {"Content-Encoding": "gzip"}, 413, "decompresses to more"),
        (gzip.compress(b'{"inputs": []}')[:-9], {"Content-Encoding": "gzip"}, 400, "truncated"),
        (json.dumps({"inputs": [fp32_input(np.zeros((MAX_BATCH + 1, 1, 28, 28), np.float32))]}).encode(), {}, 413,
         "MAX_BATCH"),
    ]  # fmt: skip
    for body, headers, status, message in cases:
        answer = post_infer(server, body, headers)
        assert answer.status_code == status, (message, answer.text)
        assert answer.headers["Content-Type"] == "application/json"
        assert message in answer.json()["error"]
    assert requests.get(server.url + "/v2/models/mnist", timeout=10).status_code == 400
    for method, path, status in [
        ("get", "/v2/nothing", 404),
        ("delete", "/v2/health/live", 405),
        ("get", "/v2/models/x/infer", 405),
    ]:
        answer = getattr(requests, method)(server.url + path, timeout=10)
        assert answer.status_code == status and isinstance(answer.json()["error"], str)
    # Still serving, and a good binary request works.
    answer = post_infer(
        server, head + raw, {v2.HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    )
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    np.testing.assert_array_equal(
        np.array(answer.json()["outputs"][0]["data"], np.float32), predict_probabilities(server, images["png"][0])
    )


def test_versioned_infer_url_and_binary_output_by_request_parameter(server, images):
    version = requests.get(server.url + "/model", timeout=10).json()["version"]
    document = {"inputs": [fp32_input(images["inputs"][:2])], "parameters": {"binary_data_output": True}}
    answer = post_infer(server, json.dumps(document).encode(), path=f"/v2/models/{MODEL_NAME}/versions/{version}/infer")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/octet-stream"
    length = int(answer.headers[v2.HEADER_LENGTH])
    header = json.loads(answer.content[:length])
    assert header["model_name"] == MODEL_NAME and header["model_version"] == version
    sizes = [output["parameters"]["binary_data_size"] for output in header["outputs"]]
    assert sizes[0] == 2 * NUM_CLASSES * 4 and length + sum(sizes) == len(answer.content)
    tail = answer.content[length:]
    probabilities = np.frombuffer(tail[: sizes[0]], dtype="<f4").reshape(2, NUM_CLASSES)
    labels = v2.deserialize_bytes(tail[sizes[0] : sizes[0] + sizes[1]])
    assert [label.decode() for label in labels] == [CLASS_NAMES[i] for i in probabilities.argmax(1)]
    assert [output["name"] for output in header["outputs"]] == ["probabilities", "label", "uncertain"]
    uncertain = np.frombuffer(tail[sizes[0] + sizes[1] :], dtype=np.bool_)  # BOOL: one byte per element
    assert header["outputs"][2]["datatype"] == "BOOL" and uncertain.shape == (2,)


def test_known_answer_through_v2(tmp_path):
    """Hand-set weights: every input gets softmax([0..9]); the v2 answer must be exactly that."""
    from service.app import create_app

    app = create_app({"MODEL_DIR": str(known_answer_model_dir(tmp_path)), "ACCESS_LOG": "false", **TOY_MODEL_ENV})
    document = {
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": [0.5] * (2 * 784)}],
        "outputs": [{"name": "probabilities"}, {"name": "label"}],
    }
    answer = app.test_client().post(f"/v2/models/{MODEL_NAME}/infer", json=document)
    assert answer.status_code == 200, answer.json
    outputs = {output["name"]: output for output in answer.json["outputs"]}
    expected = known_probabilities()
    assert outputs["probabilities"]["shape"] == [2, NUM_CLASSES]
    np.testing.assert_array_equal(np.array(outputs["probabilities"]["data"], np.float32), np.tile(expected, 2))
    assert outputs["label"]["data"] == ["Ankle boot", "Ankle boot"]
    document["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    strings = app.test_client().post(f"/v2/models/{MODEL_NAME}/infer", json=document).json["outputs"][0]["data"]
    assert strings[:2] == [f"{expected[9]!s}:9:Ankle boot", f"{expected[8]!s}:8:Bag"]
    assert float(strings[0].split(":")[0]) == pytest.approx(np.exp(9) / np.exp(np.arange(10)).sum(), abs=1e-7)


def test_not_ready_answers_503_with_the_reason(tmp_path):
    """No model in MODEL_DIR: live, not ready; model endpoints say why, in the protocol's error form."""
    from service.app import create_app

    client = create_app({"MODEL_DIR": str(tmp_path), "ACCESS_LOG": "false"}).test_client()
    assert client.get("/v2/health/live").json == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json == {"ready": False}
    document = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    for answer in (
        client.get(f"/v2/models/{MODEL_NAME}"),
        client.get(f"/v2/models/{MODEL_NAME}/ready"),
        client.post(f"/v2/models/{MODEL_NAME}/infer", json=document),
    ):
        assert answer.status_code == 503
        assert "not ready" in answer.json["error"] and str(tmp_path) in answer.json["error"]
    assert client.get("/v2/models/other/ready").status_code == 400
