"""Safe decoding of untrusted image bytes, shared by the service and the folder data set.

Every size check is made from the headers, before a pixel is decompressed: one image may not exceed
``max_pixels`` (MAX_IMAGE_PIXELS), and all the images of one request together may not materialise
more than ``max_request_pixels`` (MAX_REQUEST_PIXELS). Decoding then materialises no more pixels than
preprocessing needs: a JPEG is decoded at a reduced DCT scale (Pillow's draft mode), any other large
image is reduced right after decoding, before the colour conversion and the crop run on it. The model
sees 28x28, so an edge of ``DECODE_EDGE`` pixels keeps every detail the crop can use.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

# The formats we decode, each with the Content-Types clients send it as (the usual one first, then
# aliases seen in the wild). Anything else Pillow could open (PSD, EPS via Ghostscript, ...) is refused.
MEDIA_TYPES = {
    "PNG": ("image/png",),
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "WEBP": ("image/webp",),
    "GIF": ("image/gif",),
    "BMP": ("image/bmp", "image/x-bmp", "image/x-ms-bmp"),
    "TIFF": ("image/tiff",),
}
ALLOWED_FORMATS = frozenset(MEDIA_TYPES)
# Far above any real product photo (8,000 x 8,000), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000
# All images of one request together, as they will be materialised (a JPEG at its draft scale): one
# full-size photo, or 64 photos of a megapixel each; about 1 s of decoding on one core.
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000
# Large images are decoded or reduced to no less than this many pixels on their longer edge: the crop
# keeps 28 pixels of a garment that covers 1/36 of the edge, with LANCZOS room to spare.
DECODE_EDGE = 1024
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image we refuse; ``status`` and ``code`` say how an HTTP API should report it.

    ``index`` is the position of the image in the request, when it was one of several.
    """

    status = 400
    code = "invalid_image"
    index: int | None = None


class UnsupportedImageFormat(ImageError):
    status = 415
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    status = 413
    code = "image_too_large"


class RequestTooLarge(ImageTooLarge):
    """The images of one request would decode to more pixels than the request's budget."""

    code = "request_too_large"


class DeadlineExceeded(ImageError):
    """The request ran out of time while decoding; an HTTP API answers 503 (try again, or send less)."""

    status = 503
    code = "deadline_exceeded"


# Leading bytes of the allowed formats: a file that starts like one but that Pillow cannot
# identify is a broken image of a format we take (400), not a format we do not take (415).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_allowed_format(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def reduction_factor(width: int, height: int, edge: int = DECODE_EDGE) -> int:
    """The integer factor that shrinks the longer edge as far as possible while keeping it >= ``edge``."""
    return max(1, max(width, height) // edge)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a Pillow image with only its header read, checked against ``max_pixels``.

    A JPEG is switched to the smallest draft scale that keeps ``DECODE_EDGE`` pixels, so ``.size`` is
    already what decoding will materialise.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        if _looks_like_allowed_format(data):
            raise ImageError("the image header is truncated or corrupt") from None
        raise UnsupportedImageFormat(
            f"not an image in a supported format ({', '.join(sorted(ALLOWED_FORMATS))})"
        ) from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above max_pixels by default
        raise ImageTooLarge(f"the image is larger than the limit of {max_pixels:,} pixels") from None
    except Exception:  # Pillow raises many kinds on hostile headers; the kind means nothing to a client
        raise ImageError("the image header cannot be read") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    factor = reduction_factor(width, height)
    if image.format == "JPEG" and factor > 1:
        # Only configures the decoder (scale 1/2, 1/4 or 1/8 of the DCT): nothing is decoded yet.
        image.draft(image.mode, (-(-width // factor), -(-height // factor)))
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode an image from ``open_image`` (its first frame), then reduce it if it is still large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("the image decompresses to too many pixels") from None
    except Exception:
        raise ImageError("the image data is truncated or corrupt") from None
    factor = reduction_factor(*image.size)
    if factor > 1:
        try:
            # reduce() keeps image.info (a JPEG's or PNG's EXIF), but a TIFF's orientation lives in its
            # tags, which a reduced copy loses: turn such an image upright first.
            if image.format == "TIFF" and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                from PIL import ImageOps

                image = ImageOps.exif_transpose(image)
            image = image.reduce(factor)
        except ValueError:  # a mode reduce() does not take (palette, 1-bit): preprocessing copes with it
            pass
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a decoded Pillow image (first frame, reduced when large), or an ImageError saying why not."""
    return load_image(open_image(data, max_pixels))


def decode_images(
    blobs: Sequence[bytes],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS,
    deadline: float | None = None,
) -> list[Image.Image]:
    """Several images of one request -> decoded images, within the request's pixel and time budget.

    All headers are read and the pixels they will materialise are added up before the first image is
    decoded, so an over-budget request costs microseconds. ``deadline`` (a ``time.monotonic()`` value)
    is checked before each decode; None means no limit. An error carries ``index``, the position of the
    image at fault.
    """
    images, total = [], 0
    for index, blob in enumerate(blobs):
        try:
            image = open_image(blob, max_pixels)
        except ImageError as error:
            error.index = index
            raise
        images.append(image)
        total += image.size[0] * image.size[1]
    if max_request_pixels is not None and total > max_request_pixels:
        raise RequestTooLarge(
            f"the {len(blobs)} image(s) of this request decode to {total:,} pixels in all; "
            f"the limit is {max_request_pixels:,} pixels per request (MAX_REQUEST_PIXELS)"
        )
    decoded = []
    for index, image in enumerate(images):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"the request ran out of time after decoding {index} of {len(images)} image(s); "
                "send fewer or smaller images"
            )
        try:
            decoded.append(load_image(image))
        except ImageError as error:
            error.index = index
            raise
    return decoded
