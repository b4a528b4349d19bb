"""Hostile clients for the front-door tests and benchmarks/bench_proxy.py, all bounded in count and time.

Loopback only: every function takes the host and port of the project's own server or proxy.

    slow = SlowClients("127.0.0.1", 8000, headers=6, bodies=6, seconds=12).start()
    latencies = probe("http://127.0.0.1:8000", png, count=10, interval=1.0)
    outcomes = slow.join()
"""

from __future__ import annotations

import functools
import io
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests
from PIL import Image

BOMB_SIDE = 7_999  # 63,984,001 pixels: just under the default MAX_IMAGE_PIXELS (64,000,000)
BOUNDARY = "fashion-attack-boundary"
# The slow big body: more than the proxy's request buffer (PROXY_BUFFER_BYTES, 64 KiB) is sent at once,
# then the rest trickles.
BIG_BODY = 3 * 1024 * 1024
BIG_BODY_SENT = 3 * 1024 * 1024 // 2


def small_png() -> bytes:
    """A real 28x28 grayscale PNG: the normal client's request."""
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 0).save(buffer, "PNG")
    return buffer.getvalue()


@functools.cache  # seconds of work per call, and the tests and benchmarks ask for it several times
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A PNG of side x side pixels that compresses to a few dozen KB (mostly one colour, a striped band)."""
    image = Image.new("L", (side, side), 0)
    image.paste(Image.linear_gradient("L").resize((side, 256)), (0, side // 2))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def multipart(blobs: list[bytes], field_name: str = "image") -> tuple[bytes, str]:
    """A multipart/form-data body with one ``field_name`` part per blob, and its Content-Type."""
    parts = []
    for index, blob in enumerate(blobs):
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{index}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + blob + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def bomb_request(count: int = 64, side: int = BOMB_SIDE) -> tuple[bytes, str]:
    """The issue's request: ``count`` image fields, each a PNG of side x side pixels."""
    return multipart([bomb_png(side)] * count)


@dataclass
class SlowOutcome:
    kind: str  # "header", "body" or "big_body"
    seconds: float  # from connecting until the server answered or closed (or the client gave up)
    answer: bytes  # what the server sent (b"" when it closed without a word)
    gave_up: bool = False  # still connected, unanswered, when the client's ``seconds`` were over


