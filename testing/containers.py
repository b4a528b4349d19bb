"""The compose stack for the container tests (test_container.py, test_proxy.py), on the real engine.

The tests run ``docker compose`` on a copy of the repository (the files git knows: what a user's clone
has), with the proxy published on loopback on a free port, a temporary models folder, and the project
``$COMPOSE_TEST_PROJECT`` (default ``fashion-mnist-test``); images are kept so the next run builds from
cache. Without a Docker-compatible engine the tests skip and say what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.server import free_port

REPO = Path(__file__).resolve().parent.parent
PROJECT = os.environ.get("COMPOSE_TEST_PROJECT", "fashion-mnist-test")
ARTIFACTS = REPO / "test-artifacts"
IMAGE_USER_ID = 10001  # the Dockerfile's `app` user
BUILD_TIMEOUT_S = 2400  # a cold build downloads torch (the CUDA wheels from PyPI here: several GB)


def _engine_problem() -> str | None:
    """Why the container tests cannot run here, or None when an engine answers."""
    hint = (
        "install Docker (Engine or Desktop, with the Compose v2 plugin) and start it, or point DOCKER_HOST "
        "at a running Docker-compatible engine (e.g. unix:///run/user/1000/podman/podman.sock)"
    )
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
        return "the docker CLI has no Compose v2 plugin (`docker compose`); install it (docker-compose-plugin)"
    return None


ENGINE_PROBLEM = _engine_problem()


def torch_index_url() -> str:
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


def copy_repository(destination: Path) -> None:
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


def docker(*args: str, timeout: float = 120) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=timeout).stdout


def pyproject_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


class Stack:
    """A compose project on a copy of the repository; ``compose(...)`` runs ``docker compose`` on it."""

    def __init__(self, root: Path, models: Path, port: int, train_uid: int, env: dict[str, str] | None = None):
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
            "TORCH_INDEX_URL": torch_index_url(),
            **(env or {}),
        }
        self.timings: dict[str, float | str] = {"torch_index_url": self.env["TORCH_INDEX_URL"] or "(pip default)"}

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

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def wait_ready(self, seconds: float = 120) -> None:
        """Until /readyz answers 200 through the proxy."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"{self.url}/readyz not ready after {seconds} s")


@contextlib.contextmanager
def running_stack(tmp_path_factory, name: str, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Build the images, ``up --wait`` the api and its proxy, yield the Stack, always tear it down."""
    root = tmp_path_factory.mktemp(f"{name}-repo")
    copy_repository(root)
    if not (root / "models" / "model.json").is_file():
        pytest.fail("the repository ships no model in models/ (model.json): the api would never be ready")
    models = tmp_path_factory.mktemp(f"{name}-models")
    for item in (root / "models").iterdir():
        if item.is_file():
            shutil.copy2(item, models / item.name)
    # The train service runs as TRAIN_UID: our own uid, or the image's user when we are root
    # (the container never runs as root), who then needs to own the folder.
    train_uid = os.getuid() or IMAGE_USER_ID
    if os.getuid() == 0:
        os.chown(models, IMAGE_USER_ID, IMAGE_USER_ID)
    stack = Stack(root, models, free_port(), train_uid, env)
    stack.compose("--profile", "train", "down", "-v", "--remove-orphans", "--timeout", "5", check=False)
    try:
        stack.timed("build_serve_and_proxy_s", "build", "api", "proxy", timeout=BUILD_TIMEOUT_S)
        stack.timed("up_to_healthy_s", "up", "-d", "--wait", "--wait-timeout", "300", "api", "proxy", timeout=360)
        yield stack
    except BaseException:
        print(stack.compose("logs", "--no-color", "--tail", "200", check=False).stdout)
        raise
    finally:
        stack.compose("--profile", "train", "down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        for target in ("api", "train", "proxy"):
            with contextlib.suppress(subprocess.CalledProcessError):
                size = docker("image", "inspect", "-f", "{{.Size}}", f"{PROJECT}-{target}").strip()
                stack.timings[f"image_{target}_bytes"] = int(size)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"container-timings-{name}.json").write_text(json.dumps(stack.timings, indent=2) + "\n")
        print(f"container timings ({name}): {stack.timings}")
