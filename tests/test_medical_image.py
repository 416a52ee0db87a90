"""Image loading: sources, odd 2-D modes, bombs, spoofing, DICOM windowing/colour/frames, and patient privacy.

Real DICOM files come from inside pydicom's installed wheel (never its download helper); the rest are
constructed here with Pillow and pydicom.
"""

import base64
import http.server
import io
import json
import logging
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import GifImagePlugin, Image, PngImagePlugin, TiffImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

import medical_image
from medical_image import DEFAULT_BACKGROUND, DICOM_METADATA_FIELDS, LoadedImage, dicom_prompt_context, load_image
from modeling_visual_med_alpaca import (
    DicomDecoderMissingError,
    ImageInputError,
    ImageTooLargeError,
    ImageURLNotAllowedError,
    InputError,
    InvalidImageError,
    UnsupportedImageFormatError,
    build_inference_prompt,
)
from tests.conftest import REPO_ROOT
from tests.test_pipeline import raises_typed

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"
MR_SMALL = PYDICOM_FILES / "MR_small.dcm"
CR_MONOCHROME1 = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
ALLOWED_METADATA_KEYS = (
    set(DICOM_METADATA_FIELDS.values())
    | {"width", "height", "window_source", "window_center", "window_width", "voi_lut_function"}
    | {"transfer_syntax", "frame", "ct_windows"}
)


def pixels_of(loaded: LoadedImage) -> np.ndarray:
    assert loaded.image.mode == "RGB"
    return np.asarray(loaded.image)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def dicom_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def new_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **fields):
    """A minimal Part 10 dataset holding ``pixels`` (frames first for multi-frame)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in fields.items():
        setattr(dataset, keyword, value)
    return dataset


def ct_with_windows(centers, widths) -> Dataset:
    dataset = pydicom.dcmread(CT_SMALL)
    dataset.WindowCenter, dataset.WindowWidth = centers, widths
    return dataset


def pydicom_output_range(dataset: Dataset) -> tuple[float, float]:
    """The range pydicom's windowing maps into (PS3.3 C.11.2.1.2: the range of the modality output)."""
    bits = dataset.BitsStored
    low, high = (0, 2**bits - 1) if dataset.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return low * dataset.RescaleSlope + dataset.RescaleIntercept, high * dataset.RescaleSlope + dataset.RescaleIntercept


def to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) * 255.0 / (high - low), 0, 255).round()


def assert_clean_error(error: BaseException) -> None:
    """A typed error with no chained Pillow/pydicom exception behind it."""
    assert isinstance(error, Exception)
    assert error.__cause__ is None and error.__context__ is None


# ------------------------------------------------------------------------------------------ sources


def test_every_source_kind_gives_the_same_image(radiology_images, tmp_path):
    path = radiology_images[0]
    data = path.read_bytes()
    encoded = base64.b64encode(data).decode()
    assert encoded.startswith("/9j/")  # a JPEG's base64 starts like an absolute path
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    with open(path, "rb") as handle:
        sources = [
            str(path),
            path,
            data,
            bytearray(data),
            memoryview(data),
            io.BytesIO(data),
            handle,
            encoded,
            wrapped,
            f"data:image/jpeg;base64,{encoded}",
        ]
        loaded = [load_image(source) for source in sources]
    reference = pixels_of(loaded[0])
    for item in loaded:
        assert item.source_format == "JPEG" and not item.is_dicom
        assert np.array_equal(pixels_of(item), reference)
        assert item.metadata == {"width": reference.shape[1], "height": reference.shape[0]}
    assert load_image(loaded[0]) is loaded[0]


def test_pil_and_array_sources():
    gradient = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    from_array = load_image(gradient)
    from_pil = load_image(Image.fromarray(gradient))
    assert np.array_equal(pixels_of(from_array), pixels_of(from_pil))
    assert np.array_equal(pixels_of(from_array)[..., 1], gradient)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert np.array_equal(pixels_of(load_image(rgba))[0, 0], DEFAULT_BACKGROUND)
    for bad, error in [
        (np.zeros((2, 2, 2, 2)), UnsupportedImageFormatError),
        (np.zeros((4, 4, 3), dtype=np.float32), UnsupportedImageFormatError),
        (np.zeros((0, 4)), InvalidImageError),
        (np.array([["a", "b"]]), UnsupportedImageFormatError),
        (np.full((3, 3), np.nan), InvalidImageError),
    ]:
        with pytest.raises(error):
            load_image(bad)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((100, 100), dtype=np.uint8), max_pixels=999)


def test_bad_sources_get_typed_errors(tmp_path):
    text_file = tmp_path / "scan.png"
    Image.new("L", (4, 4)).save(text_file)
    with open(text_file) as handle, pytest.raises(InvalidImageError, match="binary mode"):
        load_image(handle)
    with pytest.raises(UnsupportedImageFormatError, match="source type"):
        load_image(12345)
    with pytest.raises(InvalidImageError, match="folder"):
        load_image(str(tmp_path))
    with pytest.raises(InvalidImageError, match="not found") as missing:
        load_image(str(tmp_path / "SMITH_JANE_scan.png"))
    assert "SMITH_JANE" not in str(missing.value)
    with pytest.raises(InvalidImageError, match="base64"):
        load_image("A" * 63 + "=" + "A" * 10)  # base64 alphabet but broken padding
    with pytest.raises(UnsupportedImageFormatError, match="base64 data URIs"):
        load_image("data:image/png,%89PNG")
    with pytest.raises(ImageTooLargeError):
        load_image(text_file, max_bytes=10)
    with pytest.raises(ImageTooLargeError):
        load_image(io.BytesIO(b"x" * 100), max_bytes=10)


def test_urls_are_refused_by_default():
    for url in ["https://hospital.example/SMITH_JANE.png", "file:///etc/passwd", "ftp://x/y.png"]:
        with raises_typed(ImageURLNotAllowedError) as refused:
            load_image(url)
        assert "SMITH_JANE" not in str(refused.value) and "passwd" not in str(refused.value)
    with raises_typed(ImageURLNotAllowedError, match="http"):
        load_image("file:///etc/passwd", allow_urls=True)


