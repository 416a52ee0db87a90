"""DICOM series and volumes: ordering, grouping, limits before decoding, selection, and the pipeline's records.

Series are synthesised from pydicom's own CT/MR test files (read from disk inside the installed package).
"""

import io
import json
import random
import struct
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_outside_checkout
from series_factory import (
    PYDICOM_FILES,
    SECRET_ID,
    SECRET_NAME,
    enhanced_volume,
    series_slices,
    to_bytes,
    write_series,
    zip_series,
)
from test_pipeline import raises_typed, without_cache_flag

import medical_series
from medical_image import load_image
from medical_series import (
    ORIENTATIONS_DIFFER_WARNING,
    POSITIONS_MISSING_WARNING,
    check_volume_limits,
    load_series,
    order_slices,
    select_slices,
    single_series,
    slice_headers,
)
from modeling_visual_med_alpaca import (
    DISCLAIMER,
    ImageInputError,
    ImageTooLargeError,
    InvalidImageError,
    UnknownParameterError,
)
from pipeline_vqa import RECORD_KEYS

# An oblique plane (rotated about the row direction), so ordering must project on the normal, not read z.
OBLIQUE = (1.0, 0.0, 0.0, 0.0, np.cos(0.5), -np.sin(0.5))
SECRETS = (SECRET_NAME, SECRET_ID, "SECRETPATIENT")


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    """A 12-slice CT series as a folder of shuffled, patient-named files, a zip of it, and the file paths."""
    root = tmp_path_factory.mktemp("series")
    paths = write_series(series_slices(12), root / "ct")
    archive = zip_series(paths, root / f"{SECRET_NAME}.zip")
    return {"folder": root / "ct", "zip": archive, "paths": paths}


def shuffled(items, seed=1):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def assert_no_secrets(text: str):
    assert not any(secret in text for secret in SECRETS), text


# ------------------------------------------------------------------------------------------ steps on datasets


def test_slices_are_ordered_by_position_projected_on_the_normal():
    datasets = series_slices(9, orientation=OBLIQUE, spacing_mm=1.25)
    # Instance numbers disagree with the anatomy: the positions decide.
    for dataset, number in zip(datasets, shuffled(range(1, 10), seed=3), strict=True):
        dataset.InstanceNumber = number
    expected = [dataset.InstanceNumber for dataset in datasets]
    notes = []
    ordered, spacing = order_slices(single_series(slice_headers(shuffled(datasets))), notes)
    assert [item.instance_number for item in ordered] == expected
    assert spacing == pytest.approx(1.25, abs=1e-3)
    assert notes == []


def test_missing_positions_fall_back_to_instance_number_with_a_warning():
    datasets = shuffled(series_slices(6))
    del datasets[2].ImagePositionPatient
    notes = []
    ordered, spacing = order_slices(slice_headers(datasets), notes)
    assert [item.instance_number for item in ordered] == [1, 2, 3, 4, 5, 6]
    assert spacing is None and notes == [POSITIONS_MISSING_WARNING]


def test_duplicate_positions_are_dropped_and_gaps_warned():
    datasets = series_slices(10, spacing_mm=2.0)
    duplicate = series_slices(10, spacing_mm=2.0, series_uid=datasets[0].SeriesInstanceUID)[4]
    del datasets[7]  # a missing slice: a 4 mm gap
    notes = []
    ordered, spacing = order_slices(slice_headers(shuffled([*datasets, duplicate])), notes)
    assert len(ordered) == 9 and spacing == 2.0
    assert [item.instance_number for item in ordered] == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert "1 slice(s) of the series repeat a slice position and were dropped." in notes
    assert any(note.startswith("The slice spacing is uneven (from 2 to 4 mm") for note in notes)


def test_mixed_orientations_are_reported():
    datasets = series_slices(4)
    datasets[1].ImageOrientationPatient = list(OBLIQUE)
    notes = []
    order_slices(slice_headers(datasets), notes)
    assert ORIENTATIONS_DIFFER_WARNING in notes


