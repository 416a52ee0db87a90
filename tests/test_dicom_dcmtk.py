"""DCMTK as the reference renderer: the project's DICOM rendering agrees with it within 1 gray level.

Every file of pydicom's own test set (read from the installed package on disk, never through its download
helper) that DCMTK renders, plus a few cases of our own (DCMTK-encoded JPEG Lossless SV1, 12-bit JPEG Extended
and JPEG-LS lossless / near-lossless, a VOI LUT, files without the preamble), is rendered by DCMTK (``dcm2pnm``;
``dcmj2pnm`` for JPEG, ``dcml2pnm`` for JPEG-LS; JPEG 2000 through ``gdcmconv --raw`` first, as DCMTK has no
free JPEG 2000 codec) and by ``load_image``, with the same frame and the same VOI choice (``+Wl 1`` for a VOI
LUT, ``+Wi 1`` for the header's first window, otherwise the project's window given to DCMTK explicitly).
1 gray level is the honest tolerance: both apply the same real-valued mapping, one rounds and the other
truncates (12-bit lossy JPEG gets a bounded step more, see ``LOSSY_12_BIT_JPEG``). Nothing is excluded: 32-bit
big-endian OW pixel data, which DCMTK reads as 16-bit words, is given to DCMTK with its 16-bit halves swapped
(see ``dcmtk_input``).

`make test` installs DCMTK and GDCM's tools (Debian packages dcmtk and libgdcm-tools); without them the test is
skipped with that reason.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRBigEndian

from medical_image import NO_PREAMBLE_WARNING, load_image
from modeling_visual_med_alpaca import ImageInputError

TOOLS = ("dcm2pnm", "dcmj2pnm", "dcml2pnm", "dcmcjpeg", "dcmcjpls", "gdcmconv")
MISSING_TOOLS = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING_TOOLS),
    reason=f"DCMTK / GDCM tools not installed ({', '.join(MISSING_TOOLS)}): the comparison with the reference "
    "renderer cannot run here. Install them with `apt-get install -y dcmtk libgdcm-tools` (`make test` does).",
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70)}
JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)}
DCMTK_TIMEOUT_S = 60

# 12-bit lossy JPEG (Extended): DCMTK decodes it with IJG, the project with libjpeg (pylibjpeg), and lossy decoders
# may differ by one stored value per sample (ISO/IEC 10918-2 bounds the IDCT error, it does not fix the rounding).
# A window magnifies one stored value to 255 * slope / width gray levels; with one side rounding and the other
# truncating, such files may differ by less than 1.5 + that step. 98% of their pixels must still agree within 1.
# (8-bit baseline is decoded by Pillow, whose libjpeg-turbo reproduces IJG: it gets the plain tolerance.)
LOSSY_12_BIT_JPEG = "1.2.840.10008.1.2.4.51"
# NumberOfFrames "1A": DCMTK reads one frame, the project counts the 15 its pixel data holds; compared on frame 1.
FRAME = {"badVR.dcm": 0}
RENDERED_BY_DCMTK = 90


def transfer_syntax(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        return str(meta.TransferSyntaxUID) if "TransferSyntaxUID" in meta else None
    except Exception:
        return None


def dcmtk_input(path: Path, syntax: str | None, work: Path) -> Path | None:
    """What DCMTK is given: JPEG 2000 decompressed by GDCM; 32-bit big-endian OW pixel data with its halves swapped.

    DCMTK reads 32-bit big-endian OW pixel data as 16-bit words (pydicom as 32-bit cells): a copy whose 16-bit
    halves are swapped gives DCMTK the values pydicom reads, so those files are compared too.
    """
    if syntax in JPEG_2000_SYNTAXES:
        raw = work / f"{path.name}.raw.dcm"
        done = subprocess.run(["gdcmconv", "--raw", str(path), str(raw)], capture_output=True, timeout=DCMTK_TIMEOUT_S)
        return raw if done.returncode == 0 and raw.exists() else None
    if syntax == ExplicitVRBigEndian:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path, force=True)
        if dataset.get("BitsAllocated") == 32 and "PixelData" in dataset:
            data, pixels = path.read_bytes(), dataset.PixelData
            assert data.endswith(pixels), f"{path.name}: pixel data is not the last element"
            swapped = np.frombuffer(pixels, np.uint8).reshape(-1, 2, 2)[:, ::-1, :].tobytes()
            copy = work / f"{path.name}.halves-swapped.dcm"
            copy.write_bytes(data[: len(data) - len(pixels)] + swapped)
            return copy
    return path


def dcmtk_render(path: Path, syntax: str | None, args: list[str], work: Path) -> np.ndarray | None:
    """DCMTK's 8-bit rendering (overlays off), or None when DCMTK does not render the file."""
    tool = "dcmj2pnm" if syntax in JPEG_SYNTAXES else "dcml2pnm" if syntax in JPEG_LS_SYNTAXES else "dcm2pnm"
    output = work / f"{path.name}.pnm"
    output.unlink(missing_ok=True)
    done = subprocess.run([tool, "-O", *args, str(path), str(output)], capture_output=True, timeout=DCMTK_TIMEOUT_S)
    if done.returncode != 0 or not output.exists():
        return None
    with Image.open(output) as rendered:
        return np.asarray(rendered)


