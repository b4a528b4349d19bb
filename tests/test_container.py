"""The containers for real: build the images, `docker compose up`, predict, retrain, check the hardening.

The container tests need a Docker-compatible engine (here: ``../shared/container-engine/up``, then
``eval "$(../shared/container-engine/up --env)"``) and skip with the reason when none answers. They run
compose on a copy of the repository (the files git knows), with the published port on loopback, a free
port, and a temporary models folder, and always tear the stack down. Images are kept (project
``fashion-mnist-test``) so the next run builds from cache. Build and start-up times go to
``test-artifacts/container-timings.json``.

The accuracy gate and the health check are also tested here without an engine.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from fashion.checkpoint import load_checkpoint, read_card
from fashion.contract import CLASS_NAMES, pixels_to_input
from testing.server import free_port

REPO = Path(__file__).resolve().parent.parent
PROJECT = "fashion-mnist-test"
ARTIFACTS = REPO / "test-artifacts"
IMAGE_USER_ID = 10001  # the Dockerfile's `app` user
BUILD_TIMEOUT_S = 2400  # a cold build downloads torch (the CUDA wheels from PyPI here: several GB)
SAMPLES = 16  # real test images posted to the containerised service


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy_gate = _load_script("accuracy_gate")
healthcheck_spec = importlib.util.spec_from_file_location("healthcheck", REPO / "service" / "healthcheck.py")
healthcheck = importlib.util.module_from_spec(healthcheck_spec)
healthcheck_spec.loader.exec_module(healthcheck)


# --------------------------------------------------------------------------- no engine needed


def _card(tmp_path: Path, name: str, accuracy) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"metrics": {"test_accuracy": accuracy}}))
    return folder


@pytest.mark.parametrize(
    ("current", "new", "accepted"),
    [
        (0.9100, 0.9100, True),
        (0.9100, 0.9200, True),
        (0.9100, 0.9050, True),  # exactly 0.5 points below: still accepted
        (0.9100, 0.9049, False),
        (0.9100, 0.8481, False),
    ],
)
def test_accuracy_gate_refuses_more_than_half_a_point_below(tmp_path, current, new, accepted):
    args = accuracy_gate.parse_args(
        [str(_card(tmp_path, "current", current)), str(_card(tmp_path, "new", new)), "--report", str(tmp_path / "g")]
    )
    assert accuracy_gate.main(args) == (0 if accepted else 1)
    report = json.loads((tmp_path / "g").read_text())
    assert report["accepted"] is accepted
    assert report["new_test_accuracy"] == new and report["current_test_accuracy"] == current


def test_accuracy_gate_without_current_model_accepts_and_bad_cards_exit_2(tmp_path):
    new = _card(tmp_path, "new", 0.5)
    assert accuracy_gate.main(accuracy_gate.parse_args([str(tmp_path / "nothing"), str(new)])) == 0
    for bad in ('{"metrics": {}}', "not json", '{"metrics": {"test_accuracy": 91.0}}'):
        (new / "model.json").write_text(bad)
        assert accuracy_gate.main(accuracy_gate.parse_args([str(tmp_path / "nothing"), str(new)])) == 2
    assert accuracy_gate.main(accuracy_gate.parse_args([str(new), str(tmp_path / "missing")])) == 2


@contextlib.contextmanager
def _http_server(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "not ready", "reason": "loading"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_exit_status_follows_readyz(capsys, monkeypatch):
    # A proxy in the environment must not take the loopback check elsewhere (192.0.2.1 is unroutable);
    # without no_proxy, so that only the health check itself can keep loopback off the proxy.
    monkeypatch.setenv("http_proxy", "http://192.0.2.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with _http_server(200) as port:
        assert healthcheck.main({"HOST": "0.0.0.0", "PORT": str(port)}) == 0
    with _http_server(503) as port:
        assert healthcheck.main({"HOST": "127.0.0.1", "PORT": str(port)}) == 1
    assert "503" in capsys.readouterr().err
    assert healthcheck.main({"PORT": str(free_port()), "HEALTHCHECK_TIMEOUT": "2"}) == 1
    assert healthcheck.readyz_url({"HOST": "::1", "PORT": "81"}) == "http://[::1]:81/readyz"
    assert healthcheck.readyz_url({}) == "http://127.0.0.1:8000/readyz"


# --------------------------------------------------------------------------- with an engine


def _engine_problem() -> str | None:
    """Why the container tests cannot run here, or None when an engine answers."""
    hint = 'start one with ../shared/container-engine/up and eval "$(../shared/container-engine/up --env)"'
    if shutil.which("docker") is None:
        return f"no docker CLI on PATH; {hint}"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
        compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"the container engine did not answer `docker info` within 30 s; {hint}"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        return f"no container engine answers (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}: {last}); {hint}"
    if compose.returncode != 0:
        return "the docker CLI has no Compose v2 plugin (`docker compose`)"
    return None


ENGINE_PROBLEM = _engine_problem()


def _torch_index_url() -> str:
    """TORCH_INDEX_URL for the builds: the environment's when set, else "" (pip's default index).

    The Dockerfile's default, PyTorch's CPU-only index, is a host the test machines cannot reach
    (only the package registries are), so the tests build from pip's default index, whose torch is
    the CUDA build; set TORCH_INDEX_URL to test the CPU-index build where that index is reachable.
    """
    return os.environ.get("TORCH_INDEX_URL", "")


def needs_engine(test):
    """Mark a test container + slow, skipped with the reason when no engine answers."""
    for mark in (
        pytest.mark.container,
        pytest.mark.slow,
        pytest.mark.skipif(ENGINE_PROBLEM is not None, reason=f"no container engine: {ENGINE_PROBLEM}"),
    ):
        test = mark(test)
    return test


def _copy_repository(destination: Path) -> None:
    """The files git knows (tracked, and new ones not ignored): what a user's clone would have."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