def test_more_than_one_series_is_a_typed_error_without_header_text():
    first, second = series_slices(3), series_slices(2)
    with raises_typed(ImageInputError, match="2 different series") as raised:
        single_series(slice_headers([*first, *second]))
    message = str(raised.value)
    assert first[0].SeriesInstanceUID not in message and second[0].SeriesInstanceUID not in message
    assert_no_secrets(message)


def test_an_enhanced_multi_frame_file_is_a_volume_of_placed_frames():
    volume = enhanced_volume(series_slices(7))
    headers = slice_headers([volume])
    assert len(headers) == 7 and {item.frame for item in headers} == set(range(7))
    ordered, spacing = order_slices(headers, [])
    positions = [item.position[2] for item in ordered]
    assert positions == sorted(positions) and spacing == 2.5


@pytest.mark.parametrize(
    ("count", "mode", "slices", "expected"),
    [
        (48, "key_slices", 5, [4, 14, 24, 33, 43]),
        (3, "key_slices", 5, [0, 1, 2]),
        (48, "middle", 5, [24]),
        (7, "montage", 1, [3]),
        (1, "key_slices", 5, [0]),
    ],
)
def test_select_slices(count, mode, slices, expected):
    selected = select_slices(count, mode, slices)
    assert selected == expected
    assert selected == sorted(set(selected)) and all(0 <= i < count for i in selected)


def test_key_slices_are_evenly_spaced():
    selected = select_slices(200, "key_slices", 8)
    assert set(np.diff(selected)) == {25}


@pytest.mark.parametrize(("mode", "slices"), [("all", 5), ("key_slices", 0), ("montage", 65), ("middle", True)])
def test_bad_series_options_are_typed_errors(mode, slices):
    with raises_typed(UnknownParameterError, match="series_"):
        select_slices(10, mode, slices)


# ------------------------------------------------------------------------------------------ sources and limits


def test_which_sources_are_series(ct_series, radiology_images):
    single = ct_series["paths"][0]
    assert medical_series.is_series_source(str(ct_series["folder"]))
    assert medical_series.is_series_source(ct_series["zip"]) and medical_series.is_series_source(
        ct_series["zip"].read_bytes()
    )
    assert medical_series.is_series_source([single.read_bytes()])
    assert medical_series.is_series_source(to_bytes(enhanced_volume(series_slices(3))))
    # One slice, a 2-D image, a multi-frame file without per-frame positions, strings that are not paths: not series.
    not_series = [str(single), single.read_bytes(), radiology_images[0].read_bytes(), str(radiology_images[0])]
    not_series += [str(ct_series["folder"] / "no-such-folder"), "aGVsbG8=" * 100]
    rtdose = PYDICOM_FILES / "rtdose.dcm"  # 15 frames, no plane positions
    assert not any(medical_series.is_series_source(source) for source in [*not_series, str(rtdose)])


def test_folder_zip_and_lists_load_the_same_series(ct_series):
    sources = [
        str(ct_series["folder"]),
        ct_series["folder"],
        str(ct_series["zip"]),
        ct_series["zip"].read_bytes(),
        shuffled(ct_series["paths"]),
        [path.read_bytes() for path in shuffled(ct_series["paths"], seed=5)],
    ]
    loaded = [load_series(source) for source in sources]
    reference = loaded[0]
    assert reference.metadata["series"] == {
        "slices": 12,
        "selected": [2, 4, 7, 9, 11],
        "spacing_mm": 2.5,
        "mode": "key_slices",
    }
    assert reference.labels == [f"Slice {k + 1} of 5 ({i} of 12)" for k, i in enumerate([2, 4, 7, 9, 11])]
    for other in loaded[1:]:
        assert other.metadata == reference.metadata and other.labels == reference.labels
        assert other.warnings == reference.warnings == []
        assert [image.image.tobytes() for image in other.images] == [
            image.image.tobytes() for image in reference.images
        ]
    # Each selected slice is exactly what load_image makes of that file alone.
    in_order = ct_series["paths"]  # write_series returns them in anatomical order
    for image, index in zip(reference.images, [2, 4, 7, 9, 11], strict=True):
        assert image.image.tobytes() == load_image(in_order[index - 1]).image.tobytes()
    assert_no_secrets(json.dumps([reference.metadata, reference.labels, reference.warnings]))


