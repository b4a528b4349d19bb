"""The front door for real: `docker compose up` with two api replicas behind the proxy, under attack.

Hostile clients (testing/attacks.py) on loopback, every loop bounded in count and time: slow headers
and slow bodies, small and beyond the proxy's 64 KiB buffer (more of them than there are workers),
late bodies, the 64-image decompression bomb, a 20 MB body, 500 connections from one address; then
replicas stopped, added and restarted under load.
Latencies are printed, not asserted to the millisecond; a hung service would miss the generous bounds.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
import requests
from PIL import Image

from testing.attacks import (
    SlowClients,
    SlowOutcome,
    bombs_beside_a_normal_client,
    hold_connections,
    multipart,
    probe,
    small_png,
)
from testing.containers import docker, needs_engine, running_stack

REPLICAS = 2
WORKERS = 2  # per replica: 4 workers in all
CONN_PER_IP = 64


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"API_REPLICAS": str(REPLICAS), "WORKERS": str(WORKERS), "PROXY_CONN_PER_IP": str(CONN_PER_IP)}
    with running_stack(tmp_path_factory, "proxy", env) as s:
        yield s


def _json_error(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"status", "code", "message"} and error["status"] == response.status_code
    return error


def _json_408(outcome: SlowOutcome) -> None:
    """The slow client was answered the proxy's JSON 408 (read from the raw socket)."""
    head, _, body = outcome.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), outcome
    assert b"content-type: application/json" in head.lower(), outcome
    error = json.loads(body)["error"]
    assert error == {"status": 408, "code": "request_timeout", "message": error["message"]}, outcome


def container_logs(container: str) -> list[str]:
    result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).splitlines()


def _predictions_per_replica(stack) -> dict[str, int]:
    """Answered POST /predict lines in each api container's access log."""
    counts = {}
    for container in stack.container_ids("api"):
        lines = container_logs(container)
        counts[container[:12]] = sum('"path":"/predict"' in line and '"status":200' in line for line in lines)
    return counts


class Load:
    """``threads`` clients posting a real PNG back to back until stopped (at most ``seconds``)."""

    def __init__(self, url: str, threads: int = 4, seconds: float = 60):
        self.url, self.seconds = url, seconds
        self.statuses: Counter = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self._png = small_png()

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                response = requests.post(
                    f"{self.url}/predict", data=self._png, headers={"Content-Type": "image/png"}, timeout=60
                )
                self.statuses[response.status_code] += 1
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
            except requests.RequestException as error:
                self.statuses["error"] += 1
                self.failures.append(repr(error)[:200])

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


@needs_engine
def test_slow_clients_do_not_hold_workers(stack):
    """12 connections trickling headers, small bodies or bodies past the proxy's 64 KiB buffer (4 sync
    workers in all): a normal client is answered within 1 s all along."""
    slow = SlowClients("127.0.0.1", stack.port, headers=4, bodies=4, big_bodies=4, seconds=16).start()
    time.sleep(1)
    answers = probe(stack.url, small_png(), count=12, interval=1.0, timeout=5)
    outcomes = slow.join()
    print(f"normal client during the attack: {answers}")
    print(f"slow clients: {[(o.kind, o.seconds, o.gave_up, o.answer[:40]) for o in outcomes]}")
    assert [status for status, _ in answers] == [200] * len(answers)
    assert max(seconds for _, seconds in answers) < 1
    assert len(outcomes) == 12
    for outcome in outcomes:
        assert b"<html" not in outcome.answer.lower(), outcome
        if outcome.kind == "header":
            # Headers not complete within the proxy's request timeout (10 s): closed without a word
            # (HAProxy's parser could only send its HTML page; README, "The front door").
            assert outcome.answer == b"" and not outcome.gave_up and outcome.seconds < 14, outcome
        elif outcome.kind == "body":
            # A body that fits the buffer, not complete 10 s after the headers: JSON 408.
            assert outcome.seconds < 14, outcome
            _json_408(outcome)
        else:
            # A byte every 2 s after 1.5 MB: nginx keeps spooling it (no 10 s gap), so it is still
            # connected when it gives up; it never held a worker (the normal client's answers above).
            assert outcome.gave_up and outcome.answer == b"", outcome


