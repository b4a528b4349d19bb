"""The service's worker (service/worker.py) and its batching of requests that reach the model together
(service/batching.py): in process with greenlets, then through the real gunicorn."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import greenlet
import numpy as np
import pytest
import requests
import torch

from fashion.contract import pixel_rows_to_input
from service import balance, batching
from service.model import ModelRunner
from testing.attacks import raw_post, read_answer
from testing.images import png
from testing.metrics import value

PNG = {"Content-Type": "image/png"}

# ------------------------------------------------------------------ in process


@pytest.fixture
def runner(bundled_model_dir):
    runner = ModelRunner(bundled_model_dir)
    runner.load()
    return runner


@pytest.fixture
def batcher():
    """A Batcher whose loop is the test itself (this greenlet), installed for the test only."""
    batcher = batching.Batcher(greenlet.getcurrent())
    batching.install(batcher)
    yield batcher
    batching.install(None)


def inputs_of(test_set, start: int, count: int) -> torch.Tensor:
    return pixel_rows_to_input([test_set.data[i].numpy().tobytes() for i in range(start, start + count)])


def park_all(runner, model, batches) -> list:
    """Start one request greenlet per batch; each calls ``runner.predict`` and parks. Their outcomes,
    filled in as they resume."""
    outcomes: list = [None] * len(batches)

    def request(index, batch):
        try:
            outcomes[index] = runner.predict(model, batch)
        except Exception as error:
            outcomes[index] = error

    hub = greenlet.getcurrent()
    for index, batch in enumerate(batches):
        greenlet.greenlet(request, parent=hub).switch(index, batch)
    return outcomes


def test_requests_parked_together_get_their_own_rows_from_one_forward_pass(runner, batcher, test_set):
    model = runner.current
    batches = [inputs_of(test_set, 0, 1), inputs_of(test_set, 1, 3), inputs_of(test_set, 4, 2)]
    alone = [runner.predict_now(model, batch) for batch in batches]  # the loop itself never parks

    outcomes = park_all(runner, model, batches)
    assert outcomes == [None, None, None] and len(batcher.parked) == 3  # all waiting for the model
    batcher.run()

    assert (batcher.passes, batcher.rows) == (1, 6)
    for verdicts, own, batch in zip(outcomes, alone, batches, strict=True):
        assert verdicts.probabilities.shape == (len(batch), 10)
        torch.testing.assert_close(verdicts.probabilities, own.probabilities, rtol=0, atol=1e-6)
        np.testing.assert_allclose(verdicts.calibrated, own.calibrated, rtol=0, atol=1e-6)
        assert verdicts.reasons == own.reasons
        assert torch.equal(verdicts.probabilities.argmax(1), own.probabilities.argmax(1))


def test_batches_are_bounded_in_rows_and_split_by_row_shape(runner, batcher, test_set, monkeypatch):
    monkeypatch.setattr(batching, "MAX_BATCH_ROWS", 4)
    model = runner.current
    images = [inputs_of(test_set, i, 2) for i in range(0, 8, 2)]  # 4 requests of 2 rows: 2 passes of 4
    flat = inputs_of(test_set, 8, 1).reshape(1, 784)  # rows of another shape go through a pass of their own
    outcomes = park_all(runner, model, [*images, flat])
    batcher.run()
    assert (batcher.passes, batcher.rows) == (3, 9)
    for verdicts, batch in zip(outcomes, [*images, flat], strict=True):
        assert len(verdicts.calibrated) == len(batch)


def test_a_failed_forward_pass_is_raised_in_every_request_of_its_batch(runner, batcher, test_set, monkeypatch):
    def failing(model, batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "predict_now", failing)
    outcomes = park_all(runner, runner.current, [inputs_of(test_set, 0, 1), inputs_of(test_set, 1, 1)])
    batcher.run()
    assert [str(outcome) for outcome in outcomes] == ["out of memory", "out of memory"]
    assert batcher.passes == 0


def test_outside_a_worker_predict_calls_the_model_directly(runner, test_set):
    batching.install(None)
    verdicts = runner.predict(runner.current, inputs_of(test_set, 0, 2))
    assert len(verdicts.calibrated) == 2


def test_a_worker_hands_back_what_it_holds_above_an_even_share():
    table = balance.ConnectionTable(slots=8)
    mine, other = balance.Share(table, 1), balance.Share(table, 2)
    assert mine.excess(20, now=100.0) == 0  # alone: nothing to compare with
    other.excess(12, now=100.0)
    assert mine.excess(20, now=100.005) is None  # judged 5 ms ago
    assert mine.excess(20, now=100.02) == 20 - 16 - balance.SLACK  # 32 held between two: 16 each
    assert mine.excess(17, now=100.05) is None  # settling while its clients reconnect
    other.excess(15, now=100.1)  # the three reconnected to the other worker
    assert mine.excess(17, now=100.2) == 0  # within the slack of 16
    assert other.excess(15, now=100.2) == 0  # fewer than its share: keeps them all

    assert mine.excess(30, now=100.2 + balance.STALE_SECONDS + 0.5) == 0  # the other's loop stopped
    other.excess(2, now=200.0)
    other.leave()  # stopping
    assert mine.excess(30, now=200.1) == 0


# ------------------------------------------------------------------ through gunicorn


def batch_sizes(server) -> tuple[float, float]:
    """(forward passes, passes of one image) from the server's /metrics."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    passes = value(text, "fashion_inference_batch_size_count")
    return passes, value(text, "fashion_inference_batch_size_bucket", le="1.0")


@pytest.fixture
def one_worker(start_gunicorn, bundled_model_dir):
    return start_gunicorn(bundled_model_dir, workers=1)