def test_ct_windows_reach_every_selected_slice(ct_series, vqa):
    windows = ["brain", "lung", "bone"]
    windowed = load_series(ct_series["folder"], ct_windows=windows)
    plain = load_series(ct_series["folder"])
    assert windowed.metadata["window_source"] == "ct_windows"
    assert windowed.metadata["series"] == plain.metadata["series"]
    in_order = ct_series["paths"]
    for image, other, index in zip(windowed.images, plain.images, [2, 4, 7, 9, 11], strict=True):
        assert image.image.tobytes() == load_image(in_order[index - 1], ct_windows=windows).image.tobytes()
        assert image.image.tobytes() != other.image.tobytes()
    record = vqa({"image": str(ct_series["zip"]), "question": "What is seen?"}, ct_windows=windows, max_new_tokens=2)
    assert record["image_metadata"]["window_source"] == "ct_windows"
    assert record["image_metadata"]["series"]["selected"] == [2, 4, 7, 9, 11]


def test_endpoint_handler_takes_a_series_as_base64_files_or_one_base64_zip(endpoint_handler, ct_series):
    import base64

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    files = [b64(path.read_bytes()) for path in shuffled(ct_series["paths"], seed=3)]
    zipped = b64(ct_series["zip"].read_bytes())
    parameters = {"max_new_tokens": 3}
    as_files = endpoint_handler({"inputs": {"image": files, "question": "Findings?"}, "parameters": parameters})
    as_zip = endpoint_handler({"inputs": {"image": zipped, "question": "Findings?"}, "parameters": parameters})
    assert as_zip[0].pop("intermediate_cached") is True  # the same pixels: the experts' text is reused
    as_files[0].pop("intermediate_cached")
    assert as_files == as_zip
    assert as_files[0]["image_metadata"]["series"]["slices"] == 12
    assert as_files[0]["expert"] == "radiology"
    assert_no_secrets(json.dumps(as_files))


def test_an_enhanced_volume_gives_the_slices_of_the_same_series_on_files(ct_series, tmp_path):
    datasets = series_slices(12)
    volume = load_series(to_bytes(enhanced_volume(datasets)))
    files = load_series(write_series(datasets, tmp_path / "files"))
    assert volume.metadata["series"] == files.metadata["series"] and volume.labels == files.labels
    assert [i.image.tobytes() for i in volume.images] == [i.image.tobytes() for i in files.images]
    assert volume.metadata["number_of_frames"] == 12
    assert not any(note.startswith("Only frame") for note in volume.warnings)