@dataclass
class SlowClients:
    """Connections that send a request one byte (or header line) every ``gap`` seconds.

    ``headers`` of them never finish their headers; ``bodies`` send complete headers announcing a
    1,000-byte body and trickle it; ``big_bodies`` announce BIG_BODY bytes, send the first
    BIG_BODY_SENT of them at once (more than the proxy's 64 KiB buffer) and trickle the rest. Each stops
    after ``seconds`` (gave_up) or when the server answers or closes.
    """

    host: str
    port: int
    headers: int = 0
    bodies: int = 0
    big_bodies: int = 0
    seconds: float = 15.0
    gap: float = 2.0
    outcomes: list[SlowOutcome] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> SlowClients:
        for kind in ["header"] * self.headers + ["body"] * self.bodies + ["big_body"] * self.big_bodies:
            thread = threading.Thread(target=self._run, args=(kind,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def join(self) -> list[SlowOutcome]:
        for thread in self._threads:
            thread.join(self.seconds + 10)
        return self.outcomes

    def _run(self, kind: str) -> None:
        started = time.monotonic()
        answer = b""
        gave_up = False
        try:
            with socket.create_connection((self.host, self.port), timeout=5) as sock:
                head = b"POST /predict HTTP/1.1\r\nHost: attack\r\nContent-Type: image/png\r\n"
                if kind == "header":
                    sock.sendall(head)
                    drip = b"X-Slow: 1\r\n"
                elif kind == "body":
                    sock.sendall(head + b"Content-Length: 1000\r\n\r\n")
                    drip = b"\x00"
                else:
                    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % BIG_BODY + b"\x00" * BIG_BODY_SENT)
                    drip = b"\x00"
                sock.settimeout(self.gap)
                while time.monotonic() - started < self.seconds:
                    try:
                        answer = sock.recv(4096)
                        break  # the server answered (or closed: b"")
                    except TimeoutError:
                        pass
                    try:
                        sock.sendall(drip)
                    except OSError:  # the server closed: read what it said before
                        answer = sock.recv(4096)
                        break
                else:
                    gave_up = True
        except OSError:
            pass
        self.outcomes.append(SlowOutcome(kind, round(time.monotonic() - started, 2), answer, gave_up))


def probe(url: str, png: bytes, count: int, interval: float, timeout: float = 5.0) -> list[tuple[int | None, float]]:
    """``count`` normal /predict requests, ``interval`` apart: (status or None on timeout/error, seconds)."""
    results = []
    for _ in range(count):
        started = time.monotonic()
        try:
            status = requests.post(
                f"{url}/predict", data=png, headers={"Content-Type": "image/png"}, timeout=timeout
            ).status_code
        except requests.RequestException:
            status = None
        results.append((status, round(time.monotonic() - started, 3)))
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return results


def bombs_beside_a_normal_client(
    url: str, bombs: int = 2, normal: int = 5, interval: float = 0.2, timeout: float = 60, normal_timeout: float = 10
) -> tuple[list[requests.Response | requests.RequestException], list[float], list[tuple[int | None, float]]]:
    """``bombs`` copies of ``bomb_request()`` posted at once while ``probe`` sends ``normal`` small requests:
    (the bombs' responses, or the error when one got none, their seconds, the normal client's results)."""
    body, content_type = bomb_request()
    answers: list[requests.Response | requests.RequestException] = []
    elapsed: list[float] = []

    def bomb() -> None:
        started = time.monotonic()
        try:
            answer = requests.post(f"{url}/predict", data=body, headers={"Content-Type": content_type}, timeout=timeout)
        except requests.RequestException as error:  # a server without the budget may never answer
            answer = error
        answers.append(answer)
        elapsed.append(round(time.monotonic() - started, 3))

    threads = [threading.Thread(target=bomb) for _ in range(bombs)]
    for thread in threads:
        thread.start()
    results = probe(url, small_png(), count=normal, interval=interval, timeout=normal_timeout)
    for thread in threads:
        thread.join(timeout + 30)
    return answers, elapsed, results


def hold_connections(host: str, port: int, count: int, seconds: float = 5.0) -> Counter:
    """Open ``count`` connections from one address at once, send a GET on each, and tally the answers.

    Returns a Counter of status codes (``"closed"`` when the server closed without answering,
    ``"refused"`` when the connection could not be made, ``"silent"`` when nothing came in ``seconds``).
    """
    tally: Counter = Counter()
    sockets = []
    try:
        for _ in range(count):
            try:
                sockets.append(socket.create_connection((host, port), timeout=5))
            except OSError:
                tally["refused"] += 1
        for sock in sockets:
            # Keep-alive, so the connections stay open while the others are counted.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: attack\r\n\r\n")
        deadline = time.monotonic() + seconds
        for sock in sockets:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                head = sock.recv(64)
            except (TimeoutError, OSError):
                tally["silent"] += 1
                continue
            tally[int(head.split()[1]) if head.startswith(b"HTTP/") else "closed"] += 1
    finally:
        for sock in sockets:
            sock.close()
    return tally


def next_client_beside_held_connections(
    host: str, port: int, holders: int, rounds: int = 5, timeout: float = 10.0
) -> list[float]:
    """``holders`` clients each post a small PNG, read the whole answer and keep the connection open;
    then another client posts one. Its seconds to the answer, per round (the holders close in between).

    A sync worker that waits for each client to close after its answer is held by every such client."""
    request = raw_post("/predict", small_png())
    waits = []
    for _ in range(rounds):
        held = [socket.create_connection((host, port), timeout=timeout) for _ in range(holders)]
        try:
            for sock in held:
                sock.sendall(request)
                read_answer(sock)
            started = time.monotonic()
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.sendall(request)
                read_answer(sock)
            waits.append(round(time.monotonic() - started, 4))
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.1)
    return waits


def raw_post(path: str, body: bytes, content_type: str = "image/png", length: int | None = None) -> bytes:
    """An HTTP/1.1 POST of ``body`` as bytes to send on a socket; ``length``: another Content-Length to declare."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def read_answer(sock: socket.socket) -> bytes:
    """One answer's head and its Content-Length body from ``sock``, without waiting for the connection to end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed without a complete answer head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:] if line.lower().startswith(b"content-length:")
    ]
    if len(lengths) != 1:
        raise ConnectionError(f"the answer has {len(lengths)} Content-Length headers, not one: {head[:200]!r}")
    (length,) = lengths
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed before the answer's body was complete")
        body += chunk
    return head + b"\r\n\r\n" + body
