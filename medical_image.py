"""Load a medical image from whatever a caller hands over, safely, into an 8-bit RGB PIL image.

Remote code (imported relatively by ``pipeline_vqa.py``): installed packages only.

Accepted sources: a filesystem path, raw bytes, a binary file-like object, a ``PIL.Image``, a numpy
array (2-D grayscale or H x W x 3), and base64 / ``data:`` URI strings. The format is decided by
content, never by file extension, against an allowlist. Byte and pixel caps are checked before any
decoding. Errors are typed (see ``modeling_visual_med_alpaca``) and never contain payload bytes or
image metadata.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from .modeling_visual_med_alpaca import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError
except ImportError:  # imported from a checkout as a top-level module
    from modeling_visual_med_alpaca import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
# Formats accepted by content (Pillow's format names).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")


@dataclass
class LoadedImage:
    """An image ready for a visual expert, plus what the record may show about it."""

    image: Image.Image  # 8-bit RGB
    source_format: str  # "PNG", "JPEG", "DICOM", "array", "PIL", ...
    metadata: dict = field(default_factory=dict)  # technical fields only, never identity
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.metadata = {"width": self.image.width, "height": self.image.height, **self.metadata}

    @property
    def is_dicom(self) -> bool:
        return self.source_format == "DICOM"


def _read_source_bytes(source, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and (source.startswith("data:") or _looks_like_base64(source)):
        data = _decode_base64(source, max_bytes)
    elif isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https", "ftp"):
            raise UnsupportedImageFormatError("Image URLs are not fetched; download the file and pass its path.")
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InvalidImageError("Image file not found: pass the path of an existing PNG, JPEG or DICOM file.")
        if os.path.getsize(path) > max_bytes:
            raise ImageTooLargeError(f"Image file is larger than the {max_bytes}-byte limit.")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("The file-like image source must be opened in binary mode.")
    else:
        raise UnsupportedImageFormatError(
            f"Unsupported image source type {type(source).__name__}: pass a path, bytes, a binary file, "
            "a PIL image, a numpy array, or a base64/data-URI string."
        )
    if len(data) == 0:
        raise InvalidImageError("The image is empty (zero bytes).")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"Image data is larger than the {max_bytes}-byte limit.")
    return data


def _looks_like_base64(text: str) -> bool:
    # Paths are short and contain separators or dots; base64 image payloads are long and have neither.
    return len(text) > 256 and "/" not in text[:64].replace("+", "") and "." not in text[:256]


def _decode_base64(text: str, max_bytes: int) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(f"Image data is larger than the {max_bytes}-byte limit.")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidImageError("The base64 image string could not be decoded.") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _window_to_8bit(np.asarray(image, dtype=np.float32))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited on black, the background of radiology images.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _window_to_8bit(pixels: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5) -> Image.Image:
    """Rescale high-bit-depth grayscale to 8 bits with a percentile window (never a plain clip)."""
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        raise InvalidImageError("The image holds no finite pixel values.")
    low, high = np.percentile(finite, [low_percentile, high_percentile])
    if high <= low:
        high = low + 1.0
    scaled = np.clip((np.nan_to_num(pixels, nan=low) - low) / (high - low), 0.0, 1.0) * 255.0
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        if array.dtype == np.uint8:
            return Image.fromarray(array, mode="L").convert("RGB")
        return _window_to_8bit(array.astype(np.float32))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype != np.uint8:
            raise UnsupportedImageFormatError("Colour arrays must be uint8 (H x W x 3 or H x W x 4).")
        return _to_rgb(Image.fromarray(array))
    raise UnsupportedImageFormatError("Arrays must be 2-D grayscale or H x W x 3 colour.")


def load_image(
    source,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Load ``source`` into an 8-bit RGB image, or raise a typed ``ImageInputError``."""
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageTooLargeError(f"Image has more than the {max_pixels}-pixel limit.")
        return LoadedImage(image=_to_rgb(ImageOps.exif_transpose(source) or source), source_format="PIL")
    if isinstance(source, np.ndarray):
        if source.size > max_pixels * 4:
            raise ImageTooLargeError(f"Image has more than the {max_pixels}-pixel limit.")
        return LoadedImage(image=_from_array(source), source_format="array")

    data = _read_source_bytes(source, max_bytes)
    with warnings.catch_warnings():
        # A decompression bomb is an error, not a warning.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as opened:
                if opened.width * opened.height > max_pixels:
                    raise ImageTooLargeError(f"Image has more than the {max_pixels}-pixel limit.")
                source_format = opened.format
                opened.load()
                try:
                    oriented = ImageOps.exif_transpose(opened)
                except Exception:  # malformed EXIF: keep the stored orientation
                    oriented = opened
                image = _to_rgb(oriented)
        except ImageTooLargeError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            if isinstance(error, UnidentifiedImageError):
                raise UnsupportedImageFormatError(
                    f"The data is not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})."
                ) from None
            raise ImageTooLargeError(f"Image has more than the {max_pixels}-pixel limit.") from None
        except (OSError, SyntaxError, ValueError):
            raise InvalidImageError("The image data is truncated or corrupt.") from None
    return LoadedImage(image=image, source_format=source_format)


__all__ = ["ALLOWED_FORMATS", "LoadedImage", "load_image"]
