"""Load a medical image from whatever a caller hands over, safely, into an 8-bit RGB PIL image.

Remote code (imported relatively by ``pipeline_vqa.py``): installed packages only.

Sources: a filesystem path, raw bytes, a binary file-like object, a ``PIL.Image``, a numpy array (2-D
grayscale or H x W x 3/4), base64 and ``data:`` URI strings. URLs are refused unless the caller opts in
(``allow_urls=True``, meant for a CLI; a server must not fetch arbitrary addresses), and then they are
fetched with a total time limit and the byte cap.

Formats are decided by content, never by name: DICOM Part 10 files (``DICM`` at byte 128; a dataset without
the preamble is read too, with a warning) and the 2-D formats in ``ALLOWED_FORMATS``. Byte and pixel caps are
checked before any decoding (every frame of a multi-frame GIF, APNG or TIFF); Pillow's decompression-bomb
warning is an error.

2-D images: 16-bit, 32-bit and float grayscale is rescaled to 8 bits with a percentile window (not
clipped); transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is composited on
``DEFAULT_BACKGROUND`` (white: transparent PNGs are mostly figures and charts); CMYK, 1-bit, L and other
modes become RGB; EXIF orientation is applied (a malformed EXIF block keeps the stored orientation and
adds a warning).

DICOM (pydicom's own functions and its pylibjpeg plugins, every transfer syntax DCMTK renders): Modality LUT /
rescale -> VOI LUT (scaled over its declared output range), or the first window of the header, or a percentile
window when there is none -> MONOCHROME1 inverted after the VOI step -> 8-bit RGB; or, for CT with
``ct_windows``, three windows in R, G and B. Colour (RGB, YBR_*, PALETTE COLOR) is converted to RGB. One frame
of a multi-frame object is decoded (the middle one unless ``frame`` says otherwise). The header's geometry is
checked against the caps before decoding.

Privacy: only the technical fields in ``DICOM_METADATA_FIELDS`` (and the window actually applied) reach
``LoadedImage.metadata``; anything that could identify a patient (names, IDs, dates, institutions,
physicians, descriptions, comments, private tags) is never read into a record, prompt, warning, log line
or exception. pydicom's and Pillow's own warnings and log records are silenced while an image is read
(they can quote element values and tags), and exceptions raised by Pillow or pydicom are replaced by typed
``ImageInputError``\\ s without a chained cause (their messages can quote header values or payload bytes).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import numbers
import os
import re
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

try:
    from .modeling_visual_med_alpaca import (
        DicomDecoderMissingError,
        ImageInputError,
        ImageTooLargeError,
        ImageURLNotAllowedError,
        InputError,
        InvalidImageError,
        UnsupportedImageFormatError,
    )
except ImportError:  # imported from a checkout as a top-level module
    from modeling_visual_med_alpaca import (
        DicomDecoderMissingError,
        ImageInputError,
        ImageTooLargeError,
        ImageURLNotAllowedError,
        InputError,
        InvalidImageError,
        UnsupportedImageFormatError,
    )

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
# A DICOM header's declared pixel data (rows x columns x frames x samples x bits), checked before decoding.
DEFAULT_MAX_DECODED_BYTES = 1024 * 1024 * 1024
DEFAULT_URL_TIMEOUT_S = 10.0
# Transparent pixels are composited on white: transparent PNGs are mostly figures and charts, whose dark
# strokes would vanish on black. Pass ``background=(0, 0, 0)`` for radiology crops with alpha.
DEFAULT_BACKGROUND = (255, 255, 255)
# 2-D formats accepted by content (Pillow's format names; JPEG includes the MPO files of phone cameras).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
# Percentile window for high-bit-depth pixels without window settings: robust to a few hot/dead pixels.
PERCENTILE_WINDOW = (0.5, 99.5)

# The only DICOM header fields ever read into a record (DICOM keyword -> metadata key). Technical fields
# only; each value must conform to its dictionary VR (CS, US, IS or DS), otherwise it is left out.
DICOM_METADATA_FIELDS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part_examined",
    "ViewPosition": "view_position",
    "ImageLaterality": "laterality",
    "PhotometricInterpretation": "photometric_interpretation",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "number_of_frames",
    "BitsStored": "bits_stored",
    "RescaleSlope": "rescale_slope",
    "RescaleIntercept": "rescale_intercept",
    "PixelSpacing": "pixel_spacing",
    "SliceThickness": "slice_thickness",
    "BurnedInAnnotation": "burned_in_annotation",
}
# What the optional prompt context says, in this order: "Modality: CT. Body part: HEAD. View: PA."
PROMPT_CONTEXT_FIELDS = (("modality", "Modality"), ("body_part_examined", "Body part"), ("view_position", "View"))
BURNED_IN_ANNOTATION_WARNING = (
    "The DICOM header declares burned-in annotation: text drawn into the pixels may identify the patient "
    "and may be read by the visual expert."
)
METADATA_FALLBACK_WARNING = (
    "The image's metadata (EXIF) is malformed and was ignored: its orientation may not have been corrected."
)
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_JPEG_FAMILY = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
_JPEG2000_FAMILY = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
# pydicom tries pylibjpeg before Pillow for 8-bit JPEG Baseline. Pillow (libjpeg-turbo, of the IJG line that DCMTK
# builds on) reproduces DCMTK's rendering of lossy baseline JPEG exactly; pylibjpeg-libjpeg's IDCT and colour
# rounding differ by up to 3 gray levels. pylibjpeg still decodes 12-bit JPEG Extended, lossless JPEG and JPEG-LS.
_PREFERRED_DECODING_PLUGIN = {"1.2.840.10008.1.2.4.50": "pillow"}
# A dataset stored without the 128-byte preamble and "DICM" (ACR-NEMA style, or a Part 10 writer that skipped
# them) starts with the file meta group (0002) or the identifying group (0008), little or big endian. DCMTK reads
# such files; these first-tag patterns keep every accepted 2-D format (PNG, JPEG, GIF, BMP, TIFF, WebP) out.
_BARE_DATASET_GROUPS = ((0x0002, "little"), (0x0008, "little"), (0x0008, "big"))
JPEG_SCAN_REPAIRED_WARNING = (
    "Invalid SOS parameters for sequential JPEG: the JPEG scan header was corrected (as DCMTK's decoder does) "
    "before decoding."
)
NO_PREAMBLE_WARNING = (
    "The DICOM file has no 128-byte preamble and 'DICM' marker (not a conformant Part 10 file): it was read as a "
    "bare DICOM dataset, its encoding inferred."
)

# CT windows in HU as (center, width): the typical values listed by Radiopaedia's "Windowing (CT)" article
# (radiopaedia.org/articles/windowing-ct). ``ct_windows`` packs three of them into R, G and B, the way MedGemma
# feeds CT to its vision encoder.
CT_WINDOW_PRESETS = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}
CT_WINDOWS_NOT_APPLIED_WARNING = (
    "ct_windows applies to CT images with a modality rescale (HU) only: this image got its single window instead."
)


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


def load_image(
    source,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    frame: int | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    allow_urls: bool = False,
    url_timeout_s: float = DEFAULT_URL_TIMEOUT_S,
    ct_windows=None,
) -> LoadedImage:
    """Load ``source`` into an 8-bit RGB image, or raise a typed ``ImageInputError``.

    Args:
        source: a path, bytes, binary file-like, ``PIL.Image``, numpy array, base64 or data-URI string
            (or an http(s) URL with ``allow_urls=True``).
        max_bytes: cap on the encoded size (file, download, decoded base64, inflated DICOM dataset).
        max_pixels: cap on width x height of the image (of one frame for DICOM), checked before decoding.
        max_decoded_bytes: cap on a DICOM header's declared pixel data, all frames together.
        frame: which frame of a multi-frame DICOM to decode (default: the middle one).
        background: RGB colour that transparent pixels are composited on.
        allow_urls: fetch http(s) URLs (for a CLI; leave off in a server).
        url_timeout_s: total time limit of a URL download.
        ct_windows: ``None`` (one window, the default) or three CT windows packed into R, G and B, each a name
            from ``CT_WINDOW_PRESETS`` or a ``(center, width)`` pair in HU. Only for CT with a modality rescale;
            any other image gets its single window and a warning.
    """
    windows = parse_ct_windows(ct_windows)
    if isinstance(source, LoadedImage):
        return source
    loaded = _load_any(
        source, max_bytes, max_pixels, max_decoded_bytes, frame, background, allow_urls, url_timeout_s, windows
    )
    if windows is not None and not loaded.is_dicom:
        loaded.warnings.append(CT_WINDOWS_NOT_APPLIED_WARNING)
    return loaded


def _load_any(source, max_bytes, max_pixels, max_decoded_bytes, frame, background, allow_urls, url_timeout_s, windows):
    """``load_image`` for every source kind; ``windows`` are the parsed ``ct_windows``."""
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageTooLargeError(f"The image has more than the {max_pixels}-pixel limit.")
        notes: list[str] = []
        with _library_logs_dropped():
            image = _guarded(
                _oriented_rgb, InvalidImageError("The PIL image could not be read."), source, background, notes
            )
        return LoadedImage(image=image, source_format="PIL", warnings=notes)
    if isinstance(source, np.ndarray):
        return LoadedImage(image=_from_array(source, max_pixels, background), source_format="array")

    data = _read_source_bytes(source, max_bytes, allow_urls, url_timeout_s)
    if _is_dicom(data) or _is_bare_dicom_dataset(data):
        return _load_dicom(
            data,
            frame=frame,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            max_decoded=max_decoded_bytes,
            ct_windows=windows,
        )
    return _load_2d(data, max_pixels, background)


def parse_ct_windows(value) -> tuple[tuple[float, float], ...] | None:
    """``ct_windows`` as three ``(center, width)`` pairs in HU, or ``None``; a bad value is an ``InputError``."""
    if value is None:
        return None
    problem = InputError(
        "ct_windows must be None or three CT windows, each a preset name "
        f"({', '.join(CT_WINDOW_PRESETS)}) or a (center, width) pair in HU with width >= 1."
    )
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 3:
        raise problem
    windows = []
    for window in value:
        if isinstance(window, str) and window.strip().lower() in CT_WINDOW_PRESETS:
            windows.append(CT_WINDOW_PRESETS[window.strip().lower()])
            continue
        if isinstance(window, (list, tuple)) and len(window) == 2 and all(_is_real(number) for number in window):
            center, width = float(window[0]), float(window[1])
            if math.isfinite(center) and math.isfinite(width) and width >= 1:
                windows.append((center, width))
                continue
        raise problem
    return tuple(windows)


def _is_real(number) -> bool:
    return isinstance(number, numbers.Real) and not isinstance(number, bool)


def dicom_prompt_context(metadata: dict) -> str | None:
    """The optional prompt context of a DICOM image, e.g. ``"Modality: CT. Body part: HEAD."``.

    Built from allowlisted, VR-validated metadata only; ``None`` when the image has none of the fields.
    """
    parts = [f"{label}: {metadata[key]}." for key, label in PROMPT_CONTEXT_FIELDS if metadata.get(key)]
    return " ".join(parts) or None


# ------------------------------------------------------------------------------------------ sources


def _read_source_bytes(source, max_bytes: int, allow_urls: bool, url_timeout_s: float) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str):
        data = _read_string_source(source, max_bytes, allow_urls, url_timeout_s)
    elif isinstance(source, os.PathLike):
        data = _read_path(os.fspath(source), max_bytes)
    elif hasattr(source, "read"):
        if isinstance(source, io.TextIOBase):
            raise InvalidImageError("The file-like image source must be opened in binary mode ('rb').")
        try:
            data = source.read(max_bytes + 1)
        except (OSError, ValueError):
            data = None
        if data is None:
            raise InvalidImageError("The file-like image source could not be read.")
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError("The file-like image source must be opened in binary mode ('rb').")
    else:
        raise UnsupportedImageFormatError(
            f"Unsupported image source type {type(source).__name__}: pass a path, bytes, a binary file, "
            "a PIL image, a numpy array, or a base64/data-URI string."
        )
    if len(data) == 0:
        raise InvalidImageError("The image is empty (zero bytes).")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"The image data is larger than the {max_bytes}-byte limit.")
    return bytes(data)


def _read_string_source(text: str, max_bytes: int, allow_urls: bool, url_timeout_s: float) -> bytes:
    stripped = text.strip()
    if stripped.startswith("data:"):
        header, _, payload = stripped.partition(",")
        if not header.endswith(";base64"):
            raise UnsupportedImageFormatError("Only base64 data URIs are accepted ('data:<type>;base64,...').")
        return _decode_base64(payload, max_bytes)
    if _URL.match(stripped):
        return _fetch_url(stripped, max_bytes, allow_urls, url_timeout_s)
    if os.path.isfile(text):
        return _read_path(text, max_bytes)
    compact = "".join(stripped.split())
    if len(compact) >= 64 and _BASE64.fullmatch(compact):
        return _decode_base64(compact, max_bytes)
    if os.path.isdir(text):
        raise InvalidImageError("The image path is a folder: pass the path of an image file.")
    raise InvalidImageError(
        "Image file not found (and the string is not base64 image data): pass the path of an existing PNG, "
        "JPEG or DICOM file, or base64/data-URI image data."
    )


def _read_path(path: str, max_bytes: int) -> bytes:
    if not os.path.isfile(path):
        raise InvalidImageError("Image file not found: pass the path of an existing PNG, JPEG or DICOM file.")
    try:
        if os.path.getsize(path) > max_bytes:
            raise ImageTooLargeError(f"The image file is larger than the {max_bytes}-byte limit.")
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except PermissionError:
        pass
    raise InvalidImageError("The image file could not be opened (permission denied).")


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    compact = "".join(payload.split())
    if len(compact) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(f"The image data is larger than the {max_bytes}-byte limit.")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        pass
    raise InvalidImageError("The base64 image string could not be decoded.")


def _fetch_url(url: str, max_bytes: int, allow_urls: bool, timeout_s: float) -> bytes:
    """Download with a total deadline and the byte cap; errors never repeat the address."""
    import urllib.error
    import urllib.request

    if not allow_urls:
        raise ImageURLNotAllowedError(
            "Image URLs are not fetched: download the image and pass its path or bytes "
            "(a command-line tool may opt in with allow_urls=True)."
        )
    if not url.lower().startswith(("http://", "https://")):
        raise ImageURLNotAllowedError("Only http:// and https:// image URLs can be fetched.")
    deadline = time.monotonic() + timeout_s
    problem = None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageTooLargeError(f"The image at the URL is larger than the {max_bytes}-byte limit.")
            chunks, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
    except ImageInputError:
        raise
    except urllib.error.HTTPError as error:
        problem = f"the server answered HTTP {error.code}"
    except (TimeoutError, OSError) as error:
        timed_out = isinstance(error, TimeoutError) or "timed out" in str(getattr(error, "reason", ""))
        problem = f"no complete answer within {timeout_s:g} s" if timed_out else "the server could not be reached"
    raise InvalidImageError(f"The image URL could not be downloaded ({problem}).")


# ------------------------------------------------------------------------------------------ 2-D images


def _load_2d(data: bytes, max_pixels: int, background) -> LoadedImage:
    with _library_logs_dropped(), warnings.catch_warnings(record=True) as complaints:
        # Pillow's complaints about metadata are recorded, not shown (metadata is never logged); a
        # decompression bomb is an error, not a warning.
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        corrupt = InvalidImageError("The image data is truncated or corrupt.")
        loaded = _guarded(_decode_2d, corrupt, data, max_pixels, background)
    if complaints and METADATA_FALLBACK_WARNING not in loaded.warnings:
        loaded.warnings.append(METADATA_FALLBACK_WARNING)
    return loaded


def _decode_2d(data: bytes, max_pixels: int, background) -> LoadedImage:
    too_large = ImageTooLargeError(f"The image has more than the {max_pixels}-pixel limit.")
    problem = None
    try:
        opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        problem = too_large
    except Exception:
        problem = UnsupportedImageFormatError(
            f"The data is not an image in an accepted format ({', '.join(ALLOWED_FORMATS)} or DICOM), "
            "or its header is corrupt."
        )
    if problem is not None:  # raised here, not in the except block, so no Pillow message is chained
        raise problem
    with opened:
        if opened.width * opened.height > max_pixels or _largest_frame_pixels(opened, data) > max_pixels:
            raise too_large
        source_format = opened.format
        opened.load()
        notes: list[str] = []
        image = _oriented_rgb(opened, background, notes)
    return LoadedImage(image=image, source_format=source_format, warnings=notes)


def _largest_frame_pixels(opened: Image.Image, data: bytes) -> int:
    """The most pixels any frame of a multi-frame GIF, APNG or TIFF declares, read from headers only.

    Only the first frame is decoded, but Pillow grows a GIF's canvas to every frame's extent and seeking decodes
    the frames before; each frame's declared size is checked before anything is decoded.
    """
    if opened.format == "GIF":
        return max((width * height for width, height in _gif_frame_extents(data)), default=0)
    if opened.format == "PNG":
        return max((width * height for width, height in _apng_frame_sizes(data)), default=0)
    if opened.format == "TIFF":  # Pillow's TIFF seek reads a directory (IFD), not the strips or tiles
        largest = 0
        for index in range(opened.n_frames):
            opened.seek(index)
            largest = max(largest, opened.width * opened.height)
        opened.seek(0)
        return largest
    return 0


def _gif_frame_extents(data: bytes):
    """The canvas each GIF image descriptor asks for (left + width, top + height), per the GIF89a block layout."""
    position = 13  # header (6) and logical screen descriptor (7)
    if len(data) < position:
        return
    if data[10] & 0x80:  # global colour table
        position += 3 * (2 << (data[10] & 0x07))
    while position < len(data):
        introducer = data[position]
        if introducer == 0x2C and position + 10 <= len(data):  # image descriptor
            left, top, width, height = struct.unpack_from("<4H", data, position + 1)
            yield left + width, top + height
            flags = data[position + 9]
            position += 10 + (3 * (2 << (flags & 0x07)) if flags & 0x80 else 0) + 1  # local table, LZW code size
        elif introducer == 0x21:  # extension: label, then data sub-blocks
            position += 2
        else:  # trailer (0x3B) or a corrupt stream, which Pillow reports itself
            return
        while position < len(data) and data[position]:  # data sub-blocks up to the block terminator
            position += data[position] + 1
        position += 1


def _apng_frame_sizes(data: bytes):
    """Width and height of every APNG frame control (fcTL) chunk."""
    position = 8  # PNG signature
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"fcTL" and position + 20 <= len(data):
            yield struct.unpack_from(">II", data, position + 12)
        elif kind == b"IEND":
            return
        position += 12 + length


def _oriented_rgb(image: Image.Image, background, notes: list[str]) -> Image.Image:
    with warnings.catch_warnings(record=True) as complaints:
        warnings.simplefilter("always")
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # malformed EXIF: keep the stored orientation
            oriented = None
    if oriented is None or complaints:  # Pillow warns ("Corrupt EXIF data") when it gave up on the block
        notes.append(METADATA_FALLBACK_WARNING)
        oriented = image
    return _to_rgb(oriented, background)


def _to_rgb(image: Image.Image, background=DEFAULT_BACKGROUND) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        return _gray_to_rgb(_percentile_window(np.asarray(image))[0])
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    raise UnsupportedImageFormatError(f"Images in colour mode {image.mode} cannot be converted to RGB.")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray, mode="L").convert("RGB")


def _percentile_window(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """8-bit grayscale through a percentile window (never a plain clip), plus the window's low and high."""
    values = pixels.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InvalidImageError("The image holds no finite pixel values.")
    low, high = (float(v) for v in np.percentile(finite, PERCENTILE_WINDOW))
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0.0, 255.0).round().astype(np.uint8), low, high