def test_a_connection_is_kept_for_the_next_request(one_worker, test_set):
    connection = http.client.HTTPConnection("127.0.0.1", one_worker.port, timeout=10)
    try:
        for image in test_set.data.numpy()[:3]:
            connection.request("POST", "/predict", body=png(image), headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            assert response.status == 200
            assert response.getheader("Connection", "").lower() != "close"
            response.read()
        assert connection.sock is not None  # still the first connection: http.client reconnects silently
    finally:
        connection.close()


def test_pipelined_requests_on_one_connection_are_answered_in_order(one_worker, test_set):
    """Requests sent back to back before any answer (HTTP/1.1 pipelining): the next one is already read
    when the first is answered, and the loop serves it from there."""
    images = [png(image) for image in test_set.data.numpy()[:3]]
    alone = [requests.post(one_worker.url + "/predict", data=image, headers=PNG, timeout=10).json() for image in images]
    with socket.create_connection(("127.0.0.1", one_worker.port), timeout=10) as sock:
        sock.sendall(b"".join(raw_post("/predict", image) for image in images))
        stream = sock.makefile("rb")  # one buffer for all the answers: a read may reach into the next one
        for own in alone:
            assert stream.readline().startswith(b"HTTP/1.1 200 ")
            headers = dict(line.decode().split(":", 1) for line in iter(stream.readline, b"\r\n"))
            body = stream.read(int(headers["Content-Length"]))
            assert json.loads(body)["label"] == own["label"]


def test_concurrent_requests_are_answered_as_alone_in_fewer_forward_passes(one_worker, test_set):
    """Clients posting at the same moment get the answers they get one at a time, and the worker runs
    them through the model together: some forward pass had more than one image. Concurrency is up to
    the scheduler, so the clients try again (ten rounds at most) until that happened once."""
    images = [png(image) for image in test_set.data.numpy()[:12]]
    alone = [requests.post(one_worker.url + "/predict", data=image, headers=PNG, timeout=10).json() for image in images]

    # Every other client through Flask (a percent-encoded option), each asking for its own top_k: a request
    # parked at the model while others run must keep its own request context.
    paths = [f"/predict?top_k=%3{index % 5 + 1}" if index % 2 else "/predict" for index in range(len(images))]

    def post_all() -> list:
        start = threading.Barrier(len(images))
        answers: list = [None] * len(images)

        def client(index: int) -> None:
            with socket.create_connection(("127.0.0.1", one_worker.port), timeout=10) as sock:
                start.wait()
                sock.sendall(raw_post(paths[index], images[index]))
                answers[index] = read_answer(sock)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    for _round in range(10):
        passes_before, ones_before = batch_sizes(one_worker)
        answers = post_all()
        passes, ones = batch_sizes(one_worker)
        for index, (answer, own) in enumerate(zip(answers, alone, strict=True)):
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            got = json.loads(body)
            assert (got["label"], got["uncertain"]) == (own["label"], own["uncertain"])
            assert len(got.get("top_k", ())) == (index % 5 + 1 if index % 2 else 0)
            np.testing.assert_allclose(
                list(got["probabilities"].values()), list(own["probabilities"].values()), rtol=0, atol=1e-6
            )
        if passes - passes_before < len(images):
            break
    assert passes - passes_before < len(images), "every request had a forward pass of its own in ten rounds"
    assert passes - passes_before > ones - ones_before  # at least one pass of several images


def test_connections_that_send_nothing_do_not_hold_the_worker(start_gunicorn, bundled_model_dir, test_set):
    """A sync worker would wait on the first silent connection; here they wait in the poller, the other
    clients are answered, and the silent ones are closed after the keep-alive time."""
    server = start_gunicorn(bundled_model_dir, workers=1, env={"GUNICORN_CMD_ARGS": "--keep-alive 1"})
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        answer = requests.post(server.url + "/predict", data=png(test_set.data.numpy()[0]), headers=PNG, timeout=10)
        assert answer.status_code == 200
        for sock in silent:
            assert sock.recv(1) == b""  # closed by the server (within the 10 s timeout, or recv raises)
    finally:
        for sock in silent:
            sock.close()


def test_kept_alive_connections_are_shared_between_the_workers(start_gunicorn, bundled_model_dir, test_set):
    """32 clients connecting at once and posting again as soon as they are answered, on the same connection
    unless told ``Connection: close`` (wrk, a client's pool): after a second, each of the two workers
    holds about half of the connections. Left to the kernel, whichever worker was awake took most of a
    burst, up to all 32, and kept them (service/balance.py)."""
    server = start_gunicorn(bundled_model_dir, workers=2)
    deadline = time.monotonic() + 60
    while server.log_text().count('"serving model') < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # both workers have loaded the model and are about to poll
    time.sleep(1.0)
    body = raw_post("/predict", png(test_set.data.numpy()[0]))

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=10)

    def post_on_all(clients: list) -> int:
        """One request on every connection; a connection the server closes is replaced. How many were."""
        for sock in clients:
            sock.sendall(body)
        replaced = 0
        for index, sock in enumerate(clients):
            head = read_answer(sock).split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 200 ")
            if b"\r\nconnection: close" in head:
                sock.close()
                clients[index] = connect()
                replaced += 1
        return replaced

    for _burst in range(3):
        clients = [connect() for _ in range(32)]
        try:
            end = time.monotonic() + 1.0
            rounds = 0
            while time.monotonic() < end and rounds < 500:
                post_on_all(clients)
                rounds += 1
            for _last in range(10):  # until every connection has been answered and kept
                if not post_on_all(clients):
                    break
            held = server.connections_per_worker()
        finally:
            for sock in clients:
                sock.close()
        assert sum(held) == 32 and held[0] >= 12, f"connections per worker: {held}"
