"""Load a DICOM series (the slices of one CT/MR acquisition, or a multi-frame volume) for the 2-D visual experts.

Remote code (imported relatively by ``pipeline_vqa.py``): installed packages only.

A series arrives as a folder (searched recursively), a ``.zip`` file or zip bytes, a list of paths or bytes,
or one multi-frame DICOM whose frames carry their own plane positions (an enhanced CT/MR volume). Each step
of getting it to the experts is a function a test can call on plain pydicom datasets:

1. ``collect_members`` — the files, with the member-count and byte limits checked before anything is read
   (for a zip: the member count and the *declared* uncompressed sizes, from its central directory, so a zip
   bomb is refused at once; Python's zip reader never inflates a member beyond its declared size).
2. ``read_headers`` — each file's header with ``stop_before_pixels`` (no pixel data is read); files that are
   not DICOM images (a DICOMDIR, a text file, macOS ``._`` files) are skipped with a counted warning.
3. ``slice_headers`` — one ``SliceHeader`` per image plane (a multi-frame file gives one per frame, placed by
   its Plane Position (Patient) functional group); ``check_volume_limits`` — slice count and total voxels,
   still before any pixel data is decoded.
4. ``single_series`` — grouping by Series Instance UID: more than one series is an ``ImageInputError``.
5. ``order_slices`` — by Image Position (Patient) projected on the slice normal (the cross product of the
   row and column directions of Image Orientation (Patient), PS3.3 C.7.6.2.1.1), ascending; by Instance
   Number when positions are missing (with a warning); duplicate positions dropped and uneven spacing
   (a gap, a missing slice) reported as warnings; the spacing is the median distance between slices.
6. ``select_slices`` — which slices the experts read (``SERIES_MODES``): ``key_slices`` (``series_slices``
   evenly spaced: the centres of equal parts of the volume, so ``1`` is the middle slice), ``middle``, or
   ``montage`` (the key slices tiled into one image, ``montage``).
7. Only the selected slices are decoded, each by ``medical_image.load_image`` (same transfer syntaxes,
   modality LUT, VOI/window and 8-bit conversion as a single file).

Privacy: file and member names, and every header field other than the geometry read here (Series Instance
UID for grouping only, positions, orientation, instance number, rows, columns, frames), never leave this
module: messages and warnings hold counts and millimetres only. The record's ``series`` entry is
``{"slices", "selected", "spacing_mm", "mode"}``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:
    from .medical_image import (
        DEFAULT_MAX_DECODED_BYTES,
        DEFAULT_MAX_PIXELS,
        LoadedImage,
        _guarded,
        _library_logs_dropped,
        load_image,
    )
    from .modeling_visual_med_alpaca import (
        ImageInputError,
        ImageTooLargeError,
        InvalidImageError,
        UnknownParameterError,
    )
except ImportError:  # imported from a checkout as a top-level module
    from medical_image import (
        DEFAULT_MAX_DECODED_BYTES,
        DEFAULT_MAX_PIXELS,
        LoadedImage,
        _guarded,
        _library_logs_dropped,
        load_image,
    )
    from modeling_visual_med_alpaca import ImageInputError, ImageTooLargeError, InvalidImageError, UnknownParameterError

SERIES_MODES = ("key_slices", "middle", "montage")
DEFAULT_SERIES_MODE = "key_slices"
DEFAULT_SERIES_SLICES = 5
MAX_SERIES_SLICES = 64  # slices the experts may be asked to read per series
# Limits checked before any pixel data is decoded.
DEFAULT_MAX_MEMBERS = 5000  # files in a folder, members of a zip, items of a list
DEFAULT_MAX_SERIES_BYTES = 2 * 1024**3  # all files together (a zip: declared uncompressed sizes)
DEFAULT_MAX_SLICES = 3000  # image planes after expanding multi-frame files
DEFAULT_MAX_VOXELS = 3000 * 512 * 512  # rows x columns x slices, all together
# Two slices closer than this along the normal are the same slice; spacings deviating from the median by more
# than SPACING_TOLERANCE (relative) make the spacing uneven.
DUPLICATE_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.1
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# Frame notes of load_image ("Only frame 3 of a 48-frame DICOM was read.") say nothing for a volume read by slices.
_FRAME_NOTE_PREFIX = "Only frame "

POSITIONS_MISSING_WARNING = (
    "Some slices of the series have no Image Position / Orientation (Patient): the slices were ordered by "
    "Instance Number and the slice spacing is unknown."
)
ORIENTATIONS_DIFFER_WARNING = (
    "The slices of the series do not all have the same orientation: they were ordered along the first slice's normal."
)


@dataclass(frozen=True)
class SliceHeader:
    """One image plane of a series: where it comes from and where it lies. No identifying field is kept."""

    member: int  # index into the collected files
    frame: int | None  # frame of a multi-frame file, None for a single-frame file
    series_uid: str  # for grouping only; never shown
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    instance_number: int | None
    rows: int
    columns: int


@dataclass
class LoadedSeries:
    """The slices the experts read, in ascending order, plus what the record may show about the series."""

    images: list[LoadedImage]  # one per selected slice, or one montage
    labels: list[str] | None  # "Slice 2 of 5 (14 of 48)" per image; None for one image
    metadata: dict
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ sources


class _Member:
    """One file of a series: a path, bytes, or a zip member. Its name never leaves this module."""

    def __init__(self, *, path: str | None = None, data: bytes | None = None, archive=None, info=None):
        self.path, self.data, self.archive, self.info = path, data, archive, info

    def open(self):
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.info is not None:
            return self.archive.open(self.info)
        return open(self.path, "rb")  # noqa: SIM115 - closed by the caller's with-block

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with self.open() as handle:
            return handle.read()


def is_series_source(source) -> bool:
    """Whether ``source`` is a series (folder, zip path or bytes, list of files, enhanced multi-frame volume)."""
    if isinstance(source, (list, tuple)):
        return True
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:4]) in ZIP_SIGNATURES or _is_volume_file(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes) or len(path) > 4096 or "\x00" in path:
            return False
        if os.path.isdir(path):
            return True
        if not os.path.isfile(path):
            return False
        try:
            with open(path, "rb") as handle:
                return handle.read(4) in ZIP_SIGNATURES or _is_volume_file(handle)
        except OSError:
            return False
    return False


def _is_volume_file(stream) -> bool:
    """A multi-frame DICOM whose frames each carry a Plane Position (Patient): an enhanced CT/MR volume.

    Only the header is read (up to the pixel data), from the stream's start."""
    stream.seek(0)
    head = stream.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return False
    stream.seek(0)
    with _quiet():
        dataset = _read_header(stream)
        if dataset is None:
            return False
        frames = _guarded(lambda: int(dataset.get("NumberOfFrames") or 1), None) or 1
        positions = _guarded(_frame_positions, None, dataset, frames) if frames > 1 else None
    return bool(positions) and all(position is not None for position in positions)