def test_montage_tiles_the_key_slices(ct_series):
    tiles = load_series(ct_series["folder"]).images
    montage = load_series(ct_series["folder"], series_mode="montage")
    assert len(montage.images) == 1 and montage.labels is None
    image = montage.images[0].image
    assert image.size == (3 * 128, 2 * 128)
    for index, tile in enumerate(tiles):
        box = ((index % 3) * 128, (index // 3) * 128, (index % 3 + 1) * 128, (index // 3 + 1) * 128)
        assert image.crop(box).tobytes() == tile.image.tobytes()
    assert montage.metadata["series"]["mode"] == "montage" and montage.metadata["width"] == 384


def test_non_dicom_files_are_skipped_with_a_count(ct_series, tmp_path):
    files = [path.read_bytes() for path in ct_series["paths"]]
    archive = tmp_path / "with_extras.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for index, data in enumerate(files):
            handle.writestr(f"IMG{index}", data)
        handle.writestr(f"__MACOSX/._{SECRET_NAME}", b"\x00\x05\x16\x07 apple double")
        handle.writestr("README.txt", f"exported for {SECRET_NAME}")
    loaded = load_series(archive)
    assert loaded.metadata == load_series(ct_series["folder"]).metadata
    assert loaded.warnings == ["2 file(s) of the series are not readable DICOM images and were skipped."]


@pytest.mark.parametrize(
    ("build", "error", "words"),
    [
        (lambda tmp: [], InvalidImageError, "empty"),
        (lambda tmp: tmp, InvalidImageError, "empty"),  # an empty folder
        (lambda tmp: b"PK\x03\x04" + f"{SECRET_NAME} not really a zip".encode(), InvalidImageError, "zip"),
        (lambda tmp: [b"plain text " + SECRET_NAME.encode()], InvalidImageError, "no readable DICOM"),
        (lambda tmp: [str(tmp / f"{SECRET_NAME}.dcm")], InvalidImageError, "existing DICOM file"),
    ],
)
def test_bad_series_sources_are_typed_errors_without_names(tmp_path, build, error, words):
    source = build(tmp_path)
    with raises_typed(error, match=words) as raised:
        load_series(source)
    assert_no_secrets(str(raised.value))
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def zip_declaring(size: int) -> bytes:
    """A one-member zip whose central directory declares ``size`` uncompressed bytes (a zip bomb's signature)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr(f"{SECRET_NAME}.dcm", b"\x00" * 1000)
    data = bytearray(buffer.getvalue())
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", size)  # uncompressed size field
    return bytes(data)


def test_unreadable_zip_members_are_skipped_and_counted(ct_series):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as handle:
        for path in ct_series["paths"]:
            handle.write(path, arcname=path.name)
        handle.writestr(f"{SECRET_NAME}_extra.dcm", ct_series["paths"][0].read_bytes())
    data = bytearray(buffer.getvalue())
    last = data.rindex(b"PK\x01\x02")  # the last member's central directory entry
    data[last + 10 : last + 12] = struct.pack("<H", 9)  # Deflate64: not supported by Python's zip reader
    loaded = load_series(bytes(data))
    assert loaded.warnings == ["1 file(s) of the series are not readable DICOM images and were skipped."]
    assert loaded.metadata == load_series(ct_series["folder"]).metadata


def test_a_zip_bomb_is_refused_from_its_directory_fast():
    start = time.perf_counter()
    with raises_typed(ImageTooLargeError, match="bytes, the limit") as raised:
        load_series(zip_declaring(4_000_000_000))
    assert time.perf_counter() - start < 1.0
    assert_no_secrets(str(raised.value))


def test_series_limits_are_checked_before_any_pixel_is_decoded(ct_series, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data was decoded before the limits were checked")

    monkeypatch.setattr(medical_series, "load_image", no_decoding)
    cases = [
        ({"max_members": 11}, "more than 11 files"),
        ({"max_series_bytes": 10_000}, "bytes, the limit"),
        ({"max_slices": 11}, "more than 11 slices"),
        ({"max_voxels": 128 * 128 * 11}, "voxels"),
    ]
    for limits, words in cases:
        for source in (ct_series["folder"], ct_series["zip"].read_bytes(), ct_series["paths"]):
            with raises_typed(ImageTooLargeError, match=words):
                load_series(source, **limits)
    # Headers alone: check_volume_limits never needs pixels either.
    with raises_typed(ImageTooLargeError, match="slices"):
        check_volume_limits(slice_headers(series_slices(3)), max_slices=2)


# ------------------------------------------------------------------------------------------ the pipeline


def test_pipeline_reads_key_slices_in_order_with_labels(vqa, ct_series):
    record = vqa({"image": str(ct_series["folder"]), "question": "What is seen?"}, return_prompt=True)
    assert set(record) == RECORD_KEYS | {"prompt"}
    assert record["expert"] == "radiology" and record["routing"]["mode"] == "dicom"
    assert record["image_metadata"]["series"] == {
        "slices": 12,
        "selected": [2, 4, 7, 9, 11],
        "spacing_mm": 2.5,
        "mode": "key_slices",
    }
    lines = record["intermediate_text"].split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"Slice {k + 1} of 5 ({i} of 12)" for k, i in enumerate([2, 4, 7, 9, 11])
    ]
    # Each line is the expert's text for that slice alone.
    for line, index in zip(lines, [2, 4, 7, 9, 11], strict=True):
        single = vqa.describe_image(load_image(ct_series["paths"][index - 1]).image, expert="radiology")
        assert line.split(": ", 1)[1] == single["intermediate_text"]
    assert record["intermediate_text"] in record["prompt"]
    assert_no_secrets(json.dumps(record))


def test_pipeline_records_equal_for_folder_zip_and_lists(vqa, ct_series):
    sources = [
        str(ct_series["folder"]),
        str(ct_series["zip"]),
        ct_series["zip"].read_bytes(),
        [str(path) for path in shuffled(ct_series["paths"])],
        [path.read_bytes() for path in shuffled(ct_series["paths"], seed=9)],
    ]
    records = [vqa({"image": source, "question": "Which organ?"}, return_prompt=True) for source in sources]
    assert all(without_cache_flag(record) == without_cache_flag(records[0]) for record in records[1:])


def test_series_modes_and_config_default(vqa, ct_series):
    request = {"image": str(ct_series["zip"]), "question": "Which organ?"}
    middle = vqa(request, series_mode="middle")
    assert middle["image_metadata"]["series"]["selected"] == [7]
    assert not middle["intermediate_text"].startswith("Slice")  # one slice: no label
    montage = vqa(request, series_mode="montage", series_slices=4)
    assert montage["image_metadata"]["series"] == {
        "slices": 12,
        "selected": [2, 5, 8, 11],
        "spacing_mm": 2.5,
        "mode": "montage",
    }
    assert (montage["image_metadata"]["width"], montage["image_metadata"]["height"]) == (256, 256)
    three = vqa(request, series_slices=3)
    assert three["intermediate_text"].count("\n") == 2 and three["image_metadata"]["series"]["selected"] == [3, 7, 11]
    config = vqa.model.config
    try:
        config.series_mode = "middle"
        assert without_cache_flag(vqa(request)) == without_cache_flag(middle)
    finally:
        config.series_mode = "key_slices"
    with raises_typed(UnknownParameterError, match="series_mode"):
        vqa(request, series_mode="volume")


def test_batched_series_equal_one_at_a_time(vqa, ct_series, radiology_images):
    requests = [
        {"image": str(ct_series["folder"]), "question": "What is seen?"},
        {"image": str(radiology_images[0]), "question": "Which organ?"},
        {"question": "Define atelectasis."},
        {"image": ct_series["zip"].read_bytes(), "question": "Is it normal?"},
    ]
    singles = [vqa(request, return_prompt=True) for request in requests]
    batched = vqa(requests, batch_size=4, return_prompt=True)
    assert [without_cache_flag(r) for r in batched] == [without_cache_flag(r) for r in singles]
    streamed = list(vqa.stream(requests[0]))[-1]
    assert streamed["intermediate_text"] == singles[0]["intermediate_text"]


def test_pipeline_series_errors_are_typed(vqa, ct_series):
    two_series = [*ct_series["paths"][:3], *write_series(series_slices(2), ct_series["folder"].parent / "other")]
    with raises_typed(ImageInputError, match="2 different series") as raised:
        vqa({"image": [str(path) for path in two_series], "question": "Q"})
    assert_no_secrets(str(raised.value))
    with raises_typed(ImageTooLargeError):
        vqa({"image": zip_declaring(4_000_000_000), "question": "Q"})


def test_a_published_bundle_reads_series_in_a_fresh_process(bundle_dir, ct_series, tmp_path):
    """medical_series.py travels with the remote code (relative import) and works without the checkout."""
    assert (bundle_dir / "medical_series.py").read_text() == Path(medical_series.__file__).read_text()
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        from transformers import pipeline
        assert importlib.util.find_spec("medical_series") is None  # the checkout is not importable
        vqa = pipeline(model={str(bundle_dir)!r}, trust_remote_code=True)
        record = vqa({{"image": {str(ct_series["zip"])!r}, "question": "What is seen?"}})
        loader = sys.modules[type(vqa).__module__].load_series
        print(json.dumps({{"record": record, "series_module": loader.__module__}}))
        """
    )
    payload = run_outside_checkout(script, tmp_path)
    assert payload["series_module"].startswith("transformers_modules.") and payload["series_module"].endswith(
        "medical_series"
    )
    assert payload["record"]["image_metadata"]["series"]["slices"] == 12
    assert payload["record"]["intermediate_text"].startswith("Slice 1 of 5 (2 of 12): ")


def test_cli_ask_reads_a_series_folder_or_zip(bundle_dir, ct_series, vqa):
    from test_cli import run_cli

    from visual_med_alpaca_cli import EXIT_OK

    result = run_cli("ask", "--model", bundle_dir, "--image", ct_series["folder"], "--json", "--show-prompt", "Q?")
    assert result.returncode == EXIT_OK, result.stderr
    expected = vqa({"image": str(ct_series["zip"]), "question": "Q?"}, return_prompt=True)
    assert without_cache_flag(json.loads(result.stdout)) == without_cache_flag(expected)
    result = run_cli("ask", "--model", bundle_dir, "--image", ct_series["zip"], "--series-mode", "middle", "Q?")
    assert result.returncode == EXIT_OK, result.stderr
    middle = vqa({"image": str(ct_series["folder"]), "question": "Q?"}, series_mode="middle")
    assert f"Intermediate text: {middle['intermediate_text']}" in result.stdout.splitlines()
    assert_no_secrets(result.stdout + result.stderr)


def test_app_reads_a_series_upload(vqa, ct_series):
    from gradio_client import Client, handle_file
    from test_app import _as_chatbot_shows, _free_port, _text

    import app

    demo = app.build_app(vqa)
    app.launch(demo, port=_free_port(), prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        expected = vqa.describe_image(str(ct_series["folder"]))
        for upload in ([handle_file(str(path)) for path in ct_series["paths"]], [handle_file(str(ct_series["zip"]))]):
            preview, chat, panel = client.predict(upload, api_name="/read_series")
            assert preview is not None and chat == []
            assert app.escape_markdown(expected["intermediate_text"].split("\n")[0]) in panel
            assert "| series |" in panel and DISCLAIMER in panel
            assert_no_secrets(panel)
        _, chat, _ = client.predict("Which organ?", api_name="/ask")
        answer = vqa(
            {
                "question": "Which organ?",
                "expert": expected["expert"],
                "intermediate_text": expected["intermediate_text"],
            },
            max_new_tokens=app.ANSWER_MAX_NEW_TOKENS,
        )["answer"]
        assert _text(chat[1]) == _as_chatbot_shows(answer)
    finally:
        demo.close()


def test_evaluate_vqa_jsonl_rows_may_name_a_series_folder_or_zip(bundle_dir, ct_series, vqa, tmp_path):
    import evaluate_vqa

    lines = [
        {"image": ct_series["folder"].name, "question": "Is it normal?", "answer": "yes"},
        {"image": ct_series["zip"].name, "question": "Which organ?", "answer": "liver"},
    ]
    data = ct_series["folder"].parent / "series_set.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    args = evaluate_vqa.EvaluationArguments(
        model=str(bundle_dir),
        dataset="jsonl",
        data_path=str(data),
        output_dir=str(tmp_path / "out"),
        batch_size=2,
        max_new_tokens=6,
    )
    report = evaluate_vqa.main(args)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert report["n_errors"] == 0 and [r["error"] for r in records] == [None, None]
    direct = vqa(
        [{"image": str(ct_series["folder"].parent / line["image"]), "question": line["question"]} for line in lines],
        max_new_tokens=args.max_new_tokens,
    )
    assert [r["prediction"] for r in records] == [d["answer"] for d in direct]
    assert [r["intermediate_text"] for r in records] == [d["intermediate_text"] for d in direct]
    assert all(r["intermediate_text"].startswith("Slice 1 of 5 (2 of 12): ") for r in records)