class Stack:
    """A compose project on a copy of the repository; ``compose(...)`` runs ``docker compose`` on it."""

    def __init__(self, root: Path, models: Path, port: int, train_uid: int):
        self.root, self.models, self.port, self.train_uid = root, models, port, train_uid
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "API_BIND": "127.0.0.1",
            "API_PORT": str(port),
            "MODELS_DIR": str(models),
            "TRAIN_UID": str(train_uid),
            "TRAIN_GID": str(train_uid),
            "WORKERS": "2",
        }
        self.timings: dict[str, float | str] = {}
        self.env["TORCH_INDEX_URL"] = _torch_index_url()
        self.timings["torch_index_url"] = self.env["TORCH_INDEX_URL"] or "(pip default)"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker", "compose", "-p", PROJECT, *args]
        result = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def timed(self, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        start = time.monotonic()
        result = self.compose(*args, timeout=timeout)
        self.timings[name] = round(time.monotonic() - start, 1)
        return result

    def container_id(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


def _docker(*args: str, timeout: float = 120) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=timeout).stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo-copy")
    _copy_repository(root)
    if not (root / "models" / "model.json").is_file():
        pytest.fail("the repository ships no model in models/ (model.json): the api would never be ready")
    models = tmp_path_factory.mktemp("models")
    for item in (root / "models").iterdir():
        if item.is_file():
            shutil.copy2(item, models / item.name)
    # The train service runs as TRAIN_UID: our own uid, or the image's user when we are root
    # (the container never runs as root), who then needs to own the folder.
    train_uid = os.getuid() or IMAGE_USER_ID
    if os.getuid() == 0:
        os.chown(models, IMAGE_USER_ID, IMAGE_USER_ID)
    s = Stack(root, models, free_port(), train_uid)
    s.compose("--profile", "train", "down", "-v", "--remove-orphans", "--timeout", "5", check=False)
    try:
        s.timed("build_serve_s", "build", "api", timeout=BUILD_TIMEOUT_S)
        s.timed("up_to_healthy_s", "up", "-d", "--wait", "--wait-timeout", "300", "api", timeout=360)
        yield s
    except BaseException:
        print(s.compose("logs", "--no-color", "--tail", "200", check=False).stdout)
        raise
    finally:
        s.compose("--profile", "train", "down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        for target in ("api", "train"):
            with contextlib.suppress(subprocess.CalledProcessError):
                size = _docker("image", "inspect", "-f", "{{.Size}}", f"{PROJECT}-{target}").strip()
                s.timings[f"image_{target}_bytes"] = int(size)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "container-timings.json").write_text(json.dumps(s.timings, indent=2) + "\n")
        print(f"container timings: {s.timings}")


def _docker_label(image: str, key: str) -> str:
    return json.loads(_docker("image", "inspect", image))[0]["Config"]["Labels"][f"org.opencontainers.image.{key}"]


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _offline_probabilities(model_dir: Path, pixels) -> torch.Tensor:
    model, _ = load_checkpoint(model_dir)
    with torch.inference_mode():
        return torch.softmax(model(pixels_to_input(pixels)), dim=1)


@needs_engine
def test_compose_api_is_healthy_and_answers_real_images_like_the_offline_model(stack, test_set):
    status = _docker("inspect", "-f", "{{.State.Health.Status}}", stack.container_id("api")).strip()
    assert status == "healthy"
    pixels, labels = test_set.data[:SAMPLES], test_set.targets[:SAMPLES]
    expected = _offline_probabilities(stack.models, pixels)
    card = read_card(stack.models)
    correct = 0
    for i in range(SAMPLES):
        response = requests.post(
            f"{stack.url}/predict", data=_png(pixels[i]), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        probabilities = torch.tensor([answer["probabilities"][name] for name in CLASS_NAMES])
        assert torch.allclose(probabilities, expected[i], atol=1e-5), (i, probabilities, expected[i])
        assert answer["class_id"] == int(expected[i].argmax()) and answer["label"] == CLASS_NAMES[answer["class_id"]]
        assert answer["model"]["sha256"] == card["weights"]["sha256"]
        correct += answer["class_id"] == int(labels[i])
    assert correct >= SAMPLES - 3, f"{correct}/{SAMPLES} correct"


@needs_engine
def test_api_container_is_non_root_read_only_and_without_capabilities(stack):
    container = stack.container_id("api")
    config = json.loads(_docker("inspect", container))[0]
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    assert stack.compose("exec", "-T", "api", "id", "-u").stdout.strip() == str(IMAGE_USER_ID)
    status = stack.compose("exec", "-T", "api", "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == str(IMAGE_USER_ID)  # gunicorn itself, not just an exec'd shell
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    for path in ("/app/probe", "/app/models/probe", "/etc/probe"):
        result = stack.compose("exec", "-T", "api", "touch", path, check=False)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, (path, result.stderr)
    assert stack.compose("exec", "-T", "api", "touch", "/tmp/probe").returncode == 0  # the tmpfs


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
    # .dockerignore and the Dockerfile keep tests, caches, venvs and version control out of the image.
    listing = stack.compose("exec", "-T", "api", "find", "/app", "-maxdepth", "2").stdout.split()
    assert sorted(p for p in listing if p.count("/") == 2) == ["/app/fashion", "/app/models", "/app/service"]
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
    png = _png(test_set.data[0])
    deadline, streak = time.monotonic() + 60, 0
    while streak < 6:
        assert time.monotonic() < deadline, "the api still serves the old model 60 s after the retrain"
        answer = requests.post(f"{stack.url}/predict", data=png, headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        streak = streak + 1 if answer.json()["model"]["sha256"] == card["weights"]["sha256"] else 0
        time.sleep(0.2)
    expected = _offline_probabilities(stack.models, test_set.data[:1])[0]
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
    # A second run into the same, now non-empty, folder is refused before anything runs.
    again = subprocess.run(["bash", "scripts/retrain.sh"], cwd=stack.root, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
