"""The containers for real: build the images, `docker compose up`, predict, retrain, check the hardening.

The stack (testing/containers.py) is the README's `docker compose up`: the api behind the proxy, which
is published on a free loopback port. The front door's own behaviour is tested in test_proxy.py.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests
import torch

from fashion.checkpoint import read_card
from fashion.contract import CLASS_NAMES
from testing.containers import (
    BUILD_TIMEOUT_S,
    IMAGE_USER_ID,
    PROJECT,
    needs_engine,
    pyproject_version,
    running_stack,
)
from testing.containers import docker as _docker
from testing.images import png as png_bytes
from testing.models import assert_serves_like_offline, offline_probabilities

SAMPLES = 16  # real test images posted to the containerised service


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory, "container") as s:
        yield s


def _docker_label(image: str, key: str) -> str:
    return json.loads(_docker("image", "inspect", image))[0]["Config"]["Labels"][f"org.opencontainers.image.{key}"]


@needs_engine
def test_compose_api_is_healthy_and_answers_real_images_like_the_offline_model(stack, test_set):
    """The README's quick start: `docker compose up`, then POST to the published port (the proxy)."""
    for service in ("api", "proxy"):
        assert _docker("inspect", "-f", "{{.State.Health.Status}}", stack.container_id(service)).strip() == "healthy"
    # The api is reachable only through the proxy.
    assert stack.compose("port", "api", "8000", check=False).stdout.strip() in ("", ":0")
    answers = assert_serves_like_offline(stack.url, stack.models, test_set.data[:SAMPLES])
    correct = sum(answer["class_id"] == int(label) for answer, label in zip(answers, test_set.targets, strict=False))
    assert correct >= SAMPLES - 3, f"{correct}/{SAMPLES} correct"