def _from_array(array: np.ndarray, max_pixels: int, background) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UnsupportedImageFormatError("Arrays must be 2-D grayscale, H x W x 3 (RGB) or H x W x 4 (RGBA).")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageTooLargeError(f"The image has more than the {max_pixels}-pixel limit.")
    if array.size == 0:
        raise InvalidImageError("The image array is empty.")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UnsupportedImageFormatError("Image arrays must hold integer or floating-point pixel values.")
    if array.ndim == 2:
        if array.dtype == np.uint8:
            return _gray_to_rgb(np.ascontiguousarray(array))
        return _gray_to_rgb(_percentile_window(array)[0])
    if array.dtype != np.uint8:
        raise UnsupportedImageFormatError("Colour arrays must be uint8 (H x W x 3 or H x W x 4).")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), background)


# ------------------------------------------------------------------------------------------ DICOM

# pydicom is imported on the first DICOM, not with this module: PNG/JPEG inputs (and importing the pipeline)
# do not pay for it. _import_pydicom binds these module globals once; outside code reads them through
# __getattr__ below (e.g. a test that wraps pixel_array before any DICOM was read).
_PYDICOM_NAMES = frozenset(
    {
        "dcmread",
        "dictionary_VR",
        "Dataset",
        "FileMetaDataset",
        "generate_fragments",
        "ImplicitVRLittleEndian",
        "ExplicitVRLittleEndian",
        "ExplicitVRBigEndian",
        "get_frame",
        "encapsulate",
        "data_element_generator",
        "MultiValue",
        "apply_color_lut",
        "apply_modality_lut",
        "apply_voi",
        "apply_windowing",
        "get_decoder",
        "pixel_array",
        "UID",
        "DeflatedExplicitVRLittleEndian",
        "MediaStorageDirectoryStorage",
    }
)
_pydicom_lock = threading.Lock()
_pydicom_imported = False


