"""The proxy's files without an engine: its error pages are the service's JSON shape, its configs parse."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.config import Settings

PROXY = Path(__file__).resolve().parent.parent / "proxy"
HAPROXY_CONFIG = (PROXY / "haproxy.cfg").read_text()


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
    # Every page is used: the config names it (400 and 408 in the backends; the frontends close silently).
    assert f'errorfile {status} "${{PROXY_HOME}}/errors/{status}.http"' in HAPROXY_CONFIG


def test_no_proxy_refusal_is_left_to_haproxys_html_pages():
    """Every status HAProxy answers by itself has a JSON page or an empty one (a silent close)."""
    named = {int(status) for status in re.findall(r"^\s*errorfile (\d{3}) ", HAPROXY_CONFIG, re.M)}
    assert {400, 403, 408, 413, 429, 500, 501, 502, 503, 504} <= named
    # The frontends' parser (slow or unparsable headers) can only send HAProxy's HTML page or nothing.
    defaults = HAPROXY_CONFIG.split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0]
    assert "errorfile 400 /dev/null" in defaults and "errorfile 408 /dev/null" in defaults


def test_entrypoint_defaults_are_the_services_own():
    entrypoint = (PROXY / "entrypoint.sh").read_text()
    assert f': "${{MAX_UPLOAD_BYTES:={Settings.max_upload_bytes}}}"' in entrypoint
    assert f': "${{TIMEOUT:={Settings.timeout}}}"' in entrypoint


def _entrypoint_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROXY / "entrypoint.sh"), "-c"], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("nginx") is None,
    reason="haproxy or nginx is not installed here (the image has both; apt-get install haproxy nginx)",
)
def test_haproxy_and_nginx_accept_the_configs_with_the_entrypoint_defaults(tmp_path):
    upstream = "127.0.0.1:9"  # resolvable without DNS; -c only checks the config
    env = {
        **os.environ,
        "PROXY_HOME": str(PROXY),
        "PROXY_RUN_DIR": str(tmp_path),
        "PROXY_UPSTREAM": upstream,
        "PROXY_SPARE_UPSTREAM": upstream,
    }
    result = _entrypoint_check(env)
    assert result.returncode == 0, result.stdout + result.stderr
    nginx = (tmp_path / "nginx.conf").read_text()
    assert re.findall(r"@[A-Z_]+@", nginx.split("\n\n", 1)[1]) == [], "a template variable was left unfilled"
    assert f"client_max_body_size {Settings.max_upload_bytes};" in nginx
    # nginx's own refusals are the same JSON bodies as HAProxy's pages.
    errors = (tmp_path / "nginx-errors.conf").read_text()
    body_413 = (PROXY / "errors" / "413.http").read_bytes().partition(b"\r\n\r\n")[2].decode().strip()
    assert f"return 413 '{body_413}';" in errors

    bad = _entrypoint_check({**env, "WORKERS": "two"})
    assert bad.returncode == 2 and "WORKERS=two is not a positive integer" in bad.stderr
    bad = _entrypoint_check({**env, "PROXY_REQUESTS_PER_WORKER": "0"})  # HAProxy: maxconn 0 = no limit
    assert bad.returncode == 2 and "PROXY_REQUESTS_PER_WORKER=0 is not a positive integer" in bad.stderr
    # Whole seconds with or without the unit (HAProxy itself would read a bare 10 as 10 ms).
    bare = _entrypoint_check({**env, "PROXY_REQUEST_TIMEOUT": "10", "PROXY_DRAIN_TIMEOUT": "45"})
    assert bare.returncode == 0, bare.stdout + bare.stderr
    bad = _entrypoint_check({**env, "PROXY_REQUEST_TIMEOUT": "10m"})
    assert bad.returncode == 2 and "PROXY_REQUEST_TIMEOUT=10m is not a number of seconds" in bad.stderr