def voi_arguments(metadata: dict) -> list[str]:
    """The project's frame and VOI choice, as dcm2pnm options."""
    args = ["+F", str(metadata["frame"] + 1)] if "frame" in metadata else []
    source = metadata.get("window_source")
    if source == "voi_lut":
        args += ["+Wl", "1"]
    elif source == "header":
        args += ["+Wi", "1"]
    elif source == "percentile":
        # The project maps [low, high] linearly onto 0..255; DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) does the
        # same for center = (low + high) / 2 + 0.5 and width = high - low + 1.
        low = metadata["window_center"] - metadata["window_width"] / 2
        high = low + metadata["window_width"]
        args += ["+Ww", repr((low + high) / 2 + 0.5), repr(high - low + 1)]
    return args


def compare(path: Path, work: Path, frame: int | None = None) -> tuple[bool, str | None]:
    """Whether DCMTK renders the file, and what went wrong (None when both agree or neither renders it)."""
    syntax = transfer_syntax(path)
    source = dcmtk_input(path, syntax, work)
    try:
        loaded, refusal = load_image(path, frame=frame), None
    except ImageInputError as error:
        loaded, refusal = None, error
    if loaded is None:
        if source is None or dcmtk_render(source, syntax, [], work) is None:
            return False, None  # neither renders it
        return True, f"refused a file DCMTK renders ({type(refusal).__name__}: {refusal})"
    reference = dcmtk_render(source, syntax, voi_arguments(loaded.metadata), work) if source is not None else None
    if reference is None:
        return False, None
    ours = np.asarray(loaded.image).astype(int)
    if reference.ndim == 2:
        assert np.array_equal(ours[..., 0], ours[..., 2]), path.name  # grayscale comes back as gray RGB
        ours = ours[..., 0]
    if reference.shape != ours.shape:
        return True, f"shape {ours.shape} against DCMTK's {reference.shape}"
    difference = np.abs(ours - reference.astype(int))
    worst = int(difference.max())
    if syntax == LOSSY_12_BIT_JPEG:
        step = 255.0 * loaded.metadata.get("rescale_slope", 1.0) / loaded.metadata["window_width"]
        if worst >= 1.5 + step or (difference <= 1).mean() < 0.98:
            return True, f"{worst} gray levels off DCMTK, {(difference <= 1).mean():.1%} of pixels within 1"
    elif worst > 1:
        return True, f"{worst} gray levels off DCMTK (mean {difference.mean():.2f})"
    return True, None


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dcmtk")


def test_pydicom_test_files_render_as_dcmtk_renders_them(work):
    paths = sorted(path for path in PYDICOM_FILES.rglob("*") if path.is_file())
    rendered, problems = 0, {}
    for path in paths:
        by_dcmtk, problem = compare(path, work, FRAME.get(path.name))
        rendered += by_dcmtk
        if problem is not None:
            problems[str(path.relative_to(PYDICOM_FILES))] = problem
    assert not problems, problems
    # The comparison ran on the files it should have: DCMTK 3.6.7 renders 90 of pydicom 3.0.2's test files (a
    # newer DCMTK may render more; each of those must agree too).
    assert rendered >= RENDERED_BY_DCMTK, rendered