def _import_pydicom() -> None:
    """Bind the pydicom names this module uses, once (a name patched afterwards stays patched)."""
    global _pydicom_imported, dcmread, dictionary_VR, Dataset, get_frame, data_element_generator, MultiValue
    global apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
    global UID, DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage, FileMetaDataset
    global generate_fragments, encapsulate, ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian
    with _pydicom_lock:
        if _pydicom_imported:
            return
        from pydicom import dcmread
        from pydicom.datadict import dictionary_VR
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.encaps import encapsulate, generate_fragments, get_frame
        from pydicom.filereader import data_element_generator
        from pydicom.multival import MultiValue
        from pydicom.pixels import (
            apply_color_lut,
            apply_modality_lut,
            apply_voi,
            apply_windowing,
            get_decoder,
            pixel_array,
        )
        from pydicom.uid import (
            UID,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            MediaStorageDirectoryStorage,
        )

        _pydicom_imported = True


def __getattr__(name: str):
    if name in _PYDICOM_NAMES:
        _import_pydicom()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _is_bare_dicom_dataset(data: bytes) -> bool:
    """A dataset without the preamble: its first tag is in group 0002 or 0008, with a small element number."""
    if len(data) < 8:
        return False
    return any(
        int.from_bytes(data[0:2], order) == group and int.from_bytes(data[2:4], order) < 0x0100
        for group, order in _BARE_DATASET_GROUPS
    )