@needs_engine
def test_late_bodies_get_a_json_408_and_large_uploads_are_spooled_whole(stack):
    # A 13 s pause in a small body (read by HAProxy) and in one past the 64 KiB buffer (spooled by nginx): JSON 408.
    late = SlowClients("127.0.0.1", stack.port, bodies=1, big_bodies=1, gap=13, seconds=20).start()
    # Meanwhile a batch of 3 noisy 700x700 PNGs (1.5 MB: through the spool) is answered like any other.
    pngs = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.frombytes("L", (700, 700), os.urandom(700 * 700)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    body, content_type = multipart(pngs)
    assert len(body) > 1024 * 1024
    response = requests.post(
        f"{stack.url}/predict", data=body, headers={"Content-Type": content_type, "X-Request-ID": "big-1"}, timeout=60
    )
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["predictions"]) == 3 and response.headers["X-Request-ID"] == "big-1"
    # A chunked body (no Content-Length for HAProxy to check) over MAX_UPLOAD_BYTES: nginx's JSON 413.
    chunks = (b"\0" * (1024 * 1024) for _ in range(20))
    response = requests.post(f"{stack.url}/predict", data=chunks, headers={"Content-Type": "image/png"}, timeout=60)
    assert response.status_code == 413 and _json_error(response)["code"] == "payload_too_large"

    outcomes = late.join()
    print(f"late bodies: {[(o.kind, o.seconds, o.answer[:40]) for o in outcomes]}")
    assert sorted(o.kind for o in outcomes) == ["big_body", "body"]
    for outcome in outcomes:
        assert 9 < outcome.seconds < 13, outcome
        _json_408(outcome)
    logs = "\n".join(container_logs(stack.container_id("proxy")))
    assert '"frontend":"spooled","request_id":"big-1"' in logs and '"server":"spool/spool"' in logs


@needs_engine
def test_the_bomb_request_is_refused_with_json_while_the_service_keeps_answering(stack):
    answers, elapsed, normal = bombs_beside_a_normal_client(stack.url, bombs=2, normal=5, interval=0.3)
    print(f"bombs answered in {elapsed} s; normal client meanwhile: {normal}")
    assert [status for status, _ in normal] == [200] * 5
    for response in answers:
        assert isinstance(response, requests.Response), response
        assert response.status_code == 413, response.text[:300]
        assert _json_error(response)["code"] == "request_too_large"


@needs_engine
def test_a_20_mb_body_is_refused_by_the_proxy_with_json(stack):
    started = time.monotonic()
    response = requests.post(
        f"{stack.url}/predict", data=b"\0" * (20 * 1024 * 1024), headers={"Content-Type": "image/png"}, timeout=60
    )
    print(f"20 MB body answered {response.status_code} in {time.monotonic() - started:.3f} s")
    assert response.status_code == 413
    assert _json_error(response)["code"] == "payload_too_large"
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["X-Request-ID"])


