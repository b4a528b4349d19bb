"""The service's gunicorn worker: one event loop per process, connections kept alive, and the requests
that are ready at the same moment answered by one pass through the model.

A sync worker answers one request per connection, then closes it, and runs the model once per request.
For one 28x28 image the model's arithmetic is a small part of that pass: reading 2.7 MB of weights and
the code and data of every step back into the caches costs more (``bench_serving.py --stages``, the rows
timed inside whole requests). Here, each poll of the loop hands over every connection with a request
waiting; each request runs in its own greenlet up to the model, where it parks
(``ModelRunner.predict`` -> ``batching.predict``); when every one of them has parked or finished, the
parked inputs go through the model as one batch per served model, and each request resumes with its own
rows and writes its answer. A request alone is a batch of one, with no wait: nothing holds it back to
gather more. A worker that holds more than its share of the server's kept-alive connections closes a
few after their next answer, so that their clients reconnect to a less busy worker (balance.py).

Built on gunicorn's threaded worker (``gthread``: its poller, keep-alive, timeouts, graceful stop), with
the requests run on the loop's own thread instead of a pool, and nothing on that thread that waits on one
client: a new connection waits in the poller for its first bytes, and a connection that ends with bytes
left unread lingers in the poller (RFC 9112 section 9.6) instead of in a blocking read. Like a sync
worker, a client that stops half-way through its request holds the worker until gunicorn's TIMEOUT; the
proxy in front (docker-compose.yml) is what stops those.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import greenlet
from gunicorn.workers.gthread import TConn, ThreadWorker

from service import batching
from service.balance import TABLE, Share
from service.connections import body_read_to_end

# How long a connection that is closing reads on for bytes its client is still sending, at most, and how
# many bytes (gunicorn.util.close_graceful's bounds).
LINGER_SECONDS = 2.0
LINGER_BYTES = 65536
# Connections taken from the listening socket per poll at most, so that requests on new connections (one
# per request through the proxy) are batched too, without one worker taking a whole burst.
ACCEPT_AT_ONCE = 16


class NoPool:
    """Stands in for gthread's thread pool, which this worker does not use."""

    def shutdown(self, wait: bool = True) -> None:
        pass