def _load_dicom(
    data: bytes, *, frame: int | None, max_bytes: int, max_pixels: int, max_decoded: int, ct_windows=None
) -> LoadedImage:
    _import_pydicom()
    # pydicom's warnings quote element values too: they are dropped, not recorded.
    with _library_logs_dropped(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _guarded(
            _decode_dicom,
            InvalidImageError("The DICOM file could not be read: it is truncated, corrupt or not a valid image."),
            data,
            frame,
            max_bytes,
            max_pixels,
            max_decoded,
            ct_windows,
        )


def _decode_dicom(
    data: bytes, frame: int | None, max_bytes: int, max_pixels: int, max_decoded: int, ct_windows=None
) -> LoadedImage:
    notes: list[str] = []
    part10 = _is_dicom(data)
    if not part10:
        notes.append(NO_PREAMBLE_WARNING)
    transfer_syntax, meta_end = _file_meta_transfer_syntax(data, 132 if part10 else 0)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        _check_inflated_size(data[meta_end:], max_bytes)
    dataset = dcmread(io.BytesIO(data), force=not part10)
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None:
        dataset.file_meta = file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in file_meta and dataset.original_encoding[0] is not None:
        # No file meta: the syntax is the encoding pydicom detected while reading (DCMTK infers it the same way).
        implicit, little = dataset.original_encoding
        file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    if file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in dataset:
        raise UnsupportedImageFormatError(
            "This is a DICOMDIR (an index of a DICOM medium), not an image: pass one of the image files it lists."
        )
    if not any(keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedImageFormatError(
            "This DICOM object holds no image (no pixel data): it is a report, plan or waveform, or the file is "
            "truncated before its pixel data."
        )

    syntax = UID(str(file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    frames = _checked_geometry(dataset, syntax, max_pixels, max_decoded, notes)
    index = _frame_index(frame, frames)
    _require_decoder(syntax)
    if syntax in _JPEG_FAMILY + _JPEG2000_FAMILY and "PixelData" in dataset:
        _check_encapsulated_frame(dataset.PixelData, index, frames, max_pixels)

    decode_options = {"index": index if frames > 1 else None}
    preferred = _PREFERRED_DECODING_PLUGIN.get(str(syntax))
    if preferred is not None and preferred in get_decoder(syntax).available_plugins:
        decode_options["decoding_plugin"] = preferred
    pixels = _guarded(
        pixel_array, None if syntax in _JPEG_FAMILY else _decode_failure(syntax), dataset, **decode_options
    )
    if pixels is None:  # a sequential JPEG that IJG (DCMTK) reads with a warning: repaired, or the typed error
        repaired = _guarded(_with_sequential_scan_repaired, None, dataset, index, frames)
        if repaired is None:
            raise _decode_failure(syntax)
        notes.append(JPEG_SCAN_REPAIRED_WARNING)
        pixels = _guarded(pixel_array, _decode_failure(syntax), repaired)
    metadata = _dicom_metadata(dataset, notes)
    image, window = _dicom_pixels_to_rgb(pixels, dataset, notes, ct_windows)
    metadata.update(window)
    if syntax.is_transfer_syntax:
        metadata["transfer_syntax"] = syntax.name
    if frames > 1:
        metadata["frame"] = index
        notes.append(f"Only frame {index} of a {frames}-frame DICOM was read.")
    if metadata.get("burned_in_annotation") == "YES":
        notes.append(BURNED_IN_ANNOTATION_WARNING)
    return LoadedImage(image=image, source_format="DICOM", metadata=metadata, warnings=notes)


def _file_meta_transfer_syntax(data: bytes, meta_start: int = 132) -> tuple[str | None, int]:
    """The transfer syntax UID of the file meta (group 0002) and where the dataset starts."""
    stream = io.BytesIO(data)
    stream.seek(meta_start)
    syntax = None
    for element in data_element_generator(stream, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2):
        if element.tag == 0x00020010 and isinstance(element.value, bytes):
            syntax = element.value.decode("ascii", "replace").strip("\x00 ")
    return syntax, stream.tell()


def _check_inflated_size(deflated: bytes, max_bytes: int) -> None:
    """A deflated dataset is inflated by pydicom in one piece: measure it first, in bounded chunks."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, deflated
    while pending and size <= max_bytes:
        size += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    if size > max_bytes:
        raise ImageTooLargeError(f"The inflated DICOM dataset is larger than the {max_bytes}-byte limit.")


def _checked_geometry(dataset: Dataset, syntax: UID, max_pixels: int, max_decoded: int, notes: list[str]) -> int:
    """Rows x columns against the pixel cap, the declared pixel data against the byte cap; the frame count."""
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    samples = int(dataset.get("SamplesPerPixel") or 1)
    bits = int(dataset.BitsAllocated)
    if min(rows, columns) < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise InvalidImageError("The DICOM image geometry in the header is invalid.")
    frames = _number_of_frames(dataset, syntax, rows * columns * samples * bits, notes)
    if frames < 1:
        raise InvalidImageError("The DICOM image geometry in the header is invalid.")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(f"The DICOM image has more than the {max_pixels}-pixel limit per frame.")
    if math.ceil(rows * columns * frames * samples * bits / 8) > max_decoded:
        raise ImageTooLargeError(f"The DICOM header declares more than {max_decoded} bytes of pixel data.")
    return frames


def _number_of_frames(dataset: Dataset, syntax: UID, frame_bits: int, notes: list[str]) -> int:
    """Number of Frames, or, when its value is malformed (e.g. "1A"), the count the pixel data holds.

    DCMTK renders such a file; the count is taken from the native pixel data's length (or one frame per
    fragment of encapsulated data) and written back so pydicom decodes the same frames.
    """
    declared = dataset.get("NumberOfFrames")
    if declared is None or declared == "":
        return 1
    try:
        return int(declared)
    except (TypeError, ValueError):
        pass
    pixel_data = dataset.get("PixelData")
    if pixel_data is None:
        frames = 1
    elif syntax.is_compressed:
        frames = max(1, sum(1 for _ in generate_fragments(pixel_data)))
    else:
        frames = max(1, len(pixel_data) * 8 // max(frame_bits, 1))
    notes.append(f"The DICOM header's number of frames is malformed: {frames} frame(s) read from the pixel data.")
    dataset.NumberOfFrames = frames
    return frames


def _frame_index(frame: int | None, frames: int) -> int:
    if frame is None:
        return frames // 2
    if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or not -frames <= int(frame) < frames:
        raise InvalidImageError(
            "The requested frame is not in this DICOM: pass 0 <= frame < number_of_frames (see the image metadata)."
        )
    return int(frame) % frames


def _require_decoder(syntax: UID) -> None:
    name = syntax.name if syntax.is_transfer_syntax else "an unknown transfer syntax"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None:
        raise UnsupportedImageFormatError(
            f"DICOM pixel data encoded as {name} is not supported (video or an unknown encoding): "
            "export the image uncompressed or as JPEG / JPEG 2000."
        )
    if not decoder.is_available:
        raise DicomDecoderMissingError(
            f"The DICOM pixel data is compressed as {name} and no decoder for it is installed. "
            f"Install one of: {'; '.join(_missing_decoder_packages(syntax))} (requirements.txt pins pylibjpeg with "
            "its libjpeg, openjpeg and rle plugins: pip install -r requirements.txt), or export the image uncompressed."
        )


def _with_sequential_scan_repaired(dataset: Dataset, index: int, frames: int) -> Dataset | None:
    """The frame ``index`` alone, its sequential JPEG scan headers set to Ss=0, Se=63, Ah=Al=0; None if already so.

    A sequential (baseline or extended, SOF0/SOF1) scan must say Ss=0, Se=63, Ah=Al=0 (ISO/IEC 10918-1 B.2.3).
    Some writers put other values there; IJG, DCMTK's decoder, ignores them with the warning "Invalid SOS
    parameters for sequential JPEG", while libjpeg refuses the stream. pydicom's NEMA WG04 sample JPEG-lossy.dcm
    is such a file (Se=0).
    """
    stream = bytearray(get_frame(dataset.PixelData, index, number_of_frames=frames))
    sequential, changed, position = False, False, 2
    while position + 4 <= len(stream):
        if stream[position] != 0xFF or stream[position + 1] in (0x00, 0xFF) or 0xD0 <= stream[position + 1] <= 0xD7:
            position += 1  # entropy-coded data, stuffed bytes, fill bytes, restart markers
            continue
        marker, length = stream[position + 1], int.from_bytes(stream[position + 2 : position + 4], "big")
        if marker == 0xD9:
            break
        sequential |= marker in (0xC0, 0xC1)
        if marker == 0xDA and sequential:
            spectral = position + 5 + 2 * stream[position + 4]  # after the component selectors
            if spectral + 3 <= len(stream) and bytes(stream[spectral : spectral + 3]) != b"\x00\x3f\x00":
                stream[spectral : spectral + 3] = b"\x00\x3f\x00"
                changed = True
        position += 2 + length
    if not changed:
        return None
    repaired = dataset.copy()
    repaired.PixelData = encapsulate([bytes(stream)])
    repaired.NumberOfFrames = 1
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in repaired:
            del repaired[keyword]
    return repaired


def _decode_failure(syntax: UID) -> InvalidImageError:
    message = "The DICOM pixel data could not be decoded: it is truncated or corrupt"
    missing = _missing_decoder_packages(syntax) if syntax.is_compressed else []
    if missing:  # e.g. Pillow reads 8-bit JPEG but not 12-bit JPEG Extended
        message += f", or it needs a decoder that is not installed ({'; '.join(missing)})"
    return InvalidImageError(message + ".")


def _missing_decoder_packages(syntax: UID) -> list[str]:
    """pydicom's list of decoder plugins that are not installed, as package requirements."""
    missing = get_decoder(syntax).missing_dependencies
    return sorted({entry.split(" - requires ", 1)[-1] for entry in missing if " - requires " in entry})


def _check_encapsulated_frame(pixel_data: bytes, index: int, frames: int, max_pixels: int) -> None:
    """The JPEG / JPEG 2000 stream's own size, read from its header before any decoder allocates it."""
    try:
        stream = get_frame(pixel_data, index, number_of_frames=frames)
        with Image.open(io.BytesIO(stream), formats=("JPEG", "JPEG2000")) as header:
            pixels = header.width * header.height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        pixels = max_pixels + 1
    except Exception:  # not readable by Pillow: the decoder checks it against the header
        return
    if pixels > max_pixels:
        raise ImageTooLargeError(f"The DICOM image has more than the {max_pixels}-pixel limit per frame.")


def _dicom_pixels_to_rgb(
    pixels: np.ndarray, dataset: Dataset, notes: list[str], ct_windows=None
) -> tuple[Image.Image, dict]:
    photometric = str(dataset.get("PhotometricInterpretation") or "MONOCHROME2").strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim != 2:
            raise InvalidImageError("The DICOM grayscale pixel data does not have one sample per pixel.")
        values = apply_modality_lut(pixels, dataset)
        if ct_windows is not None and _has_hounsfield_units(dataset):
            channels = [_window_8bit(values, center, width) for center, width in ct_windows]
            return Image.fromarray(np.stack(channels, axis=-1), mode="RGB"), {
                "window_source": "ct_windows",
                "ct_windows": [list(window) for window in ct_windows],
            }
        if ct_windows is not None:
            notes.append(CT_WINDOWS_NOT_APPLIED_WARNING)
        gray, window = _voi_to_8bit(values, dataset, notes)
        if photometric == "MONOCHROME1":  # low values are bright: inverted after the VOI step (PS3.3 C.7.6.3.1.2)
            gray = 255 - gray
        return _gray_to_rgb(gray), window
    if ct_windows is not None:
        notes.append(CT_WINDOWS_NOT_APPLIED_WARNING)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
        depth = 8 if pixels.dtype == np.uint8 else 16
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        # pixel_array has already converted YBR_FULL(_422) to RGB; JPEG 2000 decoders undo ICT/RCT.
        depth = int(dataset.get("BitsStored") or 8)
    else:
        raise UnsupportedImageFormatError(
            "This DICOM's photometric interpretation is not supported (accepted: MONOCHROME1, MONOCHROME2, "
            "RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT, PALETTE COLOR)."
        )
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise InvalidImageError("The DICOM colour pixel data does not have three samples per pixel.")
    if depth > 8:
        pixels = np.clip(pixels.astype(np.float64) * (255.0 / (2**depth - 1)), 0, 255).round()
    return Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)), mode="RGB"), {}


