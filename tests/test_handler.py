"""handler.py, called the way the Inference Endpoints toolkit calls it: import the file, build once, call with JSON."""

import base64
import importlib.util
import json
from pathlib import Path

import pytest

from modeling_visual_med_alpaca import DISCLAIMER

REPO_ROOT = Path(__file__).resolve().parents[1]
from test_pipeline import without_cache_flag  # noqa: E402

from pipeline_vqa import RECORD_KEYS  # noqa: E402

SECRET = "DOE^JOHN-patient-secret"


@pytest.fixture(scope="module")
def handler(bundle_dir):
    # The toolkit loads handler.py by file location from the repository folder, then EndpointHandler(path).
    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(path=str(bundle_dir))


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _roundtrip(response):
    """What goes over the wire: the toolkit serialises the return value as JSON."""
    return json.loads(json.dumps(response))


def test_image_question_returns_the_record_contract(handler, vqa, radiology_images):
    response = _roundtrip(handler({"inputs": {"image": _b64(radiology_images[0]), "question": "What is seen?"}}))
    assert isinstance(response, list) and len(response) == 1
    record = response[0]
    assert set(record) == RECORD_KEYS and record["expert"] == "radiology" and record["disclaimer"] == DISCLAIMER
    # The same answer the pipeline gives for the same image bytes.
    assert without_cache_flag(record) == without_cache_flag(
        vqa({"image": radiology_images[0].read_bytes(), "question": "What is seen?"})
    )


def test_data_uri_equals_plain_base64(handler, radiology_images):
    plain = handler({"inputs": {"image": _b64(radiology_images[1]), "question": "Is this normal?"}})
    uri = handler(
        {"inputs": {"image": "data:image/jpeg;base64," + _b64(radiology_images[1]), "question": "Is this normal?"}}
    )
    assert without_cache_flag(plain[0]) == without_cache_flag(uri[0])
    assert uri[0]["intermediate_cached"]  # the same pixels: the caption was reused


def test_text_only_questions(handler):
    as_object = handler({"inputs": {"question": "What is a stroke?"}})
    as_string = handler({"inputs": "What is a stroke?"})
    assert as_object == as_string
    assert as_object[0]["expert"] is None and as_object[0]["intermediate_text"] is None


def test_batch_equals_one_at_a_time_and_parameters_pass_through(handler, radiology_images):
    items = [
        {"image": _b64(radiology_images[0]), "question": "What abnormality is seen?"},
        {"question": "What are the symptoms of pneumonia?"},
        {"image": _b64(radiology_images[2]), "question": "Which organ?"},
    ]
    parameters = {"max_new_tokens": 6, "return_prompt": True}
    batched = handler({"inputs": items, "parameters": parameters})
    singles = [handler({"inputs": item, "parameters": parameters})[0] for item in items]
    assert [without_cache_flag(r) for r in batched] == [without_cache_flag(r) for r in singles]
    assert [r["expert"] for r in batched] == ["radiology", None, "radiology"]
    assert all("prompt" in record for record in batched)


def _assert_error(response, status: int, error_type: str, words: str):
    response = _roundtrip(response)
    assert set(response) == {"error", "error_type", "status"}, response
    assert (response["status"], response["error_type"]) == (status, error_type), response
    assert words in response["error"]
    assert SECRET not in json.dumps(response)


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"inputs": {"image": None}}, 400, "MissingQuestionError", "question"),
        ({"inputs": {"question": "  "}}, 400, "MissingQuestionError", "question"),
        ({"inputs": []}, 400, "MissingQuestionError", "empty"),
        ({"question": SECRET}, 400, "InputError", '"inputs"'),
        (
            {"inputs": {"question": "Q"}, "parameters": {"load_in_8bit": True}},
            400,
            "UnknownParameterError",
            "load_in_8bit",
        ),
        (
            {"inputs": {"question": "Q"}, "parameters": {"max_new_tokens": 10**6}},
            400,
            "UnknownParameterError",
            "max_new_tokens",
        ),
        (
            {"inputs": {"question": "Q"}, "parameters": {"temperature": "hot"}},
            400,
            "UnknownParameterError",
            "temperature",
        ),
        ({"inputs": {"question": "Q", SECRET: 1}}, 400, "UnknownParameterError", "Unknown input key"),
        ({"inputs": {"question": "Q"}, "extra": SECRET}, 400, "UnknownParameterError", "extra"),
        ({"inputs": {"question": "Q", "image": f"not base64 {SECRET}!"}}, 422, "InvalidImageError", "base64"),
        ({"inputs": {"question": "Q", "image": 12345}}, 422, "InvalidImageError", "base64"),
        (
            {"inputs": {"question": "Q", "image": base64.b64encode(SECRET.encode() * 20).decode()}},
            415,
            "UnsupportedImageFormatError",
            "accepted format",
        ),
        ({"inputs": {"question": "Q", "image": "/etc/passwd"}}, 422, "InvalidImageError", "base64"),
        ({"inputs": [{"question": "Q"}] * 17}, 413, "PayloadTooLargeError", "At most"),
        ({"inputs": {"question": SECRET * 1000}}, 413, "PayloadTooLargeError", "question"),
    ],
)
def test_bad_input_gives_a_json_error_and_the_handler_keeps_serving(handler, body, status, error_type, words):
    _assert_error(handler(body), status, error_type, words)
    assert handler({"inputs": "What is a stroke?"})[0]["expert"] is None


def test_oversize_image_is_refused_before_decoding(handler, monkeypatch):
    monkeypatch.setitem(type(handler)._image_bytes.__globals__, "MAX_IMAGE_BYTES", 1000)  # the module's globals
    _assert_error(handler({"inputs": {"question": "Q", "image": "A" * 4000}}), 413, "ImageTooLargeError", "1000-byte")


def test_unexpected_failure_is_a_generic_500(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"CUDA error while processing {SECRET}")

    monkeypatch.setattr(handler, "pipeline", broken)
    _assert_error(handler({"inputs": "What is a stroke?"}), 500, "InternalError", "Internal error")


def test_handler_imports_only_installed_packages():
    """It runs from the Hub repository folder, where none of this checkout's modules are importable."""
    import ast

    tree = ast.parse((REPO_ROOT / "handler.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    checkout_modules = {path.stem for path in REPO_ROOT.glob("*.py")}
    assert imported and not imported & checkout_modules