class BatchingWorker(ThreadWorker):
    """gthread's event loop, each request in a greenlet on the loop's thread, model calls batched per poll."""

    def init_process(self) -> None:
        self.hub = greenlet.getcurrent()
        self.batcher = batching.Batcher(self.hub)
        batching.install(self.batcher)
        self.ready: deque[TConn] = deque()  # connections with a request to serve, found by a request's greenlet
        self.lingering: deque[TConn] = deque()
        self.share = Share(TABLE, TABLE.slot_for(self.age))
        self.to_hand_back = 0  # kept-alive connections to close after their next answer (balance.py)
        super().init_process()

    def get_thread_pool(self) -> NoPool:
        return NoPool()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _closing_unread(self.wsgi)

    # ------------------------------------------------------------------ connections in

    def accept(self, listener: socket.socket) -> None:
        """Every connection waiting (up to ACCEPT_AT_ONCE): those whose first bytes came with them are
        served in this poll, together; the others wait in the poller until they send something (gthread
        would block a thread on each)."""
        for _ in range(ACCEPT_AT_ONCE):
            try:
                client, address = listener.accept()
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            self.nr_conns += 1
            conn = TConn(self.cfg, client, address, listener.getsockname())  # non-blocking until it is served
            try:
                arrived = client.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                arrived = None
            except OSError:
                arrived = b""
            if arrived == b"":  # closed (or reset) before it sent anything
                self.close(conn)
            elif arrived:  # the request came with the connection (a proxy's, or any quick client's)
                conn.data_ready = True
                self.enqueue_req(conn)
            else:
                conn.timeout = time.monotonic() + self.cfg.keepalive
                self.pending_conns.append(conn)
                self.poller.register(client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
            if self.nr_conns >= self.worker_connections:
                return

    def enqueue_req(self, conn: TConn) -> None:
        """Serve the request waiting on ``conn`` in a greenlet of its own, until it parks at the model or ends."""
        if greenlet.getcurrent() is not self.hub:
            self.ready.append(conn)  # found while finishing another request: the loop starts it
            return
        greenlet.greenlet(self.serve, parent=self.hub).switch(conn)

    def serve(self, conn: TConn) -> None:
        # gthread's handle (parse, call the app, write; False when the connection ends), then what
        # gthread's finish_request does with its result, without the thread pool's Future around it.
        self.after_request(conn, self.handle(conn))

    def handle(self, conn: TConn) -> bool:
        """gthread's ``handle``, and like the sync worker's an answer for what it lets through: the
        SystemExit of gunicorn's TIMEOUT abort (the worker is stopped while a client held it), which
        gets gunicorn's 500 (in the service's JSON shape: gunicorn.conf.py) instead of a cut connection."""
        try:
            return super().handle(conn)
        except greenlet.GreenletExit:
            raise
        except BaseException as error:
            self.handle_error(None, conn.sock, conn.client, error)
            return False

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """One poll: start every request that is ready, then answer the ones parked at the model."""
        if self.alive:  # what this worker holds, for the others; whether it holds more than its share
            excess = self.share.excess(self.nr_conns - len(self.lingering), time.monotonic())
            if excess is not None:
                self.to_hand_back = excess
        super().wait_for_and_dispatch_events(timeout)
        self.run_ready()

    def handle_request(self, req: Any, conn: TConn) -> bool:
        """gthread's, with ``Connection: close`` on the answer when this worker hands the connection back
        (balance.py): its client reconnects, and a worker with fewer connections takes it."""
        if self.to_hand_back and getattr(conn, "kept", False):
            self.to_hand_back -= 1
            req.must_close = True
        return super().handle_request(req, conn)

    def run_ready(self) -> None:
        while self.ready or self.batcher.parked:
            while self.ready:
                self.enqueue_req(self.ready.popleft())
            self.batcher.run()

    # ------------------------------------------------------------------ connections out

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """Keep the connection only when its request's body was read to its end, where gthread would read the
        rest here, blocking the loop on the client; otherwise it lingers in the poller (``linger``). The
        backstop of ``_closing_unread``, which has already told such a client the connection ends."""
        return keepalive and body_read_to_end(getattr(conn.parser.mesg, "body", None))

    def after_request(self, conn: TConn, keep: bool) -> None:
        """Back to the poller for its next request, or closed."""
        try:
            if keep and conn.parser.unreader.buf.getvalue():
                self.enqueue_req(conn)  # its next request came with this one
                return
            if keep:
                conn.kept = True
                conn.sock.setblocking(False)
                conn.set_timeout()
                self.keepalived_conns.append(conn)
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))
            else:
                self.linger(conn)
        except Exception:
            self.close(conn)

    def linger(self, conn: TConn) -> None:
        """Close as gunicorn's close_graceful does (FIN, then read on until the client closes, 2 s and 64 KiB
        at most), with the reading done by the poller instead of a blocking read."""
        sock = conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            self.close(conn)
            return
        conn.timeout = time.monotonic() + LINGER_SECONDS
        conn.drained = 0
        if self.drained(conn):
            self.close(conn)
            return
        self.lingering.append(conn)
        self.poller.register(sock, selectors.EVENT_READ, partial(self.on_lingering_readable, conn))

    def drained(self, conn: TConn) -> bool:
        """Read what has arrived; True once the client has closed, the cap is reached or the socket failed."""
        try:
            while conn.drained < LINGER_BYTES:
                data = conn.sock.recv(LINGER_BYTES)
                if not data:
                    return True
                conn.drained += len(data)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    def on_lingering_readable(self, conn: TConn, sock: socket.socket) -> None:
        if self.drained(conn):
            self.poller.unregister(sock)
            self.lingering.remove(conn)
            self.close(conn)

    def close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not self.alive:  # stopping: the other workers stop counting this one
            self.share.leave()

    def murder_pending(self) -> None:
        """gthread's timeouts for connections waiting for their first bytes, and the same for lingering ones."""
        super().murder_pending()
        now = time.monotonic()
        while self.lingering and self.lingering[0].timeout <= now:
            conn = self.lingering.popleft()
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.poller.unregister(conn.sock)
            self.close(conn)


def _closing_unread(app: Callable) -> Callable:
    """``app``, with an answer that starts before its request's body was read to its end announcing
    ``Connection: close`` (a refusal from the headers, such as a 413): the rest of that body is not read
    to keep the connection, so the connection ends and the client is told so."""

    def unread_closes(environ: dict, start_response: Callable) -> Any:
        body = environ.get("wsgi.input")  # gunicorn's Body (the app may put a copy of what it read in its place)

        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            if not body_read_to_end(body):
                start_response.__self__.force_close()  # gunicorn's Response, before its headers are written
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return unread_closes