@pytest.fixture
def image_server():
    png = encode(Image.new("RGB", (8, 6), (10, 200, 30)), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/slow.png":
                time.sleep(3)
            body = b"\0" * 5000 if self.path == "/big.png" else png
            self.send_response(404 if self.path == "/missing.png" else 200)
            if self.path != "/big.png":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", png
    server.shutdown()
    server.server_close()


def test_url_opt_in_with_timeout_and_byte_cap(image_server):
    base, png = image_server
    fetched = load_image(f"{base}/ok.png", allow_urls=True)
    assert np.array_equal(pixels_of(fetched), pixels_of(load_image(png)))
    with raises_typed(ImageTooLargeError):
        load_image(f"{base}/big.png", allow_urls=True, max_bytes=1000)
    with raises_typed(InvalidImageError, match="HTTP 404") as missing:
        load_image(f"{base}/missing.png", allow_urls=True)
    assert "127.0.0.1" not in str(missing.value)
    with raises_typed(InvalidImageError, match="within 0.5 s"):
        load_image(f"{base}/slow.png", allow_urls=True, url_timeout_s=0.5)


# ------------------------------------------------------------------------------------------ 2-D modes


def test_16_bit_grayscale_is_windowed_not_clipped():
    ramp = np.linspace(1000, 3000, 256 * 16).reshape(16, 256).astype(np.uint16)
    loaded = load_image(encode(Image.fromarray(ramp), "PNG"))
    gray = pixels_of(loaded)[..., 0].astype(int)
    assert gray.min() == 0 and gray.max() == 255
    assert np.all(np.diff(gray[0]) >= 0) and len(np.unique(gray)) > 200
    # A plain 8-bit conversion saturates every pixel of this X-ray-like range.
    assert len(np.unique(np.asarray(Image.fromarray(ramp).convert("L")))) == 1


def test_float_grayscale_with_nan_and_inf():
    values = np.linspace(-1.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    loaded = load_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert loaded.source_format == "TIFF"
    gray = pixels_of(loaded)[..., 0]
    assert gray[0, 1] == 255 and gray[0, 2] == 0 and gray[0, 3] == 0 and gray[-1, -1] == 255
    assert np.all(np.diff(gray.ravel()[3:].astype(int)) >= 0) and len(np.unique(gray)) > 200


def _transparent(mode: str) -> Image.Image:
    """Left half opaque red (or gray 90 for grayscale modes), right half fully transparent."""
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255) if mode in ("RGBA", "P") else (90, 90, 90, 255), (0, 0, 4, 4))
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":
        palette = rgba.convert("RGB").quantize(colors=4)
        transparent_index = palette.getpixel((6, 0))
        palette.info["transparency"] = transparent_index
        return palette
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("background", [DEFAULT_BACKGROUND, (0, 0, 0)])
def test_transparency_is_composited_on_the_background(mode, background):
    image = _transparent(mode)
    loaded = load_image(encode(image, "PNG"), background=background)
    rgb = pixels_of(loaded)
    assert tuple(rgb[0, 7]) == tuple(background)
    assert tuple(rgb[0, 0]) == ((200, 30, 30) if mode == "P" else (90, 90, 90) if mode == "LA" else (200, 30, 30))


