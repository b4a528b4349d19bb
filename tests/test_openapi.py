"""OpenAPI: the document is valid, covers every route, and the live server keeps to it under schemathesis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import schemathesis

from service.app import create_app
from service.web import RAW_IMAGE_TYPES
from testing.models import TOY_MODEL_ENV, random_model_dir
from testing.server import PROJECT_ROOT, start_server

ARTIFACTS = PROJECT_ROOT / "test-artifacts"
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # added to every route by Flask itself


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("openapi-model"), seed=3)


@pytest.fixture(scope="module")
def app(model_dir):
    return create_app({"MODEL_DIR": str(model_dir), "ACCESS_LOG": "false", **TOY_MODEL_ENV})


@pytest.fixture(scope="module")
def spec(app):
    answer = app.test_client().get("/openapi.json")
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    return answer.json


def test_the_document_is_valid_openapi_3_0(spec):
    assert spec["openapi"] == "3.0.3"
    schemathesis.openapi.from_dict(spec).validate()  # against the OpenAPI 3.0 meta-schema


def test_every_route_is_documented_and_nothing_else(app, spec):
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes |= {(path, method.lower()) for method in rule.methods - IGNORED_METHODS}
    documented = {(path, method) for path, operations in spec["paths"].items() for method in operations}
    assert routes == documented


def test_both_error_forms_are_documented(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["Error"]["properties"]["error"]["required"] == ["status", "code", "message"]
    assert schemas["V2Error"]["properties"]["error"] == {"type": "string"}
    predict_errors = spec["paths"]["/predict"]["post"]["responses"]
    assert {"400", "413", "415", "503"} <= predict_errors.keys()
    infer_errors = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert infer_errors["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/V2Error"}


def test_the_documented_image_types_are_taken_by_predict(spec):
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    raw_types = content.keys() - {"multipart/form-data"}
    assert raw_types and raw_types <= RAW_IMAGE_TYPES


def test_the_examples_in_the_document_are_answered_as_documented(app, spec):
    """The ready-made v2 requests that Swagger UI offers really work."""
    examples = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    client = app.test_client()
    for example in examples.values():
        answer = client.post("/v2/models/fashion-mnist/infer", json=example["value"])
        assert answer.status_code == 200, answer.json
        produced = {output["name"] for output in answer.json["outputs"]}
        assert produced <= {"probabilities", "label", "uncertain"}
        # What the example asks for, or every output when it asks for none.
        asked = {output["name"] for output in example["value"].get("outputs", [])}
        assert produced == (asked or {"probabilities", "label", "uncertain"})


@pytest.fixture(scope="module")
def server(model_dir):
    with start_server(model_dir, env={"ACCESS_LOG": "false", "MAX_BATCH": "8", **TOY_MODEL_ENV}, workers=2) as handle:
        yield handle


def test_schemathesis_finds_no_server_errors_and_no_spec_violations(server):
    """Property-based requests generated from /openapi.json against the live server.

    Every check runs except positive_data_acceptance: a schema cannot say "a decodable image"
    or "the served version", so schema-valid requests may rightly get a documented 4xx.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "40",
        "--seed",
        "20261127",
        # One thread: with several, hypothesis' strategy reprs call ast.parse concurrently, which
        # CPython 3.11 can fail with "AST constructor recursion depth mismatch" (a flaky run error).
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--report",
        "junit",
        "--report-junit-path",
        str(ARTIFACTS / "schemathesis-junit.xml"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ARTIFACTS)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert server.alive()
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200


@pytest.mark.browser
def test_docs_render_in_chromium_without_any_outside_request(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    outside: list[str] = []

    def only_loopback(route):
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            operations = page.locator(".opblock").count()
            title = page.locator(".info .title").inner_text()
            page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)
        finally:
            browser.close()
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert operations == sum(len(operations) for operations in spec["paths"].values())
    assert "Fashion-MNIST classifier" in title
    assert outside == []