def _voi_to_8bit(values: np.ndarray, dataset: Dataset, notes: list[str]) -> tuple[np.ndarray, dict]:
    """VOI LUT if the header has one, else its first window, else a percentile window; 8-bit output.

    As pydicom's ``apply_voi_lut(prefer_lut=True)``; an invalid VOI step falls through to the next one.
    """
    if dataset.get("VOILUTSequence"):
        lut = _guarded(_apply_voi_lut_8bit, None, values, dataset)
        if lut is not None:
            return lut, {"window_source": "voi_lut"}
        notes.append("The DICOM VOI LUT is invalid and was not used.")
    if dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        windowed = _guarded(_apply_first_window_8bit, None, values, dataset)
        if windowed is not None:
            return windowed
        notes.append("The DICOM window settings are invalid; a percentile window was used instead.")
    gray, low, high = _percentile_window(values)
    return gray, {"window_source": "percentile", "window_center": (low + high) / 2, "window_width": high - low}


def _apply_voi_lut_8bit(values: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The first VOI LUT, its output scaled over the LUT's declared output range to 8 bits.

    PS3.3 C.11.2.1.1: the third value of the LUT Descriptor is the number of bits of each entry, so the LUT's
    output range is 0 .. 2**bits - 1 (what DCMTK scales over), not the min..max of the entries it happens to hold.
    A VOI LUT is indexed by (integer) modality values.
    """
    output = apply_voi(np.rint(values).astype(np.int64), dataset, index=0).astype(np.float64)
    bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
    if bits != 8 and not 10 <= bits <= 16:  # the depths PS3.3 allows (pydicom refuses the others too)
        raise ValueError
    return np.clip(output * (255.0 / (2**bits - 1)), 0, 255).round().astype(np.uint8)


def _apply_first_window_8bit(values: np.ndarray, dataset: Dataset) -> tuple[np.ndarray, dict]:
    center, width = _first_value(dataset.WindowCenter), _first_value(dataset.WindowWidth)
    function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
    # pydicom's windowing (LINEAR, LINEAR_EXACT, SIGMOID) into a 0..255 output range: a window dataset
    # holding only the chosen window of an unsigned 8-bit image.
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored, window.PixelRepresentation = 8, 0
    window.WindowCenter, window.WindowWidth, window.VOILUTFunction = center, width, function
    gray = np.clip(apply_windowing(values, window), 0, 255).round().astype(np.uint8)
    return gray, {
        "window_source": "header",
        "window_center": center,
        "window_width": width,
        "voi_lut_function": function,
    }


def _window_8bit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """One LINEAR window (PS3.3 C.11.2.1.2.1) into 0..255, through pydicom's windowing."""
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored, window.PixelRepresentation = 8, 0
    window.WindowCenter, window.WindowWidth, window.VOILUTFunction = center, width, "LINEAR"
    return np.clip(apply_windowing(values, window), 0, 255).round().astype(np.uint8)


def _has_hounsfield_units(dataset: Dataset) -> bool:
    """CT whose modality rescale is present, so that windows in HU mean what they say."""
    modality = str(dataset.get("Modality") or "").strip().upper()
    try:
        return modality == "CT" and all(
            math.isfinite(float(dataset.get(keyword))) for keyword in ("RescaleSlope", "RescaleIntercept")
        )
    except (TypeError, ValueError):
        return False


def _first_value(value) -> float:
    first = float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)
    if not math.isfinite(first):
        raise ValueError
    return first