# ------------------------------------------------------------------------------------------ our own cases


def ct_12_bit() -> pydicom.Dataset:
    """CT_small's pixels (128..2191) as unsigned 12-bit stored values, rescale to HU, a soft-tissue window."""
    dataset = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    pixels = dataset.pixel_array.astype(np.uint16)
    dataset.PixelRepresentation, dataset.BitsStored, dataset.HighBit = 0, 12, 11
    dataset.PixelData = pixels.tobytes()
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    return dataset


def with_voi_lut(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A 12-bit VOI LUT whose entries (300..3500) do not span its declared output range (0..4095)."""
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "SS", [4096, -1024, 12])
    item.add_new("LUTData", "US", np.linspace(300, 3500, 4096).round().astype(int).tolist())
    dataset.VOILUTSequence = [item]
    return dataset


@pytest.fixture(scope="module")
def own_cases(work) -> dict[str, Path]:
    """Our files: the 12-bit CT uncompressed and DCMTK-encoded, a VOI LUT, and two files without the preamble."""
    cases = {"uncompressed": work / "ct12.dcm", "voi_lut": work / "ct12_voi_lut.dcm"}
    ct_12_bit().save_as(cases["uncompressed"], enforce_file_format=True)
    with_voi_lut(ct_12_bit()).save_as(cases["voi_lut"], enforce_file_format=True)
    encoders = {
        "jpeg_lossless_sv1": ["dcmcjpeg", "+e1"],
        "jpeg_extended_12_bit": ["dcmcjpeg", "+ee", "+q", "90"],
        "jpeg_ls_lossless": ["dcmcjpls", "+el"],
        "jpeg_ls_near_lossless": ["dcmcjpls", "+en", "+md", "2"],
    }
    for name, command in encoders.items():
        cases[name] = work / f"ct12_{name}.dcm"
        subprocess.run([*command, str(cases["uncompressed"]), str(cases[name])], check=True, timeout=DCMTK_TIMEOUT_S)
    part10 = cases["uncompressed"].read_bytes()
    cases["no_preamble"] = work / "ct12_no_preamble.dcm"  # file meta first, no preamble, no "DICM"
    cases["no_preamble"].write_bytes(part10[132:])
    bare = ct_12_bit()
    del bare.file_meta
    bare.preamble = None  # no preamble, no "DICM", no file meta
    cases["no_file_meta"] = work / "ct12_no_file_meta.dcm"  # an implicit-VR dataset alone, ACR-NEMA style
    pydicom.dcmwrite(cases["no_file_meta"], bare, implicit_vr=True, little_endian=True)
    return cases


def test_own_cases_render_as_dcmtk_renders_them(own_cases, work):
    syntaxes = {name: transfer_syntax(path) for name, path in own_cases.items()}
    assert syntaxes["jpeg_lossless_sv1"] == "1.2.840.10008.1.2.4.70"
    assert syntaxes["jpeg_extended_12_bit"] == "1.2.840.10008.1.2.4.51"
    assert syntaxes["jpeg_ls_lossless"] == "1.2.840.10008.1.2.4.80"
    assert syntaxes["jpeg_ls_near_lossless"] == "1.2.840.10008.1.2.4.81"
    for name, path in own_cases.items():
        rendered, problem = compare(path, work)
        assert rendered and problem is None, (name, problem)
    reference = load_image(own_cases["uncompressed"])
    for name in ("jpeg_lossless_sv1", "jpeg_ls_lossless", "no_preamble", "no_file_meta"):  # lossless: same pixels
        loaded = load_image(own_cases[name])
        assert np.array_equal(np.asarray(loaded.image), np.asarray(reference.image)), name
        assert (NO_PREAMBLE_WARNING in loaded.warnings) == name.startswith("no_"), name
    near = np.asarray(load_image(own_cases["jpeg_ls_near_lossless"]).image).astype(int)
    assert 0 < np.abs(near - np.asarray(reference.image)).max() <= 3  # NEAR=2 stored values, window 400 HU wide
    assert load_image(own_cases["voi_lut"]).metadata["window_source"] == "voi_lut"
