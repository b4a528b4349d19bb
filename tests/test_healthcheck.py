"""The containers' health check (service/healthcheck.py, also the proxy image's), against real HTTP servers."""

from __future__ import annotations

import contextlib
import http.server
import threading

from service import healthcheck
from testing.server import free_port


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
