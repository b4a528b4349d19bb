"""The proxy's files without an engine: its error pages are the service's JSON shape, its config parses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"


@pytest.mark.parametrize("page", sorted(PROXY.glob("errors/*.http")), ids=lambda p: p.stem)
def test_error_pages_are_complete_json_responses(page):
    head, _, body = page.read_bytes().partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    status = int(lines[0].split()[1])
    assert lines[0].startswith("HTTP/1.1 ") and status == int(page.stem)
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"status", "code", "message"} and error["status"] == status
    # Every page the config names exists (400 and 408 are closed silently: /dev/null).
    assert f'errorfile {status} "${{PROXY_HOME}}/errors/{status}.http"' in (PROXY / "haproxy.cfg").read_text()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed here (the image has it)")
def test_haproxy_accepts_the_config_with_the_entrypoint_defaults():
    upstream = "127.0.0.1:9"  # resolvable without DNS; -c only checks the config
    env = {**os.environ, "PROXY_HOME": str(PROXY), "PROXY_UPSTREAM": upstream, "PROXY_SPARE_UPSTREAM": upstream}
    result = subprocess.run([str(PROXY / "entrypoint.sh"), "-c"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = subprocess.run(
        [str(PROXY / "entrypoint.sh"), "-c"], env={**env, "WORKERS": "two"}, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "WORKERS=two is not a positive integer" in bad.stderr
