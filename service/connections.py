"""Ending a connection as soon as its answer is sent, when nothing the client sent is left unread.

A connection ends with its answer when the client asks for that (``Connection: close``) or when the
request was refused before its body was read (service/worker.py); a sync worker ends every one.
gunicorn then closes it carefully (RFC 9112 section 9.6): it sends its FIN, then
keeps reading until the client closes too, for up to 2 s. Bytes the client is still sending would
otherwise reach a closed socket, and the kernel's reset could destroy the answer before the client
reads it. A client that sent exactly its request has nothing more to send, though, and waiting for its
FIN costs a round trip through the client (under load, until the client's process is scheduled again),
or the full 2 s when the client keeps the connection open: a sync worker takes no other request
meanwhile, and the service's worker keeps the connection in its poller.

So after each answer ``post_request`` (gunicorn's hook of that name) checks what nginx checks
before its own lingering close: the request's body was read to its end, gunicorn holds no bytes
read past the request, and the kernel has none waiting. Then the socket's read side is shut,
which ends the careful close at once; in every other case it lingers as before.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from gunicorn.http.body import EOFReader, LengthReader


def post_request(worker: Any, req: Any, environ: dict, resp: Any) -> None:
    """gunicorn's post_request hook: let the close that follows skip its wait when there is nothing to wait for."""
    try:
        if nothing_left_to_read(req, resp):
            req.unreader.sock.shutdown(socket.SHUT_RD)
    except OSError:  # the client is gone already; gunicorn's close deals with that
        pass


def body_read_to_end(body: Any) -> bool:
    """Whether a request's body (gunicorn's ``Body``, None before one was parsed) was read to its end: its
    Content-Length all read, or none to read. False for a chunked body, whose end is not known here, and
    for one whose reading failed."""
    if body is None or getattr(body, "failed", False):
        return False
    if isinstance(body.reader, LengthReader):
        return body.reader.length == 0
    return isinstance(body.reader, EOFReader)


def nothing_left_to_read(req: Any, resp: Any) -> bool:
    """Whether the connection ends with this complete answer and all the client sent has been read."""
    if resp is None or not resp.headers_sent or not resp.should_close():
        return False  # no answer yet (gunicorn writes its error page next), or a connection kept alive
    if resp.response_length is not None and resp.sent < resp.response_length:
        return False
    if not body_read_to_end(getattr(req, "body", None)):
        return False  # e.g. refused by its Content-Length before it was read: more may come
    unreader = req.unreader
    sock = getattr(unreader, "sock", None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return False
    if unreader.buf.getvalue():
        return False  # bytes past the request (a pipelined one) were read with it
    try:
        waiting = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return not waiting  # b"": the client has closed its side already
