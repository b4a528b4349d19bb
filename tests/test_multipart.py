"""service.multipart.file_parts against werkzeug's own multipart parser on the same bytes: the plain
shapes real clients send must be read by the fast path and give werkzeug's parts; every other
shape must give werkzeug's parts or be left to werkzeug (None)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from urllib3.filepost import encode_multipart_formdata
from werkzeug.formparser import MultiPartParser

from service.multipart import file_parts
from testing.images import png

MAX_PARTS, MAX_FIELD = 1000, 500_000  # Flask's defaults for max_form_parts and max_form_memory_size


def werkzeug_files(body: bytes, boundary: str, field: str = "image") -> list[bytes]:
    parser = MultiPartParser(max_form_memory_size=MAX_FIELD, max_form_parts=MAX_PARTS)
    _form, files = parser.parse(io.BytesIO(body), boundary.encode(), len(body))
    return [file.read() for file in files.getlist(field)]


def fast_files(body: bytes, boundary: str, field: str = "image") -> list[bytes] | None:
    return file_parts(body, boundary, field, MAX_PARTS, MAX_FIELD)


def _images(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [png(np.array([rng.randrange(256) for _ in range(784)]).reshape(28, 28)) for _ in range(count)]


def _by_hand(boundary: str, parts: list[tuple[str, str | None, str | None, bytes]], tail: bytes = b"\r\n") -> bytes:
    """A body the way curl and browsers write one: (name, filename, content type, content) per part."""
    chunks = []
    for name, filename, content_type, content in parts:
        head = f'Content-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"' if filename is not None else ""
        head += f"\r\nContent-Type: {content_type}" if content_type else ""
        chunks.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--".encode() + tail


@pytest.mark.parametrize("seed", range(6))
def test_bodies_from_urllib3_are_read_fast_and_as_werkzeug_reads_them(seed):
    """requests' encoder: random mixes of image files, other files and plain fields."""
    rng = random.Random(seed)
    images = _images(rng.randrange(1, 9), seed)
    fields = [("image", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(images)]
    fields += [("note", "a plain field"), ("other", ("x.bin", b"\x00--\r\n\r\n", "application/octet-stream"))]
    rng.shuffle(fields)
    body, content_type = encode_multipart_formdata(fields)
    boundary = content_type.split("boundary=")[1]
    in_order = [value[1] for name, value in fields if name == "image"]
    assert sorted(in_order) == sorted(images)
    assert fast_files(body, boundary) == werkzeug_files(body, boundary) == in_order


@pytest.mark.parametrize(
    "boundary",
    ["----WebKitFormBoundary7MA4YWxkTrZu0gW", "------------------------d74496d66958873e", "fashionbenchboundary"],
    ids=["chromium", "curl", "bench"],
)
def test_browser_and_curl_shapes_are_read_fast(boundary):
    images = _images(3, 1)
    parts = [
        ("image", "a.png", "image/png", images[0]),
        ("image", "b.png", None, images[1]),
        ("top_k", None, None, b"3"),
        ("image", "c d.png", "image/png", images[2]),
    ]
    body = _by_hand(boundary, parts)
    assert fast_files(body, boundary) == werkzeug_files(body, boundary) == images


def _odd_bodies() -> dict[str, tuple[bytes, str]]:
    boundary, (one, two) = "xyzzy", _images(2, 2)
    plain = _by_hand(boundary, [("image", "a.png", "image/png", one), ("image", "b.png", "image/png", two)])
    return {
        "preamble": (b"preamble text\r\n" + plain, boundary),
        "bare LF line breaks": (plain.replace(b"\r\n", b"\n"), boundary),
        "padded delimiter line": (plain.replace(b"--xyzzy\r\n", b"--xyzzy  \r\n", 1), boundary),
        "boundary inside the data": (
            _by_hand(boundary, [("image", "a.png", None, one + b"\r\n--xyzzy" + two)]),
            boundary,
        ),
        "folded header": (plain.replace(b'; filename="a.png"', b';\r\n filename="a.png"', 1), boundary),
        "another header": (
            plain.replace(b"Content-Type", b"Content-Transfer-Encoding: binary\r\nContent-Type", 1),
            boundary,
        ),
        "no filename": (_by_hand(boundary, [("image", None, "image/png", one)]), boundary),
        "empty filename": (_by_hand(boundary, [("image", "", "image/png", one)]), boundary),
        "escaped quote in the name": (plain.replace(b'name="image"', b'name="im\\"age"', 1), boundary),
        "unquoted name": (plain.replace(b'name="image"', b"name=image", 1), boundary),
        "filename* (RFC 5987)": (plain.replace(b'filename="a.png"', b"filename*=UTF-8''a%20b.png", 1), boundary),
        "percent in the filename": (plain.replace(b'filename="a.png"', b'filename="a%22.png"', 1), boundary),
        "epilogue": (plain + b"epilogue", boundary),
        "no close delimiter": (plain[: plain.rindex(b"--xyzzy--")], boundary),
        "no parts": (b"--xyzzy--\r\n", boundary),
        "two dispositions": (
            plain.replace(b"Content-Type: image/png", b'Content-Disposition: form-data; name="x"', 1),
            boundary,
        ),
        "no headers": (b"--xyzzy\r\n\r\n" + one + b"\r\n--xyzzy--\r\n", boundary),
        "lower-case header names": (plain.replace(b"Content-Disposition", b"content-disposition"), boundary),
        "name differs in case": (plain.replace(b'name="image"', b'name="Image"', 1), boundary),
        "other boundary": (plain, "xyzzz"),
        "boundary with a space": (plain.replace(b"xyzzy", b"xy zy"), "xy zy"),
        "too many parts": (_by_hand(boundary, [("f", None, None, b"x")] * (MAX_PARTS + 1)), boundary),
        "large plain field": (_by_hand(boundary, [("note", None, None, b"x" * (MAX_FIELD + 1))]), boundary),
    }


@pytest.mark.parametrize("name", list(_odd_bodies()))
def test_odd_bodies_are_read_as_werkzeug_reads_them_or_left_to_it(name):
    body, boundary = _odd_bodies()[name]
    fast = fast_files(body, boundary)
    if fast is not None:
        assert fast == werkzeug_files(body, boundary)


def test_the_shapes_werkzeug_must_decide_are_left_to_it():
    """The fast path declines where its reading could differ from werkzeug's (so the test above is not
    passing by declining everything, nor by reading these wrongly)."""
    bodies = _odd_bodies()
    declined = {name for name, (body, boundary) in bodies.items() if fast_files(body, boundary) is None}
    assert declined >= {
        "preamble",
        "bare LF line breaks",
        "padded delimiter line",
        "boundary inside the data",
        "folded header",
        "another header",
        "empty filename",
        "escaped quote in the name",
        "filename* (RFC 5987)",
        "too many parts",
        "large plain field",
        "no close delimiter",
    }
    assert fast_files(*bodies["lower-case header names"]) is not None
    assert fast_files(*bodies["no filename"]) == []  # a plain field named image is not a file, as for werkzeug
    assert fast_files(*bodies["name differs in case"]) is not None
