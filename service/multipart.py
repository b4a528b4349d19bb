"""The file parts of a multipart/form-data body, read with a few bytes operations.

werkzeug's parser reads every legal shape of a form (and many illegal ones) as a stream of events,
in Python, a few calls per part; for a batch of 64 small images that was about 40% of the
request's CPU. The clients people use (curl -F, requests, browsers' FormData, this service's page)
all send the plainest shape: the body starts with the delimiter line; parts are separated by
CRLF "--boundary" CRLF; each part has a ``Content-Disposition: form-data; name="..."`` header,
with ``; filename="..."`` for a file, and at most a ``Content-Type`` beside it; the close
delimiter ends the body. ``file_parts`` reads that shape and answers None for anything else
(a preamble, bare LF line breaks, folded or other headers, the boundary inside a part, too many
parts, a large non-file field), and the caller then lets werkzeug parse the same bytes, with its
own answers and refusals. When it answers, it gives what werkzeug gives: tests compare both on
bodies made by several encoders and on hand-made odd ones.
"""

from __future__ import annotations

import re

# name="..." and an optional non-empty filename="...", quoted, without the characters that need
# unescaping or percent-decoding (werkzeug's parse_options_header would decode them): anything
# fancier is left to werkzeug.
_DISPOSITION = re.compile(rb'form-data; name="([A-Za-z0-9_.\-\[\]]+)"(; filename="[^"\\\r\n%]+")?')
# RFC 2046's boundary characters, 1 to 70 of them, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_CONTENT_TYPE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+/[!#$%&'*+.^_`|~0-9A-Za-z\-]+(; ?[ -~]*)?")


def file_parts(
    body: bytes, boundary: str, field: str, max_parts: int | None, max_field_bytes: int | None
) -> list[bytes] | None:
    """The contents of the file parts named ``field`` in ``body``, in order; None when the body is
    not in the plain shape (see the module's docstring) and werkzeug must decide.

    ``max_parts`` and ``max_field_bytes`` are the request's ``max_form_parts`` and
    ``max_form_memory_size``: a body werkzeug would refuse for them is left to werkzeug.
    """
    if not _BOUNDARY.fullmatch(boundary):
        return None
    delimiter = b"--" + boundary.encode("ascii")
    close = b"\r\n" + delimiter + b"--"
    end = body.rfind(close)
    if not body.startswith(delimiter + b"\r\n") or end < 0 or body[end + len(close) :] not in (b"", b"\r\n"):
        return None
    segments = body[len(delimiter) + 2 : end].split(b"\r\n" + delimiter + b"\r\n")
    if max_parts is not None and len(segments) > max_parts:
        return None
    wanted, files = field.encode("ascii", "replace"), []
    for segment in segments:
        # The boundary anywhere else (a padded delimiter line, bare LF line breaks, a client's
        # boundary that occurs in its data) is a shape werkzeug reads its own way.
        if delimiter in segment:
            return None
        head, separator, content = segment.partition(b"\r\n\r\n")
        if not separator:
            return None
        disposition = None
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            name, value = name.lower(), value.strip(b" \t")
            if not colon or name != name.strip() or not value:
                return None
            if name == b"content-disposition" and disposition is None:
                disposition = _DISPOSITION.fullmatch(value)
                if disposition is None:
                    return None
            elif name != b"content-type" or not _CONTENT_TYPE.fullmatch(value):
                return None
        if disposition is None:
            return None
        is_file = disposition.group(2) is not None
        if not is_file and max_field_bytes is not None and len(content) > max_field_bytes:
            return None
        if is_file and disposition.group(1) == wanted:
            files.append(content)
    return files