def _dicom_metadata(dataset: Dataset, notes: list[str]) -> dict:
    """The allowlisted technical fields whose values conform to their VR; nothing else is ever read."""
    metadata = {}
    for keyword, key in DICOM_METADATA_FIELDS.items():
        raw = _guarded(dataset.get, None, keyword)
        if raw is None or raw == "":
            continue
        value = _guarded(_conforming_value, None, raw, dictionary_VR(keyword))
        if value is None:
            notes.append(f"The DICOM field {keyword} holds a non-conforming value and was left out.")
        else:
            metadata[key] = value
    return metadata


def _conforming_value(raw, vr: str):
    values = list(raw) if isinstance(raw, (MultiValue, list, tuple)) else [raw]
    if vr == "CS":
        texts = [str(value).strip() for value in values]
        if not all(_CODE_STRING.fullmatch(text) for text in texts):
            return None
        converted = texts
    elif vr in ("US", "IS"):
        converted = [int(value) for value in values]
    elif vr == "DS":
        converted = [float(value) for value in values]
        if not all(math.isfinite(value) for value in converted):
            return None
    else:  # fail closed: only code strings and numbers are allowlisted
        return None
    return converted[0] if len(converted) == 1 else converted


# ------------------------------------------------------------------------------------------ guards


def _guarded(function, error: ImageInputError | None, *args, **kwargs):
    """Call ``function``; a foreign exception becomes ``error`` (or ``None`` is returned when it is ``None``).

    The typed error is raised outside the ``except`` block, so it carries no ``__context__``: Pillow and
    pydicom messages can quote header values or payload bytes, and chained tracebacks reach logs.
    """
    try:
        return function(*args, **kwargs)
    except ImageInputError:
        raise
    except MemoryError:
        error = ImageTooLargeError("The image is too large to decode in the available memory.")
    except Exception:
        pass
    if error is None:
        return None
    raise error