def test_cmyk_one_bit_and_gray_become_rgb():
    cmyk = load_image(encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.source_format == "JPEG" and pixels_of(cmyk).min() >= 250  # no ink: white
    inked = load_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = pixels_of(inked)[2, 2].astype(int)
    assert red > 200 and green < 60 and blue < 60
    bits = Image.new("1", (8, 2), 0)
    bits.putpixel((0, 0), 1)
    one_bit = pixels_of(load_image(encode(bits, "PNG")))
    assert tuple(one_bit[0, 0]) == (255, 255, 255) and tuple(one_bit[0, 1]) == (0, 0, 0)
    gray = Image.linear_gradient("L").resize((32, 32))
    loaded = pixels_of(load_image(encode(gray, "JPEG")))
    assert np.array_equal(loaded[..., 0], loaded[..., 1]) and np.array_equal(loaded[..., 1], loaded[..., 2])


def test_exif_orientation_is_applied_and_malformed_exif_falls_back(monkeypatch):
    image = Image.linear_gradient("L").resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = load_image(encode(image, "JPEG", exif=exif))
    assert rotated.image.size == (20, 40) and rotated.warnings == []
    broken = encode(image, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x12\x01")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = load_image(broken)
    assert kept.image.size == (40, 20) and kept.warnings == [medical_image.METADATA_FALLBACK_WARNING]
    assert not caught, [str(w.message) for w in caught]  # Pillow's "Corrupt EXIF" warning does not escape

    def exploding(*args, **kwargs):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(medical_image.ImageOps, "exif_transpose", exploding)
    fallback = load_image(encode(image, "JPEG", exif=exif))
    assert fallback.image.size == (40, 20) and fallback.warnings == [medical_image.METADATA_FALLBACK_WARNING]


# ------------------------------------------------------------------------------------------ bad data


def test_truncated_garbage_and_empty_data(radiology_images):
    jpeg = radiology_images[0].read_bytes()
    png = encode(Image.linear_gradient("L"), "PNG")
    ct = CT_SMALL.read_bytes()
    cases = [
        (b"", InvalidImageError),
        (b"\x00NOT-AN-IMAGE-patient-secret" * 20, UnsupportedImageFormatError),
        (jpeg[: len(jpeg) // 2], InvalidImageError),
        (png[: len(png) // 2], InvalidImageError),
        (png[:40], UnsupportedImageFormatError),  # cut inside the header
        (ct[: len(ct) // 2], ImageInputError),  # pydicom drops the cut pixel element: "... or truncated"
        (ct[:300], ImageInputError),  # cut inside the DICOM header
        ((PYDICOM_FILES / "MR_truncated.dcm").read_bytes(), InvalidImageError),
    ]
    for data, error in cases:
        with pytest.raises(error) as raised:
            load_image(data)
        assert_clean_error(raised.value)
        assert "patient-secret" not in str(raised.value)
        if error is ImageInputError:
            assert "truncated" in str(raised.value)


def test_format_is_decided_by_content_not_name(tmp_path):
    png_named_dcm = tmp_path / "scan.dcm"
    Image.new("L", (5, 5), 40).save(png_named_dcm, "PNG")
    assert load_image(png_named_dcm).source_format == "PNG"
    dicom_named_png = tmp_path / "scan.png"
    dicom_named_png.write_bytes(CT_SMALL.read_bytes())
    assert load_image(dicom_named_png).is_dicom
    html_named_jpg = tmp_path / "scan.jpg"
    html_named_jpg.write_text("<!DOCTYPE html><html><body><img src='x.jpg'></body></html>" * 10)
    with pytest.raises(UnsupportedImageFormatError, match="accepted format"):
        load_image(html_named_jpg)
    # Formats outside the allowlist are refused even though Pillow could read them.
    with pytest.raises(UnsupportedImageFormatError):
        load_image(encode(Image.new("RGB", (4, 4)), "PPM"))


# ------------------------------------------------------------------------------------------ bombs


def _png_bomb(width: int, height: int) -> bytes:
    """A real bomb: zero rows of an 8-bit grayscale PNG, compressed ~1000:1."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _deflated_dicom_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to ``inflated_bytes``."""
    dataset = new_dicom(np.zeros((8, 8), dtype=np.uint8))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    written = dicom_bytes(dataset)
    meta_end = 132 + 12 + struct.unpack("<I", written[140:144])[0]  # preamble, DICM, group length, group 0002
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, inflated_bytes)  # one huge private OB value
    zeros = b"\x00" * (1 << 20)
    parts = [compressor.compress(element)] + [compressor.compress(zeros) for _ in range(inflated_bytes >> 20)]
    return written[:meta_end] + b"".join(parts) + compressor.flush()


def _jpeg_in_small_dicom_header(size: int) -> bytes:
    """DICOM header says 8 x 8, the JPEG inside is ``size`` x ``size``."""
    dataset = new_dicom(np.zeros((8, 8, 3), dtype=np.uint8), "RGB")
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([encode(Image.new("RGB", (size, size), (9, 9, 9)), "JPEG", quality=10)])
    dataset["PixelData"].VR = "OB"
    dataset.PhotometricInterpretation = "YBR_FULL_422"
    return dicom_bytes(dataset)


def test_bombs_are_refused_with_bounded_memory(tmp_path):
    """Each bomb runs in a fresh process; its peak resident memory must not grow past a small margin."""
    header_bomb = new_dicom(np.zeros((8, 8), dtype=np.uint16), bits_stored=16)
    header_bomb.Rows = header_bomb.Columns = 60000
    frames_bomb = new_dicom(np.zeros((8, 8), dtype=np.uint16), bits_stored=16)
    frames_bomb.Rows = frames_bomb.Columns = 512
    frames_bomb.NumberOfFrames = 10000
    files = {
        "png_400M": _png_bomb(20000, 20000),
        "png_100M": _png_bomb(10000, 10000),
        "dicom_header": dicom_bytes(header_bomb),
        "dicom_frames": dicom_bytes(frames_bomb),
        "dicom_deflated_256MB": _deflated_dicom_bomb(256 << 20),
        "dicom_jpeg_64M": _jpeg_in_small_dicom_header(8000),
    }
    for name, data in files.items():
        assert len(data) < 2 << 20, name  # each bomb is small on disk
        (tmp_path / name).write_bytes(data)
    cases = [
        ["png_400M", {}],
        ["png_400M", {"max_pixels": 10**9}],  # past our cap: Pillow's DecompressionBombError
        ["png_100M", {"max_pixels": 10**9}],  # Pillow's DecompressionBombWarning, made an error
        ["dicom_header", {}],
        ["dicom_frames", {}],
        ["dicom_deflated_256MB", {}],
        ["dicom_jpeg_64M", {}],
    ]
    script = f"""
import json, resource, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
import numpy as np
from PIL import Image
from medical_image import load_image
load_image(np.zeros((8, 8), dtype=np.uint8)); load_image({str(CT_SMALL)!r}); load_image({str(MR_SMALL)!r})
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for name, options in {cases!r}:
    try:
        load_image({str(tmp_path)!r} + "/" + name, **options)
        outcomes.append("loaded")
    except Exception as error:
        outcomes.append(type(error).__name__)
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
print(json.dumps({{"outcomes": outcomes, "growth_mb": growth_mb}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcomes"] == ["ImageTooLargeError"] * len(cases), report
    # The smallest bomb decodes to 100 MB; a refused one costs a few MB (the file itself, parsers).
    assert report["growth_mb"] < 40, report


def _noise_frames(count: int = 3, size: int = 16) -> list[Image.Image]:
    generator = np.random.default_rng(7)
    return [Image.fromarray(generator.integers(0, 255, (size, size), dtype=np.uint8)) for _ in range(count)]


def _gif_with_large_second_frame(width: int, height: int) -> bytes:
    """A 3-frame GIF whose second image descriptor declares width x height (its pixels stay 16 x 16)."""
    frames = [frame.convert("P") for frame in _noise_frames()]
    data = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10))
    descriptor = b"\x2c" + struct.pack("<4H", 0, 0, 16, 16)
    second = data.index(descriptor, data.index(descriptor) + 1)
    struct.pack_into("<2H", data, second + 5, width, height)
    return bytes(data)


def _apng_with_large_second_frame(width: int, height: int) -> bytes:
    """A 3-frame APNG whose second frame control chunk (fcTL) declares width x height, with a valid CRC."""
    frames = _noise_frames()
    data = bytearray(encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=10))
    second = data.index(b"fcTL", data.index(b"fcTL") + 1)
    struct.pack_into(">II", data, second + 8, width, height)
    struct.pack_into(">I", data, second + 30, zlib.crc32(bytes(data[second : second + 30])))
    return bytes(data)


def _tiff_with_large_second_page(width: int, height: int) -> bytes:
    """A 3-page TIFF whose second directory (IFD) declares width x height."""
    frames = _noise_frames()
    data = bytearray(encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]))
    assert data[:4] == b"II*\x00"
    directory = struct.unpack_from("<I", data, 4)[0]
    directory = struct.unpack_from("<I", data, directory + 2 + 12 * struct.unpack_from("<H", data, directory)[0])[0]
    for entry in range(struct.unpack_from("<H", data, directory)[0]):
        offset = directory + 2 + 12 * entry
        tag, kind = struct.unpack_from("<HH", data, offset)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<H" if kind == 3 else "<I", data, offset + 8, width if tag == 256 else height)
    return bytes(data)


@pytest.mark.parametrize(
    "build", [_gif_with_large_second_frame, _apng_with_large_second_frame, _tiff_with_large_second_page]
)
def test_every_frame_is_checked_against_the_pixel_limit_before_decoding(build, monkeypatch):
    fine = load_image(build(16, 16))  # the same file with honest frames loads (its first frame)
    assert fine.image.size == (16, 16)
    assert Image.open(io.BytesIO(build(16, 16))).n_frames == 3
    bomb, just_over = build(20000, 20000), build(40, 40)
    assert Image.open(io.BytesIO(bomb)).size == (16, 16)  # the first frame alone looks harmless
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded despite a frame over the limit"))
    for plugin_class in (GifImagePlugin.GifImageFile, PngImagePlugin.PngImageFile, TiffImagePlugin.TiffImageFile):
        monkeypatch.setattr(plugin_class, "load", lambda self: pytest.fail("decoded despite a frame over the limit"))
    with raises_typed(ImageTooLargeError, match="pixel limit") as raised:
        load_image(bomb)
    assert_clean_error(raised.value)
    with raises_typed(ImageTooLargeError):  # a second frame just over a smaller limit is refused too
        load_image(just_over, max_pixels=1000)


def test_deflated_dicom_loads_when_within_the_cap():
    loaded = load_image(PYDICOM_FILES / "image_dfl.dcm")
    assert loaded.is_dicom and loaded.image.size == (512, 512)
    assert loaded.metadata["transfer_syntax"] == DeflatedExplicitVRLittleEndian.name


# ------------------------------------------------------------------------------------------ DICOM pixels


def test_ct_golden_against_pydicom_and_step_order_matters():
    dataset = ct_with_windows([40, 300], [400, 1500])  # multi-valued: the first window applies
    loaded = load_image(dicom_bytes(dataset))
    gray = pixels_of(loaded)[..., 0].astype(int)
    stored = dataset.pixel_array
    low, high = pydicom_output_range(dataset)
    golden = to_8bit(apply_voi_lut(apply_modality_lut(stored, dataset), dataset, index=0), low, high)
    assert np.abs(gray - golden).max() <= 1
    assert loaded.metadata["window_source"] == "header"
    assert (loaded.metadata["window_center"], loaded.metadata["window_width"]) == (40.0, 400.0)
    # Swapping the steps (window on stored values, then rescale) gives another image: the test can fail.
    swapped = to_8bit(apply_modality_lut(apply_voi_lut(stored, dataset, index=0), dataset), low, high)
    assert np.abs(gray - swapped).mean() > 20
    # So does picking the second window.
    second = to_8bit(apply_voi_lut(apply_modality_lut(stored, dataset), dataset, index=1), low, high)
    assert np.abs(gray - second).mean() > 5
    assert set(loaded.metadata) <= ALLOWED_METADATA_KEYS
    assert loaded.metadata["modality"] == "CT" and loaded.metadata["rescale_intercept"] == -1024.0


def test_ct_without_window_gets_a_percentile_window():
    loaded = load_image(CT_SMALL)
    dataset = pydicom.dcmread(CT_SMALL)
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset)
    low, high = np.percentile(hounsfield, [0.5, 99.5])
    assert loaded.metadata["window_source"] == "percentile"
    assert np.abs(pixels_of(loaded)[..., 0].astype(int) - to_8bit(hounsfield, low, high)).max() <= 1
    assert loaded.metadata["window_center"] == pytest.approx((low + high) / 2)


def test_real_ct_slice_512_in_jpeg_2000():
    loaded = load_image(PYDICOM_FILES / "693_J2KI.dcm")
    assert loaded.image.size == (512, 512) and loaded.metadata["modality"] == "CT"
    assert loaded.metadata["window_source"] == "header" and pixels_of(loaded).std() > 10


def test_monochrome1_is_inverted_after_the_voi_step():
    """Real CR (MONOCHROME1, rescale 0.684/200, window in the header)."""
    dataset = pydicom.dcmread(CR_MONOCHROME1)
    loaded = load_image(CR_MONOCHROME1)
    gray = pixels_of(loaded)[..., 0].astype(int)
    low, high = pydicom_output_range(dataset)
    voi = to_8bit(apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset), low, high)
    assert np.abs(gray - (255 - voi)).max() <= 1
    assert np.abs(gray - voi).mean() > 20  # without inversion: another image
    # With an off-centre window, inverting the stored values before the VOI step is another image too.
    values = apply_modality_lut(dataset.pixel_array, dataset)
    dataset.WindowCenter, dataset.WindowWidth = float(np.percentile(values, 25)), float(np.ptp(values) / 4)
    gray = pixels_of(load_image(dicom_bytes(dataset)))[..., 0].astype(int)
    right = 255 - to_8bit(apply_voi_lut(values, dataset), low, high)
    stored_inverted = (2**dataset.BitsStored - 1) - dataset.pixel_array
    wrong = 255 - to_8bit(apply_voi_lut(apply_modality_lut(stored_inverted, dataset), dataset), low, high)
    assert np.abs(gray - right).max() <= 1 and np.abs(gray - wrong).mean() > 20
    assert loaded.metadata["modality"] == "CR" and loaded.metadata["photometric_interpretation"] == "MONOCHROME1"
    # The same pixels labelled MONOCHROME2 are the exact inverse.
    dataset.PhotometricInterpretation = "MONOCHROME2"
    assert np.array_equal(pixels_of(load_image(dicom_bytes(dataset)))[..., 0].astype(int), 255 - gray)


def test_same_mr_slice_from_every_decodable_transfer_syntax():
    reference = pixels_of(load_image(MR_SMALL))
    names = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm"]
    names.append("MR_small_jp2klossless.dcm")
    for name in names:
        assert np.array_equal(pixels_of(load_image(PYDICOM_FILES / name)), reference), name


def test_voi_lut_sequence_is_preferred_over_the_window():
    dataset = ct_with_windows(40, 400)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", list(range(4096)))
    dataset.VOILUTSequence = [item]
    loaded = load_image(dicom_bytes(dataset))
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset)
    expected = to_8bit(apply_voi_lut(np.rint(hounsfield).astype(np.int64), dataset).astype(float), 0, 4095)
    assert loaded.metadata["window_source"] == "voi_lut"
    assert np.abs(pixels_of(loaded)[..., 0].astype(int) - expected).max() <= 1
    # An unusable VOI LUT (9 bits per entry is not allowed) falls through to the header's window.
    item.LUTDescriptor = [4096, 0, 9]
    fallback = load_image(dicom_bytes(dataset))
    assert fallback.metadata["window_source"] == "header" and "The DICOM VOI LUT is invalid" in fallback.warnings[0]
    assert np.array_equal(pixels_of(fallback), pixels_of(load_image(dicom_bytes(ct_with_windows(40, 400)))))


def test_invalid_window_falls_back_to_percentile_with_a_warning():
    loaded = load_image(dicom_bytes(ct_with_windows(40, 0)))  # LINEAR needs width >= 1
    assert loaded.metadata["window_source"] == "percentile"
    assert any("window settings are invalid" in note for note in loaded.warnings)


def test_colour_dicom_rgb_ybr_and_palette():
    reference = pixels_of(load_image(PYDICOM_FILES / "SC_rgb_rle.dcm")).astype(int)
    for name in ["SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"]:
        loaded = load_image(PYDICOM_FILES / name)
        assert loaded.metadata["photometric_interpretation"].startswith("YBR")
        assert np.abs(pixels_of(loaded).astype(int) - reference).mean() < 4, name
    for name in ["SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"]:  # deeper samples scale to the same 8-bit image
        assert np.abs(pixels_of(load_image(PYDICOM_FILES / name)).astype(int) - reference).max() <= 1, name
    # A YBR_FULL dataset built from known RGB comes back as that RGB.
    red, green = np.meshgrid(np.arange(0, 256, 16), np.arange(0, 256, 16), indexing="ij")
    rgb = np.stack([red, green, np.full((16, 16), 99)], -1).astype(np.uint8)
    ybr = new_dicom(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    assert np.abs(pixels_of(load_image(dicom_bytes(ybr))).astype(int) - rgb).max() <= 2
    palette = pixels_of(load_image(PYDICOM_FILES / "examples_palette.dcm")).astype(int)
    assert np.abs(palette[..., 0] - palette[..., 2]).mean() > 5  # real colour came out of the LUT


def _multi_frame(frames: int = 5) -> Dataset:
    volume = np.zeros((frames, 30, 30), dtype=np.uint8)
    for index in range(frames):
        volume[index, index * 6 : index * 6 + 6, :] = 200  # a bright band whose row says which frame
    dataset = new_dicom(volume)
    dataset.compress(RLELossless)
    return dataset


def _bright_band(loaded: LoadedImage) -> int:
    return int(np.argmax(pixels_of(loaded)[:, 0, 0] > 128)) // 6


def test_multi_frame_decodes_one_frame_only(monkeypatch):
    data = dicom_bytes(_multi_frame())
    calls = []
    real_pixel_array = medical_image.pixel_array

    def spying_pixel_array(dataset, **kwargs):
        calls.append(kwargs)
        return real_pixel_array(dataset, **kwargs)

    monkeypatch.setattr(medical_image, "pixel_array", spying_pixel_array)
    middle = load_image(data)
    assert calls == [{"index": 2}] and _bright_band(middle) == 2
    assert middle.metadata["frame"] == 2 and middle.metadata["number_of_frames"] == 5
    assert any("Only frame 2 of a 5-frame" in note for note in middle.warnings)
    assert _bright_band(load_image(data, frame=0)) == 0
    assert _bright_band(load_image(data, frame=-1)) == 4
    for bad in (5, -6, 1.5, True):
        with pytest.raises(InvalidImageError, match="frame"):
            load_image(data, frame=bad)


def test_header_arithmetic_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(medical_image, "pixel_array", lambda *a, **k: pytest.fail("decoded despite the header"))
    dataset = new_dicom(np.zeros((8, 8), dtype=np.uint16), bits_stored=16)
    dataset.Rows = dataset.Columns = 1000
    with pytest.raises(ImageTooLargeError, match="pixel limit"):
        load_image(dicom_bytes(dataset), max_pixels=999_999)
    dataset.Rows = dataset.Columns = 100
    dataset.NumberOfFrames = 1000  # 100 * 100 * 1000 * 16 bits = 20 MB declared
    with pytest.raises(ImageTooLargeError, match="declares"):
        load_image(dicom_bytes(dataset), max_decoded_bytes=10_000_000)
    dataset.BitsAllocated = 12
    with pytest.raises(InvalidImageError, match="geometry"):
        load_image(dicom_bytes(dataset))


def test_dicomdir_and_objects_without_pixels_are_refused():
    with pytest.raises(UnsupportedImageFormatError, match="DICOMDIR"):
        load_image(PYDICOM_FILES / "dicomdirtests" / "DICOMDIR")
    for name in ["reportsi.dcm", "rtplan.dcm", "waveform_ecg.dcm"]:
        with pytest.raises(UnsupportedImageFormatError, match="no image"):
            load_image(PYDICOM_FILES / name)


def test_compressed_syntax_without_decoder_names_syntax_and_package(monkeypatch):
    """The pinned plugins decode JPEG-LS; without them the typed error names the syntax and the package.

    "Without them" is pydicom's own plugin table with the pylibjpeg entry moved to its unavailable side, the state
    of an installation that lacks pylibjpeg-libjpeg.
    """
    jpeg_ls = PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm"
    assert np.array_equal(pixels_of(load_image(jpeg_ls)), pixels_of(load_image(MR_SMALL)))
    libjpeg = ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": libjpeg})
    with raises_typed(DicomDecoderMissingError) as raised:
        load_image(jpeg_ls)
    assert isinstance(raised.value, UnsupportedImageFormatError)
    assert "JPEG-LS Lossless" in str(raised.value) and "pylibjpeg-libjpeg" in str(raised.value)
    assert_clean_error(raised.value)
    # With Pillow as the only JPEG decoder, 12-bit JPEG Extended fails to decode: the message says what helps.
    extended = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(extended, "_available", {"pillow": extended._available["pillow"]})
    monkeypatch.setattr(extended, "_unavailable", {"pylibjpeg": libjpeg})
    with raises_typed(InvalidImageError, match="pylibjpeg-libjpeg"):
        load_image(PYDICOM_FILES / "JPGExtended.dcm")


def test_every_compressed_syntax_decodes_with_the_pinned_plugins():
    """JPEG Lossless SV1, JPEG-LS (lossless, near-lossless), 12-bit JPEG Extended, JPEG 2000 with YBR_RCT."""
    rgb = pixels_of(load_image(PYDICOM_FILES / "SC_rgb_rle.dcm"))
    sv1 = load_image(PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm")
    assert sv1.metadata["transfer_syntax"].startswith("JPEG Lossless, Non-Hierarchical, First-Order Prediction")
    assert np.array_equal(pixels_of(sv1), rgb)  # lossless: the same pixels as the RLE copy
    near = load_image(PYDICOM_FILES / "JPEGLSNearLossless_16.dcm")
    assert near.metadata["transfer_syntax"] == "JPEG-LS Lossy (Near-Lossless) Image Compression"
    extended = load_image(PYDICOM_FILES / "JPGExtended.dcm")
    assert extended.metadata["bits_stored"] == 12 and pixels_of(extended).std() > 10
    # Its original, whose scan header says Se=0 (DCMTK warns and reads it): corrected, the same pixels, a warning.
    original = load_image(PYDICOM_FILES / "JPEG-lossy.dcm")
    assert np.array_equal(pixels_of(original), pixels_of(extended)) and not extended.warnings
    assert original.warnings == [medical_image.JPEG_SCAN_REPAIRED_WARNING]
    # A JPEG stream cut inside its headers is not repairable: the typed error, nothing chained.
    cut = pydicom.dcmread(PYDICOM_FILES / "JPEG-lossy.dcm")
    cut.PixelData = encapsulate([next(generate_frames(cut.PixelData, number_of_frames=1))[:120]])
    with raises_typed(InvalidImageError, match="could not be decoded") as raised:
        load_image(dicom_bytes(cut))
    assert_clean_error(raised.value)
    rct = load_image(PYDICOM_FILES / "GDCMJ2K_TextGBR.dcm")
    assert rct.metadata["photometric_interpretation"] == "YBR_RCT"
    colours = pixels_of(rct).astype(int)
    assert np.abs(colours[..., 0] - colours[..., 2]).mean() > 5  # real colour came back, not a gray image
    # Baseline JPEG is decoded by Pillow first (pylibjpeg is installed too): the rendering DCMTK gives.
    calls = []
    real_pixel_array = medical_image.pixel_array

    def spying_pixel_array(dataset, **kwargs):
        calls.append(kwargs)
        return real_pixel_array(dataset, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medical_image, "pixel_array", spying_pixel_array)
        load_image(PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    assert calls == [{"index": None, "decoding_plugin": "pillow"}]


def test_file_without_preamble_is_read_with_a_warning_and_non_dicom_keeps_its_error():
    part10 = CT_SMALL.read_bytes()
    reference = load_image(part10)
    meta_first = load_image(part10[132:])  # file meta at byte 0: no preamble, no "DICM"
    bare = pydicom.dcmread(CT_SMALL)
    del bare.file_meta
    bare.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, bare, implicit_vr=True, little_endian=True)  # the dataset alone, ACR-NEMA style
    assert buffer.getvalue()[:2] == b"\x08\x00"
    dataset_only = load_image(buffer.getvalue())
    for loaded in (meta_first, dataset_only):
        assert loaded.is_dicom and np.array_equal(pixels_of(loaded), pixels_of(reference))
        assert medical_image.NO_PREAMBLE_WARNING in loaded.warnings
    assert medical_image.NO_PREAMBLE_WARNING not in reference.warnings
    assert dataset_only.metadata["transfer_syntax"] == "Implicit VR Little Endian"
    # Data that merely starts like a dataset, and data that is not DICOM at all, keep their typed errors.
    with raises_typed(ImageInputError) as raised:
        load_image(b"\x08\x00\x05\x00" + bytes(range(256)) * 4)
    assert_clean_error(raised.value)
    with raises_typed(UnsupportedImageFormatError, match="not an image in an accepted format"):
        load_image(b"%PDF-1.7 " + bytes(range(256)) * 4)


def test_malformed_number_of_frames_is_counted_from_the_pixel_data():
    """badVR.dcm: Number of Frames is "1A" (not an IS); DCMTK renders it, and so does the project."""
    loaded = load_image(PYDICOM_FILES / "badVR.dcm", frame=0)
    assert loaded.metadata["number_of_frames"] == 15  # 6000 bytes of 10 x 10 x 32-bit frames
    assert any("number of frames is malformed: 15 frame(s)" in note for note in loaded.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own complaint about "1A"
        dataset = pydicom.dcmread(PYDICOM_FILES / "badVR.dcm")
        dataset.NumberOfFrames = 15
        third = dataset.pixel_array[3].astype(float)
    low, high = np.percentile(third, [0.5, 99.5])
    gray = pixels_of(load_image(PYDICOM_FILES / "badVR.dcm", frame=3))[..., 0].astype(int)
    assert np.abs(gray - to_8bit(third, low, high)).max() <= 1
    assert load_image(PYDICOM_FILES / "badVR.dcm").metadata["frame"] == 7


def test_voi_lut_output_is_scaled_over_the_declared_output_range():
    """PS3.3 C.11.2.1.1: a 12-bit VOI LUT maps onto 0..4095, whatever sub-range its entries use."""
    dataset = ct_with_windows(40, 400)
    item = Dataset()
    item.add_new("LUTDescriptor", "SS", [4096, -1024, 12])
    entries = np.linspace(300, 3500, 4096).round().astype(int)
    item.add_new("LUTData", "US", entries.tolist())
    dataset.VOILUTSequence = [item]
    loaded = load_image(dicom_bytes(dataset))
    hounsfield = np.rint(apply_modality_lut(dataset.pixel_array, dataset)).astype(int)
    output = entries[np.clip(hounsfield + 1024, 0, 4095)]
    gray = pixels_of(loaded)[..., 0].astype(int)
    assert loaded.metadata["window_source"] == "voi_lut"
    assert np.abs(gray - to_8bit(output, 0, 4095)).max() <= 1
    assert np.abs(gray - to_8bit(output, 300, 3500)).max() > 10  # the entries' own min..max: another image


# ------------------------------------------------------------------------------------------ CT windows


def test_ct_windows_are_packed_into_the_rgb_channels():
    dataset = ct_with_windows(40, 400)
    data = dicom_bytes(dataset)
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset)
    loaded = load_image(data, ct_windows=["brain", "lung", (300, 1500)])
    rgb = pixels_of(loaded).astype(int)
    for channel, (center, width) in enumerate([(40, 80), (-600, 1500), (300, 1500)]):
        # PS3.3 C.11.2.1.2.1 LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped.
        expected = np.clip(((hounsfield - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255).round()
        assert np.abs(rgb[..., channel] - expected).max() <= 1, channel
    assert loaded.metadata["window_source"] == "ct_windows"
    assert loaded.metadata["ct_windows"] == [[40.0, 80.0], [-600.0, 1500.0], [300.0, 1500.0]]
    assert set(loaded.metadata) <= ALLOWED_METADATA_KEYS and not loaded.warnings
    named = load_image(data, ct_windows=("Brain", "lung", "bone"))
    explicit = load_image(data, ct_windows=[[40, 80], [-600, 1500], medical_image.CT_WINDOW_PRESETS["bone"]])
    assert np.array_equal(pixels_of(named), pixels_of(explicit))
    default = load_image(data)
    assert default.metadata["window_source"] == "header" and np.array_equal(
        pixels_of(default)[..., 0], pixels_of(default)[..., 1]
    )
    assert load_image(data, ct_windows=None).image.tobytes() == default.image.tobytes()


def test_ct_windows_elsewhere_warn_and_keep_the_single_window():
    single = pixels_of(load_image(MR_SMALL))
    mr = load_image(MR_SMALL, ct_windows=["brain", "lung", "bone"])
    assert np.array_equal(pixels_of(mr), single) and mr.metadata["window_source"] == "header"
    assert mr.warnings == [medical_image.CT_WINDOWS_NOT_APPLIED_WARNING]
    no_rescale = ct_with_windows(40, 400)
    del no_rescale.RescaleSlope, no_rescale.RescaleIntercept
    loaded = load_image(dicom_bytes(no_rescale), ct_windows=["brain", "lung", "bone"])
    assert medical_image.CT_WINDOWS_NOT_APPLIED_WARNING in loaded.warnings
    assert loaded.metadata["window_source"] == "header"
    png = load_image(encode(Image.new("L", (8, 8), 90), "PNG"), ct_windows=["brain", "lung", "bone"])
    assert png.warnings == [medical_image.CT_WINDOWS_NOT_APPLIED_WARNING]
    colour = load_image(PYDICOM_FILES / "SC_rgb_rle.dcm", ct_windows=["brain", "lung", "bone"])
    assert medical_image.CT_WINDOWS_NOT_APPLIED_WARNING in colour.warnings


@pytest.mark.parametrize(
    "bad",
    [
        "brain",
        ["brain", "lung"],
        ["brain", "lung", "nope"],
        [(40, 0), "lung", "bone"],
        [(40,), "lung", "bone"],
        [(True, 80), "lung", "bone"],
        [(float("nan"), 80), "lung", "bone"],
        {"brain": 1},
    ],
)
def test_bad_ct_windows_are_a_typed_error(bad):
    with raises_typed(InputError, match="ct_windows must be None or three CT windows"):
        load_image(CT_SMALL, ct_windows=bad)


def test_ct_windows_through_the_pipeline_and_its_cache(vqa, monkeypatch):
    from pipeline_vqa import image_content_hash

    ct = dicom_bytes(ct_with_windows(45, 350))  # not used by other tests: its cache entries are its own
    windows = ["brain", "subdural", "bone"]
    first = vqa({"image": ct, "question": "Which organ?"}, ct_windows=windows)
    again = vqa({"image": ct, "question": "Which organ?"}, ct_windows=windows)
    other = vqa({"image": ct, "question": "Which organ?"}, ct_windows=["lung", "mediastinum", "soft_tissue"])
    single = vqa({"image": ct, "question": "Which organ?"})
    assert first["image_metadata"]["ct_windows"] == [list(medical_image.CT_WINDOW_PRESETS[n]) for n in windows]
    assert "ct_windows" not in single["image_metadata"]
    # The cache key is the hash of the windowed pixels: other windows are another image, read again.
    assert again["intermediate_cached"] and not other["intermediate_cached"] and not single["intermediate_cached"]
    hashes = {
        image_content_hash(load_image(ct, ct_windows=w).image) for w in (windows, ["lung", "liver", "bone"], None)
    }
    assert len(hashes) == 3
    with raises_typed(InputError, match="ct_windows"):
        vqa({"image": ct, "question": "Which organ?"}, ct_windows=["brain"])
    # The config default applies when the call gives none.
    monkeypatch.setattr(vqa.model.config, "ct_windows", windows, raising=False)
    assert (
        vqa({"image": ct, "question": "Which organ?"})["image_metadata"]["ct_windows"]
        == first["image_metadata"]["ct_windows"]
    )


def test_metadata_allowlist_and_non_conforming_values():
    dataset = pydicom.dcmread(CT_SMALL)
    dataset.BodyPartExamined = "HEAD"
    dataset.ViewPosition = "AP"
    dataset.BurnedInAnnotation = "YES"
    loaded = load_image(dicom_bytes(dataset))
    assert set(loaded.metadata) <= ALLOWED_METADATA_KEYS
    assert loaded.metadata["body_part_examined"] == "HEAD" and loaded.metadata["burned_in_annotation"] == "YES"
    assert medical_image.BURNED_IN_ANNOTATION_WARNING in loaded.warnings
    assert dicom_prompt_context(loaded.metadata) == "Modality: CT. Body part: HEAD. View: AP."
    assert dicom_prompt_context({"width": 3, "height": 4}) is None
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom still warns about the value this test plants on purpose
        dataset.BodyPartExamined = "free text, lower case and too long"
    loaded = load_image(dicom_bytes(dataset))
    assert "body_part_examined" not in loaded.metadata
    assert any("BodyPartExamined" in note and "free text" not in note for note in loaded.warnings)


# ------------------------------------------------------------------------------------------ privacy

CANARY_FIELDS = {
    "PatientName": "QZXNAME^ALICE",
    "OtherPatientNames": "QZXOTHERNAME^BOB",
    "PatientMotherBirthName": "QZXMOTHER^CAROL",
    "PatientID": "QZXPID123",
    "OtherPatientIDs": "QZXOTHERPID",
    "IssuerOfPatientID": "QZXISSUER",
    "PatientBirthDate": "18991231",
    "PatientAge": "087Y",
    "PatientAddress": "QZX 1 CANARY ROAD",
    "PatientTelephoneNumbers": "QZXTEL5550100",
    "PatientComments": "QZX patient comment",
    "AdditionalPatientHistory": "QZX history",
    "StudyDate": "18980101",
    "SeriesDate": "18980102",
    "AcquisitionDate": "18980103",
    "ContentDate": "18980104",
    "StudyTime": "235959.987654",
    "AccessionNumber": "QZXACC77",
    "StudyID": "QZXSTUDY",
    "StudyInstanceUID": "2.25.987654321987654321",
    "SeriesInstanceUID": "2.25.987654321987654322",
    "InstitutionName": "QZX General Hospital",
    "InstitutionAddress": "QZX Hospital Street",
    "InstitutionalDepartmentName": "QZX Radiology",
    "ReferringPhysicianName": "QZXREFERRER^DAN",
    "PerformingPhysicianName": "QZXPERFORMER^EVE",
    "PhysiciansOfRecord": "QZXRECORD^FAY",
    "NameOfPhysiciansReadingStudy": "QZXREADER^GUS",
    "OperatorsName": "QZXOPERATOR^HAL",
    "StationName": "QZXSTATION",
    "DeviceSerialNumber": "QZXSERIAL",
    "StudyDescription": "QZX study description",
    "SeriesDescription": "QZX series description",
    "ProtocolName": "QZX protocol",
    "ImageComments": "QZX image comment",
    "RequestingPhysician": "QZXREQUESTER^IDA",
}
CANARY_MARKERS = ["QZX", *[value for value in CANARY_FIELDS.values() if "QZX" not in value], "9876543219876"]


def canary_dicom(**overrides) -> Dataset:
    """A CT slice with a canary in every identifying field, a private block and a nested sequence."""
    dataset = ct_with_windows(40, 400)
    for keyword, value in CANARY_FIELDS.items():
        setattr(dataset, keyword, value)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "2.25.987654321987654323"
    block = dataset.private_block(0x0011, "QZX PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", "QZX private value")
    requested = Dataset()
    requested.RequestedProcedureDescription = "QZX requested procedure"
    requested.ReasonForTheRequestedProcedure = "QZX reason"
    dataset.RequestAttributesSequence = [requested]
    dataset.BodyPartExamined = "HEAD"
    dataset.BurnedInAnnotation = "YES"
    for keyword, value in overrides.items():
        setattr(dataset, keyword, value)
    return dataset


def assert_no_canary(text: str, where: str) -> None:
    for marker in CANARY_MARKERS:
        assert marker.lower() not in text.lower(), f"{marker!r} leaked into {where}"


def test_canaries_never_leave_the_dicom_file(vqa, caplog, capfd):
    canary = dicom_bytes(canary_dicom())
    no_pixels = canary_dicom()
    del no_pixels.PixelData
    undecodable = canary_dicom()
    undecodable.file_meta.TransferSyntaxUID = JPEGLSLossless
    undecodable.PixelData = encapsulate([b"\xff\xd8QZX-not-a-jpeg-ls-stream\xff\xd9"])
    undecodable["PixelData"].VR = "OB"
    error_inputs = {
        "no_pixels": (dicom_bytes(no_pixels), {}),
        "undecodable": (dicom_bytes(undecodable), {}),
        "truncated_pixels": (canary[: len(canary) - 5000], {}),
        "truncated_header": (canary[:900], {}),
        "bad_frame": (canary, {"frame": 7}),
        "too_large": (canary, {"max_pixels": 100}),
    }
    handlers_before = list(logging.getLogger("pydicom").handlers)
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True)  # pydicom now logs every element it reads, values included
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_image(canary)
            record = vqa(
                {"image": canary, "question": "What is seen?", "expert": "chart"},
                return_prompt=True,
                dicom_context=True,
            )
            errors = {}
            for name, (data, options) in error_inputs.items():
                with pytest.raises(ImageInputError) as raised:
                    load_image(data, **options)
                errors[name] = raised.value
            for name in ("no_pixels", "truncated_pixels"):
                with raises_typed(ImageInputError) as raised:
                    vqa({"image": error_inputs[name][0], "question": "What is seen?"})
                errors[f"pipeline_{name}"] = raised.value
    finally:
        pydicom.config.debug(False)
        for handler in logging.getLogger("pydicom").handlers:
            if handler not in handlers_before:
                logging.getLogger("pydicom").removeHandler(handler)
    captured = capfd.readouterr()

    # The technical fields made it through, and the record is what the LM saw.
    assert loaded.metadata["modality"] == "CT" and loaded.metadata["body_part_examined"] == "HEAD"
    assert set(loaded.metadata) <= ALLOWED_METADATA_KEYS
    assert record["expert"] == "radiology" and record["image_metadata"] == loaded.metadata
    assert record["intermediate_text"].startswith("Modality: CT. Body part: HEAD.")
    assert record["prompt"] == build_inference_prompt("What is seen?", record["intermediate_text"])
    assert medical_image.BURNED_IN_ANNOTATION_WARNING in record["warnings"]
    assert isinstance(errors["undecodable"], (DicomDecoderMissingError, InvalidImageError))
    assert isinstance(errors["too_large"], ImageTooLargeError)

    # Nothing identifying anywhere the system writes.
    assert_no_canary(json.dumps(loaded.metadata) + json.dumps(loaded.warnings), "LoadedImage")
    assert_no_canary(json.dumps(record), "the pipeline record (answer, prompt, warnings, metadata)")
    for name, error in errors.items():
        assert_clean_error(error)
        assert_no_canary(repr(error) + "".join(traceback.format_exception(error)), f"the {name} error")
    assert_no_canary(caplog.text, "log records")
    assert_no_canary(captured.out + captured.err, "stdout/stderr")
    assert_no_canary(" ".join(str(w.message) for w in caught), "warnings")
    # The log capture was live: pydicom's debug output from outside a guarded read is still seen.
    pydicom.config.debug(True, default_handler=False)
    try:
        pydicom.dcmread(io.BytesIO(canary))
    finally:
        pydicom.config.debug(False)
    assert "QZX" in caplog.text


def test_image_metadata_never_reaches_logs(caplog):
    """Pillow's TIFF plugin logs tag values (description, artist) at debug level; not while we read."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[270], tags[315] = "QZX tiff description", "QZXARTIST"  # ImageDescription, Artist
    tiff = encode(Image.new("L", (4, 4), 70), "TIFF", tiffinfo=tags)
    caplog.set_level(logging.DEBUG)
    loaded = load_image(tiff)
    assert loaded.source_format == "TIFF" and loaded.metadata == {"width": 4, "height": 4}
    assert_no_canary(caplog.text + json.dumps(loaded.warnings), "log records")
    Image.open(io.BytesIO(tiff)).load()  # the same read outside load_image does log them
    assert "QZXARTIST" in caplog.text


# ------------------------------------------------------------------------------------------ pipeline


def test_pipeline_routes_dicom_to_radiology_and_context_is_optional(vqa):
    from pipeline_vqa import CHART_FALLBACK_WARNING, DICOM_ROUTING_WARNING

    ct = dicom_bytes(canary_dicom())
    plain = vqa({"image": ct, "question": "Which organ?"}, return_prompt=True)
    forced = vqa({"image": ct, "question": "Which organ?", "expert": "chart"}, return_prompt=True)
    with_context = vqa({"image": ct, "question": "Which organ?"}, return_prompt=True, dicom_context=True)
    assert plain["expert"] == forced["expert"] == with_context["expert"] == "radiology"
    assert DICOM_ROUTING_WARNING in forced["warnings"] and CHART_FALLBACK_WARNING not in forced["warnings"]
    assert not plain["intermediate_text"].startswith("Modality:")
    assert with_context["intermediate_text"] == f"Modality: CT. Body part: HEAD. {plain['intermediate_text']}"
    assert with_context["prompt"] == build_inference_prompt("Which organ?", with_context["intermediate_text"])
    png = encode(Image.new("L", (16, 16), 90), "PNG")
    # A flat gray square is neither scan nor chart for the router: force the captioner to read it.
    png_record = vqa(
        {"image": png, "question": "Which organ?", "expert": "radiology"}, dicom_context=True, return_prompt=True
    )
    assert not png_record["intermediate_text"].startswith("Modality:")
    assert png_record["image_metadata"] == {"width": 16, "height": 16}


def test_benchmark_script_runs(capsys):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_image_loading import BenchmarkArguments, main

    results = main(BenchmarkArguments(repeats=1, json=True, series_length=6, series_repeats=1))
    assert set(results["slices"]) == {"ct_512_uncompressed", "ct_512_jpeg2000"}
    assert set(results["series"]["series"]) == {"ct_series_uncompressed", "ct_series_rle"}
    assert all(row["time_ratio"] > 0 and row["memory_ratio"] > 0 for row in results["series"]["series"].values())
    assert all(row["load_image_ms"] > 0 and row["bare_pydicom_ms"] > 0 for row in results["slices"].values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