@needs_engine
@pytest.mark.parametrize(("service", "paths"), [("api", ["/app/probe", "/app/models/probe"]), ("proxy", [])])
def test_containers_are_non_root_read_only_and_without_capabilities(stack, service, paths):
    container = stack.container_id(service)
    config = json.loads(_docker("inspect", container))[0]
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert stack.compose("exec", "-T", service, "id", "-u").stdout.strip() == str(IMAGE_USER_ID)
    status = stack.compose("exec", "-T", service, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    # PID 1: gunicorn, or the proxy entry point that supervises HAProxy and nginx, as the image user
    assert fields["Uid"].split()[0] == str(IMAGE_USER_ID)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    for path in [*paths, "/etc/probe"]:
        result = stack.compose("exec", "-T", service, "touch", path, check=False)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, (path, result.stderr)
    assert stack.compose("exec", "-T", service, "touch", "/tmp/probe").returncode == 0  # the tmpfs


@needs_engine
def test_serve_image_metadata_and_contents(stack):
    image = json.loads(_docker("image", "inspect", f"{PROJECT}-api"))[0]["Config"]
    assert image["User"] == "app"
    assert "8000/tcp" in image["ExposedPorts"]
    assert image["Entrypoint"][0] == "gunicorn"
    labels = image["Labels"]
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.title"] == "fashion-mnist-serve"
    # One version: pyproject.toml's, in the label and in the installed package that /v2 reports.
    version = pyproject_version()
    assert labels["org.opencontainers.image.version"] == version
    assert requests.get(f"{stack.url}/v2", timeout=10).json()["version"] == version
    assert requests.get(f"{stack.url}/openapi.json", timeout=10).json()["info"]["version"] == version
    # The project is installed as a wheel: /app holds only the model and gunicorn's config (a link).
    listing = stack.compose("exec", "-T", "api", "find", "/app", "-maxdepth", "2").stdout.split()
    assert sorted(p for p in listing if p.count("/") == 2) == ["/app/gunicorn.conf.py", "/app/models"]
    installed = stack.compose("exec", "-T", "api", "pip", "list", "--format", "json").stdout
    assert {"name": "fashion-serve", "version": version} in json.loads(installed)
    assert not [p for p in listing if any(bad in p for bad in ("tests", ".git", ".venv", ".pytest_cache", ".tmp-"))]
    # No build tools at run time.
    tools = stack.compose("exec", "-T", "api", "sh", "-c", "command -v gcc cc make g++ || true").stdout
    assert tools.strip() == ""


@needs_engine
def test_serve_image_health_check_works_without_compose(stack):
    """The image's own HEALTHCHECK (plain `docker run`, nothing from compose) turns the container healthy."""
    name = f"{PROJECT}-healthcheck"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    _docker(
        "run",
        "-d",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{stack.models}:/app/models:ro",
        f"{PROJECT}-api",
    )
    try:
        deadline, status = time.monotonic() + 120, ""
        while status != "healthy" and time.monotonic() < deadline:
            time.sleep(1)
            status = _docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", name).strip()
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        assert status == "healthy", f"health {status!r}:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@needs_engine
def test_train_job_writes_a_model_that_the_running_api_then_serves(stack, test_set):
    before = read_card(stack.models)
    stack.timed("build_train_s", "build", "train", timeout=BUILD_TIMEOUT_S)
    train_image = json.loads(_docker("image", "inspect", f"{PROJECT}-train"))[0]["Config"]
    assert train_image["Entrypoint"] == ["python", "-m", "training"] and train_image["User"] == "app"
    labels = train_image["Labels"]
    assert labels["org.opencontainers.image.title"] == "fashion-mnist-train"
    for key in ("version", "licenses", "base.name"):  # shared with the serve image
        assert labels[f"org.opencontainers.image.{key}"] == _docker_label(f"{PROJECT}-api", key), key
    # Exactly the README's command, shortened to one epoch; arguments pass through to `python -m training`.
    stack.timed("train_1_epoch_s", "run", "--rm", "train", "--epochs", "1", "--seed", "7", timeout=900)
    card = read_card(stack.models)
    assert card["weights"]["sha256"] != before["weights"]["sha256"]
    assert card["training"]["epochs"] == 1 and card["training"]["seed"] == 7
    assert 0.75 <= card["metrics"]["test_accuracy"] <= 1.0
    assert sum(map(sum, card["metrics"]["confusion_matrix"]["counts"])) == 10_000
    for name in ("model.json", "model.safetensors"):
        assert (stack.models / name).stat().st_uid == stack.train_uid
        assert (stack.models / name).stat().st_mode & 0o444 == 0o444  # readable by the api's user
    assert not [p.name for p in stack.models.iterdir() if ".tmp-" in p.name]

    # The api notices the new card and swaps models without a restart; every worker must get there.
    png = png_bytes(test_set.data[0].numpy())
    deadline, streak = time.monotonic() + 60, 0
    while streak < 6:
        assert time.monotonic() < deadline, "the api still serves the old model 60 s after the retrain"
        answer = requests.post(f"{stack.url}/predict", data=png, headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        streak = streak + 1 if answer.json()["model"]["sha256"] == card["weights"]["sha256"] else 0
        time.sleep(0.2)
    expected = offline_probabilities(stack.models, test_set.data[:1])[0]
    probabilities = torch.tensor([answer.json()["probabilities"][name] for name in CLASS_NAMES])
    assert torch.allclose(probabilities, expected, atol=1e-5)


@needs_engine
def test_retrain_script_refuses_a_worse_model_and_keeps_it(stack, tmp_path):
    """The CI workflow's steps: one epoch is far below the bundled model, so the gate says no (exit 1)."""
    output = tmp_path / "retrained"
    env = {
        **stack.env,
        "OUTPUT_DIR": str(output),
        "CURRENT_MODEL": str(stack.root / "models"),
        "TRAIN_IMAGE": f"{PROJECT}-train:retrain",
    }
    start = time.monotonic()
    result = subprocess.run(
        ["bash", "scripts/retrain.sh", "--epochs", "1", "--no-plots"],
        cwd=stack.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    stack.timings["retrain_script_s"] = round(time.monotonic() - start, 1)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accuracy gate: refused" in result.stdout
    gate = json.loads((output / "gate.json").read_text())
    assert gate["accepted"] is False and gate["new_test_accuracy"] < gate["current_test_accuracy"] - 0.005
    assert read_card(output)["metrics"]["test_accuracy"] == gate["new_test_accuracy"]
    assert (output / "model.safetensors").is_file()
    # The probe validation ran in the train image; its verdict is in the gate's report, whichever it was.
    assert gate["probe_validation"] == json.loads((output / "validation.json").read_text())
    assert gate["probe_validation"]["version"] == read_card(output)["weights"]["sha256"][:12]
    # A second run into the same, now non-empty, folder is refused before anything runs.
    again = subprocess.run(["bash", "scripts/retrain.sh"], cwd=stack.root, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