class _DropThreadRecords(logging.Filter):
    """Drops the log records of threads that are inside ``_library_logs_dropped``."""

    def __init__(self):
        super().__init__()
        self.threads: dict[int, int] = {}
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.get_ident() not in self.threads


_LIBRARY_LOG_FILTER = _DropThreadRecords()
# pydicom logs element values (e.g. "Invalid value for VR DA: '...'", every element in debug mode);
# Pillow's TIFF plugin logs tag values (ImageDescription, Artist ...) at debug level.
_SILENCED_LOGGERS = ("pydicom", "PIL")


class _library_logs_dropped:  # noqa: N801 - a context manager used like a function
    """While this thread reads an image, pydicom's and Pillow's log records are dropped (other threads' are not)."""

    def __enter__(self):
        thread = threading.get_ident()
        with _LIBRARY_LOG_FILTER.lock:
            _LIBRARY_LOG_FILTER.threads[thread] = _LIBRARY_LOG_FILTER.threads.get(thread, 0) + 1
            # A logger's filters act only on records created on it: attach to every pydicom/PIL logger.
            names = [name for name in list(logging.root.manager.loggerDict) if name.split(".")[0] in _SILENCED_LOGGERS]
            for name in [*_SILENCED_LOGGERS, *names]:
                logger = logging.getLogger(name)
                if _LIBRARY_LOG_FILTER not in logger.filters:
                    logger.addFilter(_LIBRARY_LOG_FILTER)
        return self

    def __exit__(self, *exc_info):
        thread = threading.get_ident()
        with _LIBRARY_LOG_FILTER.lock:
            remaining = _LIBRARY_LOG_FILTER.threads.pop(thread) - 1
            if remaining:
                _LIBRARY_LOG_FILTER.threads[thread] = remaining
        return False


__all__ = [
    "ALLOWED_FORMATS",
    "CT_WINDOW_PRESETS",
    "DEFAULT_BACKGROUND",
    "DICOM_METADATA_FIELDS",
    "LoadedImage",
    "dicom_prompt_context",
    "load_image",
    "parse_ct_windows",
]
