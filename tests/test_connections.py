"""How the real gunicorn ends a connection after its answer (service/connections.py, service/worker.py).

A connection is kept for the next request unless the client asks for it to end (``Connection: close``)
or the request was refused before its body was read. Then a client that sent exactly its request is let
go at once: the worker does not wait for the client to close first. Seen from the client, bytes it sends
after the answer then reach a socket the server has closed, and the kernel answers them with a reset.
Where the client did send more than the server read (a pipelined request, a body refused before it was
read), the worker keeps gunicorn's careful close: it drains what comes, so those late bytes get no reset.
The server keeps idle connections for 30 s here, so a connection that ends within the client's 10 s
timeout was ended by the answer, not by the keep-alive timeout.
"""

from __future__ import annotations

import socket
import time

import pytest

from testing.attacks import raw_post
from testing.server import PROJECT_ROOT

PNG_PATH = PROJECT_ROOT / "examples" / "ankle-boot.png"
# Long enough for a reset to come back over loopback; far shorter than gunicorn's 2 s linger.
SETTLE_S = 0.3


def _exchange(port: int, request: bytes) -> tuple[bytes, int]:
    """Send ``request``, read the answer until the server's FIN, then send a few late bytes;
    (the answer, the socket's pending error afterwards: non-zero when the server reset them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        sock.sendall(b"late bytes")
        time.sleep(SETTLE_S)
        return b"".join(chunks), sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


@pytest.fixture
def server(start_gunicorn, bundled_model_dir):
    env = {"MAX_UPLOAD_BYTES": "65536", "GUNICORN_CMD_ARGS": "--keep-alive 30"}
    return start_gunicorn(bundled_model_dir, env=env, workers=1)


def closing(request: bytes) -> bytes:
    """``request`` with ``Connection: close``: the client wants the connection to end with the answer."""
    line, _, rest = request.partition(b"\r\n")
    return line + b"\r\nConnection: close\r\n" + rest


@pytest.mark.parametrize(
    "request_of",
    [
        pytest.param(lambda png: raw_post("/predict", png), id="predict-fast-path"),
        pytest.param(lambda png: raw_post("/predict?top_k=%33", png), id="predict-through-flask"),
        pytest.param(lambda png: b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", id="get-without-body"),
    ],
)
def test_a_client_that_sent_only_its_request_is_let_go_at_once(server, request_of):
    """Answered by the fast path, through Flask after reading the body, and without a body."""
    png = PNG_PATH.read_bytes()
    answer, error = _exchange(server.port, closing(request_of(png)))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    # The worker closed its socket right after the answer instead of reading on: a reset.
    assert error != 0


def test_bytes_past_the_request_keep_the_careful_close(server):
    png = PNG_PATH.read_bytes()
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer, error = _exchange(server.port, closing(raw_post("/predict", png)) + pipelined)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert error == 0  # the worker drained the late bytes: no reset could cut the answer short


def test_a_body_refused_before_it_was_read_keeps_the_careful_close(server):
    # Over MAX_UPLOAD_BYTES: answered 413 from the Content-Length, with most of the body unsent.
    answer, error = _exchange(server.port, raw_post("/predict", b"\0" * 4096, length=1_000_000))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"\r\nConnection: close\r\n" in answer  # the rest of the body is not read to keep the connection
    assert b'"payload_too_large"' in answer
    assert error == 0