@needs_engine
def test_500_connections_from_one_address_get_json_429_beyond_the_cap(stack):
    tally = hold_connections("127.0.0.1", stack.port, 500, seconds=15)
    print(f"500 connections from one address: {dict(tally)}")
    assert tally[200] == CONN_PER_IP
    assert tally[429] == 500 - CONN_PER_IP
    # Once they are closed, the same address is served again.
    response = requests.get(f"{stack.url}/readyz", timeout=10)
    assert response.status_code == 200
    # The refusal itself is the service's JSON error shape.
    held = [socket.create_connection(("127.0.0.1", stack.port)) for _ in range(CONN_PER_IP)]
    try:
        # A connect() returns once the kernel (or the engine's port forwarder) has the connection;
        # HAProxy counts it when it accepts it, a moment later. So ask for up to 5 s, until it does.
        deadline = time.monotonic() + 5
        response = requests.get(f"{stack.url}/healthz", timeout=10)
        while response.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            response = requests.get(f"{stack.url}/healthz", timeout=10)
        assert response.status_code == 429 and _json_error(response)["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()


@needs_engine
def test_request_id_passes_through_and_is_set_when_missing(stack):
    png = small_png()
    given = requests.post(
        f"{stack.url}/predict", data=png, headers={"Content-Type": "image/png", "X-Request-ID": "abc-123"}, timeout=30
    )
    assert given.status_code == 200 and given.headers["X-Request-ID"] == "abc-123"
    for headers in ({}, {"X-Request-ID": "not allowed\tchars"}):
        answer = requests.post(
            f"{stack.url}/predict", data=png, headers={"Content-Type": "image/png", **headers}, timeout=30
        )
        assert re.fullmatch(r"[0-9a-f-]{36}", answer.headers["X-Request-ID"]), answer.headers
    # The proxy's log line carries the same id as the answer.
    logs = "\n".join(container_logs(stack.container_id("proxy")))
    assert '"request_id":"abc-123"' in logs


@needs_engine
def test_replicas_share_the_load_fail_over_scale_and_restart_without_losing_a_request(stack):
    proxy_started = docker("inspect", "-f", "{{.State.StartedAt}}", stack.container_id("proxy")).strip()
    # Both replicas get traffic.
    before = _predictions_per_replica(stack)
    assert len(before) == REPLICAS
    with Load(stack.url, threads=4, seconds=30) as load:
        time.sleep(4)
    after = _predictions_per_replica(stack)
    print(f"predictions per replica: {after}; load: {dict(load.statuses)}")
    assert all(after[c] - before[c] >= 10 for c in after), (before, after)
    assert load.failures == []

    # One replica stopped mid-load (SIGTERM to gunicorn, then the container stops): nothing is lost.
    victim = stack.container_ids("api")[0]
    with Load(stack.url, threads=4, seconds=60) as load:
        time.sleep(2)
        docker("stop", victim, timeout=60)
        time.sleep(3)
    print(f"one replica stopped under load: {dict(load.statuses)}")
    assert load.failures == [], load.failures[:5]
    assert sum(load.statuses.values()) > 20

    # Scaled to 3 (the stopped one comes back, plus a new one): the proxy finds them through DNS.
    stack.compose("up", "-d", "--scale", f"api={REPLICAS + 1}", "--no-recreate", "--wait", "api", timeout=300)
    ids = stack.container_ids("api")
    assert len(ids) == REPLICAS + 1
    deadline = time.monotonic() + 60
    counts = {}
    while time.monotonic() < deadline:
        with Load(stack.url, threads=4, seconds=3):
            time.sleep(3)
        counts = _predictions_per_replica(stack)
        new = [c for c in counts if c not in before]
        if new and all(counts[c] > 0 for c in new):
            break
    print(f"after scaling to 3: {counts}")
    assert all(count > 0 for count in counts.values()), counts
    assert docker("inspect", "-f", "{{.State.StartedAt}}", stack.container_id("proxy")).strip() == proxy_started

    # `docker compose restart api` under load: every replica restarts; the proxy waits and retries.
    with Load(stack.url, threads=4, seconds=120) as load:
        time.sleep(2)
        # --timeout as the api's stop_grace_period (35 s): Docker applies it by itself, but podman's Docker
        # API (this engine) kills a container at once on `restart` without it, which cuts answers mid-body.
        stack.compose("restart", "--timeout", "35", "api", timeout=180)
        stack.wait_ready()
        time.sleep(2)
    print(f"restart api under load: {dict(load.statuses)}")
    assert load.failures == [], load.failures[:5]


@needs_engine
def test_without_a_ready_replica_the_proxy_answers_json_503(stack):
    stack.compose("stop", "api", timeout=180)
    try:
        response = requests.post(
            f"{stack.url}/predict", data=small_png(), headers={"Content-Type": "image/png"}, timeout=60
        )
        assert response.status_code == 503
        assert _json_error(response)["code"] == "service_unavailable"
        health = json.loads(docker("inspect", stack.container_id("proxy")))[0]["State"]
        assert health["Running"] is True
    finally:
        stack.compose("start", "api", timeout=180)