def collect_members(
    source,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_series_bytes: int = DEFAULT_MAX_SERIES_BYTES,
) -> list[_Member]:
    """The files of a series source, with the member-count and total-size limits checked before any is read."""
    unreadable = InvalidImageError("The series could not be read: a file or folder of it is unreadable.")
    return _guarded(_collect_members, unreadable, source, max_members, max_series_bytes)


def _collect_members(source, max_members: int, max_series_bytes: int) -> list[_Member]:
    if isinstance(source, (list, tuple)):
        return _list_members(source, max_members, max_series_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if data[:4] in ZIP_SIGNATURES:
            return _zip_members(io.BytesIO(data), max_members, max_series_bytes)
        return [_Member(data=data)]
    path = os.fspath(source)
    if os.path.isdir(path):
        return _folder_members(path, max_members, max_series_bytes)
    with open(path, "rb") as handle:
        is_zip = handle.read(4) in ZIP_SIGNATURES
    if is_zip:
        return _zip_members(path, max_members, max_series_bytes)
    return [_Member(path=path)]


def _too_many_files(max_members: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"The series holds more than {max_members} files, the limit for one series.")


def _too_many_bytes(max_series_bytes: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"The series' files hold more than {max_series_bytes} bytes, the limit for one series.")


def _list_members(items, max_members: int, max_series_bytes: int) -> list[_Member]:
    if not items:
        raise InvalidImageError("The image list is empty: pass the files of one series.")
    if len(items) > max_members:
        raise _too_many_files(max_members)
    members, total = [], 0
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            member, size = _Member(data=bytes(item)), len(item)
        elif isinstance(item, (str, os.PathLike)) and os.path.isfile(os.fspath(item)):
            member, size = _Member(path=os.fspath(item)), os.path.getsize(os.fspath(item))
        else:
            raise InvalidImageError(
                "Each item of an image list must be the path of an existing DICOM file or its bytes "
                "(a list is read as the slices of one series)."
            )
        total += size
        if total > max_series_bytes:
            raise _too_many_bytes(max_series_bytes)
        members.append(member)
    return members


def _folder_members(folder: str, max_members: int, max_series_bytes: int) -> list[_Member]:
    members, total = [], 0
    for root, dirs, files in os.walk(folder):  # symbolic links to folders are not followed
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                continue
            members.append(_Member(path=path))
            if len(members) > max_members:
                raise _too_many_files(max_members)
            total += os.path.getsize(path)
            if total > max_series_bytes:
                raise _too_many_bytes(max_series_bytes)
    if not members:
        raise InvalidImageError("The image folder is empty: it should hold the DICOM files of one series.")
    return members


def _zip_members(file, max_members: int, max_series_bytes: int) -> list[_Member]:
    archive = _guarded(zipfile.ZipFile, InvalidImageError("The zip archive is corrupt or truncated."), file)
    infos = [info for info in archive.infolist() if not info.is_dir()]
    if len(infos) > max_members:
        raise _too_many_files(max_members)
    if sum(info.file_size for info in infos) > max_series_bytes:
        raise _too_many_bytes(max_series_bytes)
    if any(info.flag_bits & 0x1 for info in infos):
        raise InvalidImageError("The zip archive is encrypted: pass an unencrypted archive.")
    if not infos:
        raise InvalidImageError("The zip archive is empty: it should hold the DICOM files of one series.")
    return [_Member(archive=archive, info=info) for info in infos]


# ------------------------------------------------------------------------------------------ headers


@contextlib.contextmanager
def _quiet():
    """pydicom's warnings and log records can quote element values: dropped while headers are read and used."""
    with _library_logs_dropped(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# The only elements parsed from each header (pydicom skips the others' values): faster, and nothing else is read.
HEADER_KEYWORDS = (
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def _read_header(stream):
    """The geometry elements of a dataset, read up to its pixel data (``stop_before_pixels``), or ``None`` when it
    is not a DICOM image. Call inside ``_quiet()``."""
    from pydicom import dcmread

    dataset = _guarded(dcmread, None, stream, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    if dataset is None or "Rows" not in dataset or "Columns" not in dataset:
        return None
    return dataset


def read_headers(members: list[_Member], notes: list[str]) -> list:
    """One header per member (``None`` for files that are not DICOM images, counted in a warning)."""
    headers, skipped = [], 0
    with _quiet():
        for member in members:
            try:
                with member.open() as handle:
                    head = handle.read(132)
                    dataset = None
                    if len(head) == 132 and head[128:132] == b"DICM":
                        handle.seek(0)
                        dataset = _read_header(handle)
            except Exception:  # unreadable member (CRC error, unsupported compression ...): skipped and counted
                dataset = None
            skipped += dataset is None
            headers.append(dataset)
    if skipped == len(members):
        raise InvalidImageError("The series holds no readable DICOM image file.")
    if skipped:
        notes.append(f"{skipped} file(s) of the series are not readable DICOM images and were skipped.")
    return headers


def _floats(value, count: int):
    if value is None:
        return None
    try:
        numbers_ = tuple(float(item) for item in value)
    except (TypeError, ValueError):
        return None
    if len(numbers_) != count or not all(math.isfinite(item) for item in numbers_):
        return None
    return numbers_


def _frame_positions(dataset, frames: int) -> list:
    """Per-frame Image Position (Patient) from the Plane Position functional group (enhanced multi-frame)."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        return [None] * frames
    positions = []
    for item in per_frame:
        plane = item.get("PlanePositionSequence")
        positions.append(_floats(plane[0].get("ImagePositionPatient"), 3) if plane else None)
    return positions


def _frame_orientation(dataset):
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get("PlaneOrientationSequence"):
        return _floats(shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame and per_frame[0].get("PlaneOrientationSequence"):
        return _floats(per_frame[0].PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
    return _floats(dataset.get("ImageOrientationPatient"), 6)


def slice_headers(headers: list) -> list[SliceHeader]:
    """One ``SliceHeader`` per image plane of the given datasets (``None`` entries are skipped files)."""
    with _quiet():
        return _slice_headers(headers)


def _slice_headers(headers: list) -> list[SliceHeader]:
    slices = []
    for member, dataset in enumerate(headers):
        if dataset is None:
            continue
        frames = _guarded(lambda d=dataset: int(d.get("NumberOfFrames") or 1), None) or 1
        geometry = _guarded(lambda d=dataset: (int(d.Rows), int(d.Columns)), None)
        if geometry is None or min(geometry) < 1 or frames < 1:
            raise InvalidImageError("A file of the series declares an invalid image geometry in its header.")
        number = _guarded(lambda d=dataset: int(d.get("InstanceNumber")), None)
        series_uid = str(_guarded(dataset.get, None, "SeriesInstanceUID") or "")
        if frames == 1:
            positions = [_floats(dataset.get("ImagePositionPatient"), 3)]
            orientation = _floats(dataset.get("ImageOrientationPatient"), 6)
        else:
            positions = _guarded(_frame_positions, None, dataset, frames) or [None] * frames
            orientation = _guarded(_frame_orientation, None, dataset)
        for frame, position in enumerate(positions):
            slices.append(
                SliceHeader(
                    member=member,
                    frame=None if frames == 1 else frame,
                    series_uid=series_uid,
                    position=position,
                    orientation=orientation,
                    instance_number=number,
                    rows=geometry[0],
                    columns=geometry[1],
                )
            )
    return slices


def check_volume_limits(
    slices: list[SliceHeader], *, max_slices: int = DEFAULT_MAX_SLICES, max_voxels: int = DEFAULT_MAX_VOXELS
) -> None:
    """Slice count and total voxels, from the headers alone (before any pixel data is decoded)."""
    if len(slices) > max_slices:
        raise ImageTooLargeError(f"The series has more than {max_slices} slices, the limit for one series.")
    if sum(item.rows * item.columns for item in slices) > max_voxels:
        raise ImageTooLargeError(f"The series has more than {max_voxels} voxels, the limit for one series.")


def single_series(slices: list[SliceHeader]) -> list[SliceHeader]:
    """The slices, which must all belong to one series (Series Instance UID); otherwise a typed error."""
    series = {item.series_uid for item in slices}
    if len(series) > 1:
        raise ImageInputError(
            f"The files hold {len(series)} different series (Series Instance UID); pass the files of one series "
            "at a time."
        )
    return slices


def slice_normal(orientation) -> np.ndarray:
    """The unit normal of a slice: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64))
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ValueError("degenerate orientation")
    return normal / length


def order_slices(slices: list[SliceHeader], notes: list[str]) -> tuple[list[SliceHeader], float | None]:
    """Slices in ascending order along the normal, duplicates dropped; and the slice spacing in mm.

    Falls back to Instance Number (then the given order) when a slice lacks a position or orientation.
    """
    positioned = all(item.position is not None and item.orientation is not None for item in slices)
    normal = _guarded(slice_normal, None, slices[0].orientation) if positioned else None
    if normal is None:
        if len(slices) > 1:
            notes.append(POSITIONS_MISSING_WARNING)
        fallback = sorted(
            range(len(slices)),
            key=lambda i: (slices[i].instance_number is None, slices[i].instance_number or 0, slices[i].frame or 0, i),
        )
        return [slices[i] for i in fallback], None
    if any(not np.allclose(item.orientation, slices[0].orientation, atol=1e-3) for item in slices):
        notes.append(ORIENTATIONS_DIFFER_WARNING)
    distances = [float(np.dot(normal, item.position)) for item in slices]
    order = sorted(
        range(len(slices)),
        key=lambda i: (distances[i], slices[i].instance_number or 0, slices[i].frame or 0, slices[i].member),
    )
    kept = [order[0]]
    for i in order[1:]:
        if distances[i] - distances[kept[-1]] > DUPLICATE_TOLERANCE_MM:
            kept.append(i)
    if len(kept) < len(order):
        notes.append(f"{len(order) - len(kept)} slice(s) of the series repeat a slice position and were dropped.")
    steps = np.diff([distances[i] for i in kept])
    if steps.size == 0:
        return [slices[i] for i in kept], None
    spacing = float(np.median(steps))
    if np.abs(steps - spacing).max() > SPACING_TOLERANCE * spacing:
        notes.append(
            f"The slice spacing is uneven (from {steps.min():.3g} to {steps.max():.3g} mm, median {spacing:.3g} mm): "
            "slices may be missing from the series."
        )
    return [slices[i] for i in kept], round(spacing, 4)


def select_slices(count: int, mode: str = DEFAULT_SERIES_MODE, slices: int = DEFAULT_SERIES_SLICES) -> list[int]:
    """0-based indices of the slices the experts read, ascending.

    ``key_slices`` and ``montage``: the centres of ``slices`` equal parts of the volume (all slices when there
    are fewer); ``middle``: the middle slice (``count // 2``, as ``medical_image`` picks a frame).
    """
    check_series_options(mode, slices)
    if mode == "middle":
        return [count // 2]
    if count <= slices:
        return list(range(count))
    return [int((part + 0.5) * count / slices) for part in range(slices)]


def check_series_options(mode, slices) -> None:
    if mode not in SERIES_MODES:
        raise UnknownParameterError(f"series_mode must be one of {', '.join(SERIES_MODES)}.")
    if isinstance(slices, bool) or not isinstance(slices, int) or not 1 <= slices <= MAX_SERIES_SLICES:
        raise UnknownParameterError(f"series_slices must be an integer from 1 to {MAX_SERIES_SLICES}.")


def montage(images: list[Image.Image]) -> Image.Image:
    """The images tiled left to right, top to bottom, in a near-square grid (each at the first one's size)."""
    width, height = images[0].size
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        tile = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)
        canvas.paste(tile, ((index % columns) * width, (index // columns) * height))
    return canvas


# ------------------------------------------------------------------------------------------ entry point


def _decode_selected(members: list[_Member], chosen: list[SliceHeader], limits: dict, notes: list[str]) -> list:
    """Only the chosen slices are read and decoded, each by ``load_image`` (windowed to 8-bit RGB)."""
    multi_frame: dict[int, bytes] = {}  # a multi-frame file is read once for all its chosen frames
    images = []
    for item in chosen:
        data = multi_frame.get(item.member)
        if data is None:
            data = _guarded(members[item.member].read, InvalidImageError("A file of the series could not be read."))
            if item.frame is not None:
                multi_frame[item.member] = data
        loaded = load_image(data, frame=item.frame, **limits)
        images.append(loaded)
        notes.extend(note for note in loaded.warnings if not note.startswith(_FRAME_NOTE_PREFIX))
    return images


def load_series(
    source,
    *,
    series_mode: str = DEFAULT_SERIES_MODE,
    series_slices: int = DEFAULT_SERIES_SLICES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_series_bytes: int = DEFAULT_MAX_SERIES_BYTES,
    max_slices: int = DEFAULT_MAX_SLICES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ct_windows=None,
) -> LoadedSeries:
    """Read, check, group, order and select the slices of one series; decode and window only the selected ones."""
    check_series_options(series_mode, series_slices)
    notes: list[str] = []
    members = collect_members(source, max_members=max_members, max_series_bytes=max_series_bytes)
    try:
        headers = read_headers(members, notes)
        slices = slice_headers(headers)
        check_volume_limits(slices, max_slices=max_slices, max_voxels=max_voxels)
        ordered, spacing = order_slices(single_series(slices), notes)
        selected = select_slices(len(ordered), series_mode, series_slices)
        limits = {"max_bytes": max_series_bytes, "max_pixels": max_pixels, "max_decoded_bytes": max_decoded_bytes}
        limits["ct_windows"] = ct_windows  # the CT windows of medical_image.load_image, the same for every slice
        images = _decode_selected(members, [ordered[index] for index in selected], limits, notes)
    finally:
        for archive in {id(member.archive): member.archive for member in members if member.archive}.values():
            archive.close()
    series = {
        "slices": len(ordered),
        "selected": [index + 1 for index in selected],
        "spacing_mm": spacing,
        "mode": series_mode,
    }
    # The allowlisted technical fields of the first selected slice (the width and height are the image's own).
    metadata = {key: value for key, value in images[0].metadata.items() if key not in ("frame", "width", "height")}
    metadata["series"] = series
    labels = [f"Slice {k + 1} of {len(selected)} ({index + 1} of {len(ordered)})" for k, index in enumerate(selected)]
    if series_mode == "montage":
        tiled = montage([loaded.image for loaded in images])
        images, labels = [LoadedImage(image=tiled, source_format="DICOM", metadata=metadata)], None
    else:
        images = [
            LoadedImage(image=loaded.image, source_format="DICOM", metadata=metadata, warnings=[]) for loaded in images
        ]
        if len(images) == 1:
            labels = None
    return LoadedSeries(
        images=images, labels=labels, metadata=dict(images[0].metadata), warnings=list(dict.fromkeys(notes))
    )


__all__ = [
    "DEFAULT_SERIES_MODE",
    "DEFAULT_SERIES_SLICES",
    "SERIES_MODES",
    "LoadedSeries",
    "SliceHeader",
    "check_series_options",
    "check_volume_limits",
    "collect_members",
    "is_series_source",
    "load_series",
    "montage",
    "order_slices",
    "read_headers",
    "select_slices",
    "single_series",
    "slice_headers",
    "slice_normal",
]
