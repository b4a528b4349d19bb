"""Safe decoding of untrusted image bytes, shared by the service and the folder data set."""

from __future__ import annotations

import io
import warnings

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


class ImageError(ValueError):
    """An image we refuse; ``status`` and ``code`` say how an HTTP API should report it."""

    status = 400
    code = "invalid_image"


class UnsupportedImageFormat(ImageError):
    status = 415
    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    status = 413
    code = "image_too_large"


# Leading bytes of the allowed formats: a file that starts like one but that Pillow cannot
# identify is a broken image of a format we take (400), not a format we do not take (415).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_allowed_format(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a fully decoded Pillow image (first frame), or an ImageError saying why not."""
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
    except Exception as error:  # Pillow raises many kinds on hostile headers
        raise ImageError(f"the image header cannot be read: {type(error).__name__}") from None
    width, height = image.size
    # Checked from the header, before a single pixel is decompressed.
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("the image decompresses to too many pixels") from None
    except Exception as error:
        raise ImageError(f"the image data is truncated or corrupt: {type(error).__name__}") from None
    return image
