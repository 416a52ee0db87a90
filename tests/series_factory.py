"""Synthetic DICOM series built from pydicom's own CT/MR test files, found on disk inside the installed package
(never through ``get_testdata_file``, which downloads). Used by the tests and by the image-loading benchmark."""

from __future__ import annotations

import copy
import random
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Identity planted in every synthetic header: it must never reach a record, warning, log line or error.
SECRET_NAME = "SECRETPATIENT^NEVERSHOWN"
SECRET_ID = "SECRET-ID-4711"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def series_slices(
    count: int,
    *,
    source: str = "CT_small.dcm",
    spacing_mm: float = 2.5,
    orientation=AXIAL,
    series_uid: str | None = None,
    upsample: int = 1,
    window: tuple[float, float] | None = (40.0, 400.0),
) -> list[Dataset]:
    """``count`` slices of one series, in anatomical order: slice ``i`` lies ``i * spacing_mm`` along the normal,
    has InstanceNumber ``i + 1`` and pixels shifted by ``i`` (so each slice differs)."""
    base = pydicom.dcmread(PYDICOM_FILES / source)
    pixels = base.pixel_array
    if upsample > 1:
        pixels = np.kron(pixels, np.ones((upsample, upsample), dtype=pixels.dtype))
    series_uid = series_uid or generate_uid()
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    slices = []
    for index in range(count):
        dataset = copy.deepcopy(base)
        dataset.set_pixel_data(np.roll(pixels, 3 * index, axis=1), "MONOCHROME2", int(base.BitsStored))
        dataset.PatientName, dataset.PatientID = SECRET_NAME, SECRET_ID
        dataset.SeriesInstanceUID = series_uid
        dataset.InstanceNumber = index + 1
        dataset.ImageOrientationPatient = [float(v) for v in orientation]
        dataset.ImagePositionPatient = [round(float(v), 4) for v in origin + index * spacing_mm * normal]
        if window is not None and source.startswith("CT"):
            dataset.WindowCenter, dataset.WindowWidth = window
        slices.append(dataset)
    return slices


def enhanced_volume(slices: list[Dataset]) -> Dataset:
    """One multi-frame Enhanced CT object holding ``slices`` as frames, in a shuffled frame order, placed by the
    Plane Position (Patient) functional group of each frame."""
    order = list(range(len(slices)))
    random.Random(7).shuffle(order)
    volume = copy.deepcopy(slices[0])
    del volume.ImagePositionPatient
    volume.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    volume.file_meta.MediaStorageSOPClassUID = volume.SOPClassUID
    frames = np.stack([slices[i].pixel_array for i in order])
    volume.set_pixel_data(frames, "MONOCHROME2", int(slices[0].BitsStored))
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(slices[0].ImageOrientationPatient)
    volume.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in order:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = list(slices[i].ImagePositionPatient)
        per_frame.append(item)
    volume.PerFrameFunctionalGroupsSequence = per_frame
    return volume


def to_bytes(dataset: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_series(
    slices: list[Dataset], folder: Path, *, seed: int = 0, rle: bool = False, name_prefix: str = SECRET_NAME
) -> list[Path]:
    """Each slice as its own file, under shuffled file names that carry the patient's name (as PACS exports
    often do). Returns the paths in anatomical order."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = list(range(len(slices)))
    random.Random(seed).shuffle(numbers)
    paths = []
    for dataset, number in zip(slices, numbers, strict=True):
        if rle:
            dataset = copy.deepcopy(dataset)
            dataset.compress(RLELossless, encoding_plugin="pydicom")
        path = folder / f"{name_prefix}_{number:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_series(paths: list[Path], archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(paths, key=lambda p: p.name):
            handle.write(path, arcname=f"DICOM/{path.name}")
    return archive
