"""Container health check: exit 0 when the local service answers ``GET /readyz`` with 200, else 1.

The images have no curl, so their HEALTHCHECK runs this with the image's Python: ``python -m
service.healthcheck`` in the api image (the installed package: ``service/__init__.py`` imports the app,
and with it torch, only when ``create_app`` is called), ``python /etc/fashion-proxy/healthcheck.py`` in
the proxy image (a copy of this file: GET /readyz through the proxy). It imports only the standard
library, so a check starts in milliseconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

# Addresses that mean "all interfaces" to a server; a client reaches them on loopback.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
# Under the Dockerfile's HEALTHCHECK --timeout=5s, so a slow answer is reported, not killed.
DEFAULT_TIMEOUT_S = 4.0


def readyz_url(environ: Mapping[str, str]) -> str:
    """The /readyz URL of the service configured by ``HOST`` and ``PORT`` in ``environ``."""
    host = environ.get("HOST", "").strip()
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = environ.get("PORT", "").strip() or "8000"
    return f"http://{host}:{port}/readyz"


def check(url: str, timeout: float) -> tuple[bool, str]:
    """GET ``url``; (True, status) on a 200, else (False, the reason in words)."""
    # No proxies: an http_proxy in the environment must not route a loopback check elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200, f"{response.status} from {url}"
    except urllib.error.HTTPError as error:
        body = error.read(500).decode("utf-8", "replace").strip()
        return False, f"{error.code} from {url}: {body}"
    except OSError as error:  # URLError (refused, unresolvable) and timeouts alike
        reason = getattr(error, "reason", error)
        return False, f"{url} did not answer: {reason}"


def main(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        timeout = float(environ.get("HEALTHCHECK_TIMEOUT", "") or DEFAULT_TIMEOUT_S)
    except ValueError:
        timeout = DEFAULT_TIMEOUT_S
    healthy, message = check(readyz_url(environ), timeout)
    # Docker keeps the output of the last checks: `docker inspect` shows why a container is unhealthy.
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
