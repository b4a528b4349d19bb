"""What a newcomer meets first: a taken port explained in one line, not after 5 s of gunicorn's retries."""

from __future__ import annotations

import socket
import subprocess

import pytest

from testing.server import gunicorn_command, server_env


@pytest.mark.cli
def test_a_taken_port_stops_the_server_at_once_with_a_hint(bundled_model_dir):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = subprocess.run(
            gunicorn_command(),
            env=server_env(bundled_model_dir, port, workers=1),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert f"make serve PORT={port + 1}" in result.stderr
    # Not gunicorn's own five retries, one second apart.
    assert "Retrying in 1 second" not in result.stderr
