"""handler.py, called the way the Inference Endpoints toolkit calls it: found in the bundle, built once, called with
the deserialised body. Over HTTP (the toolkit's app + huggingface_hub.InferenceClient): test_endpoint_server.py."""

import base64
import io
import json
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from modeling_visual_med_alpaca import DISCLAIMER

REPO_ROOT = Path(__file__).resolve().parents[1]
from test_pipeline import without_cache_flag  # noqa: E402

from pipeline_vqa import RECORD_KEYS  # noqa: E402

SECRET = "DOE^JOHN-patient-secret"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.fixture(scope="module")
def handler(endpoint_handler):
    return endpoint_handler


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _roundtrip(response):
    """What goes over the wire: the toolkit serialises the return value as JSON."""
    return json.loads(json.dumps(response))


def _refused(handler, body):
    """The typed exception the handler raises (the toolkit answers it with HTTP 400 and {"error": str(e)})."""
    error_class = type(handler).__call__.__globals__["EndpointRequestError"]
    with pytest.raises(error_class) as info:
        handler(body)
    return info.value


def test_handler_is_shipped_in_the_bundle(bundle_dir):
    assert (bundle_dir / "handler.py").read_bytes() == (REPO_ROOT / "handler.py").read_bytes()
    assert (bundle_dir / "requirements.txt").is_file()


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


def test_visual_question_answering_payload_gets_the_task_output(handler, radiology_images):
    """InferenceClient.visual_question_answering sends the image base64 in inputs and image, the question beside."""
    image = _b64(radiology_images[0])
    body = {"inputs": image, "image": image, "question": "What is seen?", "parameters": {"top_k": 3}}
    response = _roundtrip(handler(body))
    contract = handler({"inputs": {"image": image, "question": "What is seen?"}})[0]
    assert len(response) == 1  # greedy decoding: one answer, whatever top_k asks
    answer = response[0]
    assert set(answer) == RECORD_KEYS | {"score"}  # the task's {"answer", "score"} plus the record's fields
    assert without_cache_flag({k: v for k, v in answer.items() if k != "score"}) == without_cache_flag(contract)
    assert isinstance(answer["score"], float) and 0 < answer["score"] <= 1
    assert handler(body)[0]["score"] == answer["score"]  # deterministic
    assert "prompt" in handler({**body, "parameters": {"return_prompt": True}})[0]


def test_answer_score_is_the_language_models_probability_of_the_answer(handler):
    """Cross-check: the score from an independent teacher-forced pass over prompt + answer tokens."""
    import torch

    record = handler({"inputs": "x", "image": _b64(CT_SMALL), "question": "Which organ?"})[0]
    prompt = handler(
        {"inputs": {"image": _b64(CT_SMALL), "question": "Which organ?"}, "parameters": {"return_prompt": True}}
    )
    tokenizer, model = handler.pipeline.tokenizer, handler.pipeline.model
    prompt_ids = tokenizer(prompt[0]["prompt"])["input_ids"]
    answer_ids = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
    probabilities = [logits[len(prompt_ids) - 1 + i].softmax(-1)[token].item() for i, token in enumerate(answer_ids)]
    geometric_mean = float(torch.tensor(probabilities).log().mean().exp())
    assert record["score"] == pytest.approx(geometric_mean, rel=1e-4)


def test_raw_image_body_with_the_question_in_parameters(handler, vqa, radiology_images):
    """The toolkit turns an image/* body into {"inputs": PIL.Image} (RGB) and the query string into parameters."""
    pil = Image.open(radiology_images[3]).convert("RGB")
    response = handler({"inputs": pil, "parameters": {"question": "What is seen?", "max_new_tokens": 5}})
    expected = vqa({"image": pil, "question": "What is seen?"}, max_new_tokens=5)
    assert without_cache_flag(response[0]) == without_cache_flag(expected)


def test_raw_dicom_bytes_equal_base64_dicom(handler):
    """Raw bytes in inputs (a DICOM file passed through as a body) answer as the same file sent as base64."""
    raw = handler({"inputs": CT_SMALL.read_bytes(), "parameters": {"question": "Which organ?"}})
    encoded = handler({"inputs": {"image": _b64(CT_SMALL), "question": "Which organ?"}})
    assert without_cache_flag(raw[0]) == without_cache_flag(encoded[0])
    assert raw[0]["routing"]["mode"] == "dicom" and raw[0]["image_metadata"]["modality"] == "CT"


def test_query_string_numbers_arrive_as_text_and_are_accepted(handler):
    """?temperature=0.7 reaches the handler as the string "0.7" (the toolkit converts digits and true/false only)."""
    checked = handler.contract._parameters({"temperature": "0.7", "top_p": "1", "max_new_tokens": 4}, "contract")
    assert checked == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 4}
    for bad in ("hot", "nan", "inf", "-1"):
        error = _refused(handler, {"inputs": "Q", "parameters": {"temperature": bad}})
        assert error.error_type == "UnknownParameterError" and "temperature" in error.message


def test_a_batch_with_bad_items_answers_the_good_ones_and_marks_the_bad(handler, radiology_images):
    items = [
        {"question": "What is a stroke?"},
        {"question": "Q", "image": f"not base64 {SECRET}!"},  # refused while parsing
        {"question": "Q", "image": base64.b64encode(SECRET.encode() * 20).decode()},  # refused by the pipeline
        {"question": "Which organ?", "image": _b64(radiology_images[2])},
        {"question": "  "},
    ]
    response = _roundtrip(handler({"inputs": items}))
    assert len(response) == len(items)
    assert without_cache_flag(response[0]) == without_cache_flag(handler({"inputs": items[0]})[0])
    assert without_cache_flag(response[3]) == without_cache_flag(handler({"inputs": items[3]})[0])
    marks = {index: response[index] for index in (1, 2, 4)}
    assert {i: (m["error_type"], m["status"], m["input_index"]) for i, m in marks.items()} == {
        1: ("InvalidImageError", 422, 1),
        2: ("UnsupportedImageFormatError", 415, 2),
        4: ("MissingQuestionError", 400, 4),
    }
    assert all(set(mark) == {"error", "error_type", "status", "input_index"} for mark in marks.values())
    assert SECRET not in json.dumps(response)


def test_a_batch_of_only_bad_items_is_refused(handler):
    error = _refused(handler, {"inputs": [{"question": " "}, {"question": "Q", "image": 5}]})
    assert (error.error_type, error.http_status) == ("MissingQuestionError", 400)
    assert "Every input was refused" in error.message


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"inputs": {"image": None}}, 400, "MissingQuestionError", "question"),
        ({"inputs": {"question": "  "}}, 400, "MissingQuestionError", "question"),
        ({"inputs": []}, 400, "MissingQuestionError", "empty"),
        ({"question": SECRET}, 400, "InputError", '"inputs"'),
        ([SECRET], 400, "InputError", '"inputs"'),
        (
            {"inputs": {"question": "Q"}, "parameters": {"load_in_8bit": True}},
            400,
            "UnknownParameterError",
            "1 unknown",
        ),
        ({"inputs": {"question": "Q"}, "parameters": {"max_new_tokens": 10**6}}, 400, "UnknownParameterError", "max_"),
        ({"inputs": {"question": "Q"}, "parameters": {"temperature": "hot"}}, 400, "UnknownParameterError", "temper"),
        ({"inputs": {"question": "Q"}, "parameters": [SECRET]}, 400, "InputError", "parameters"),
        ({"inputs": {"question": "Q", SECRET: 1}}, 400, "UnknownParameterError", "unknown key"),
        ({"inputs": {"question": "Q"}, "extra": SECRET}, 400, "UnknownParameterError", "unknown top-level"),
        ({"inputs": {"question": "Q"}, f"<b>{SECRET}</b>": 1}, 400, "UnknownParameterError", "unknown top-level"),
        ({"inputs": {"question": "Q", "image": f"not base64 {SECRET}!"}}, 422, "InvalidImageError", "base64"),
        ({"inputs": {"question": "Q", "image": 12345}}, 422, "InvalidImageError", "base64"),
        ({"inputs": {"question": "Q", "image": ""}}, 422, "InvalidImageError", "zero bytes"),
        ({"inputs": {"question": "Q", "expert": SECRET}}, 400, "UnknownParameterError", "expert must be"),
        (
            {"inputs": {"question": "Q", "image": base64.b64encode(SECRET.encode() * 20).decode()}},
            415,
            "UnsupportedImageFormatError",
            "accepted format",
        ),
        ({"inputs": {"question": "Q", "image": "/etc/passwd"}}, 422, "InvalidImageError", "base64"),
        ({"inputs": [{"question": "Q"}] * 17}, 413, "PayloadTooLargeError", "At most"),
        ({"inputs": {"question": SECRET * 1000}}, 413, "PayloadTooLargeError", "question"),
        # the visual-question-answering payload
        ({"inputs": "x", "image": "x", "question": " "}, 400, "MissingQuestionError", "question"),
        ({"inputs": "x", "question": "Q", "image": f"{SECRET}!"}, 422, "InvalidImageError", "base64"),
        ({"inputs": "x", "question": "Q", "parameters": {"top_k": 0}}, 400, "UnknownParameterError", "top_k"),
        ({"inputs": "x", "question": "Q", SECRET: 1}, 400, "UnknownParameterError", "unknown top-level"),
        # a raw body
        ({"inputs": Image.new("RGB", (8, 8))}, 400, "MissingQuestionError", "?question="),
        ({"inputs": b"", "parameters": {"question": "Q"}}, 422, "InvalidImageError", "empty"),
        ({"inputs": SECRET.encode() * 20, "parameters": {"question": "Q"}}, 415, "UnsupportedImageFormatError", "form"),
    ],
)
def test_bad_input_raises_a_typed_error_that_never_echoes_the_payload(handler, body, status, error_type, words):
    error = _refused(handler, body)
    assert (error.http_status, error.error_type) == (status, error_type), str(error)
    assert str(error) == f"{error_type}: {error.message}"  # the toolkit's 400 body: {"error": str(error)}
    assert words in error.message
    assert SECRET not in str(error) and "extra" not in str(error) and "load_in_8bit" not in str(error)
    assert handler({"inputs": "What is a stroke?"})[0]["expert"] is None  # and it keeps serving


def test_oversize_image_is_refused_before_decoding(handler, monkeypatch):
    monkeypatch.setattr(handler.contract, "limits", handler.contract.limits.replace(max_image_bytes=1000))
    error = _refused(handler, {"inputs": {"question": "Q", "image": "A" * 4000}})
    assert (error.http_status, error.error_type) == (413, "ImageTooLargeError") and "1000-byte" in error.message
    error = _refused(handler, {"inputs": b"A" * 4000, "parameters": {"question": "Q"}})
    assert (error.http_status, error.error_type) == (413, "ImageTooLargeError")


def test_a_series_is_decoded_to_one_bytes_object_per_file_with_caps(handler, monkeypatch):
    """ "image" as a list of base64 DICOM files (a series) reaches the pipeline as a list of bytes."""
    files = [CT_SMALL.read_bytes(), CT_SMALL.read_bytes()[:-10]]
    assert handler.contract._image([base64.b64encode(f).decode() for f in files]) == files
    zipped = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("1.dcm", files[0])
    assert (
        handler.contract._image(base64.b64encode(zipped.getvalue()).decode()) == zipped.getvalue()
    )  # one zip: its bytes
    for series, error_type in (([], "InvalidImageError"), (["AAAA", 7], "InvalidImageError")):
        with pytest.raises(Exception) as info:
            handler.contract._image(series)
        assert type(info.value).__name__ == error_type
    limits = handler.contract.limits
    monkeypatch.setattr(handler.contract, "limits", limits.replace(max_series_files=2))
    with pytest.raises(Exception) as info:
        handler.contract._image(["AAAA"] * 3)
    assert type(info.value).__name__ == "PayloadTooLargeError"
    monkeypatch.setattr(handler.contract, "limits", limits.replace(max_series_bytes=100))
    with pytest.raises(Exception) as info:
        handler.contract._image(["A" * 100, "A" * 100])
    assert type(info.value).__name__ == "ImageTooLargeError"


def test_unexpected_failure_is_a_generic_internal_error(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"CUDA error while processing {SECRET}")

    monkeypatch.setattr(handler, "pipeline", broken)
    error = _refused(handler, {"inputs": "What is a stroke?"})
    assert (error.http_status, error.error_type) == (500, "InternalError") and SECRET not in str(error)


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


def test_a_failed_scoring_pass_keeps_the_answer_with_no_score(handler, monkeypatch, radiology_images):
    def scoring_fails(*args, **kwargs):
        raise RuntimeError("index out of range in self")

    image = _b64(radiology_images[0])
    expected = handler({"inputs": {"image": image, "question": "What is seen?"}})[0]
    monkeypatch.setattr(handler.pipeline.model, "forward", scoring_fails)  # generation is not forward()
    [answer] = handler({"inputs": image, "image": image, "question": "What is seen?"})
    assert answer["score"] is None and answer["answer"] == expected["answer"]


def test_a_batch_that_fails_in_every_item_is_refused_not_a_200(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"CUDA error while processing {SECRET}")

    monkeypatch.setattr(handler, "pipeline", broken)
    error = _refused(handler, {"inputs": ["What is a stroke?", "What is a fever?"]})
    assert (error.http_status, error.error_type) == (500, "InternalError") and "Every input" in error.message
    assert SECRET not in str(error)


def test_the_contract_parses_without_a_pipeline_and_reads_its_caps_from_the_environment(monkeypatch):
    """handler.EndpointContract needs only the error classes (serve.py's /predict passes the checkout's)."""
    import handler as checkout_handler
    import modeling_visual_med_alpaca

    contract = checkout_handler.EndpointContract(modeling_visual_med_alpaca)
    parsed = contract.parse({"inputs": ["Q?", {"question": "Q?", "image": "@@"}], "parameters": {"max_new_tokens": 3}})
    assert (parsed.shape, parsed.parameters, parsed.return_prompt) == ("contract", {"max_new_tokens": 3}, False)
    assert parsed.items[0] == {"question": "Q?"}
    assert parsed.items[1].as_record(1) == {
        "error": '"image" is not valid base64 (or a data: URI with base64 content).',
        "error_type": "InvalidImageError",
        "status": 422,
        "input_index": 1,
    }
    with pytest.raises(modeling_visual_med_alpaca.UnknownParameterError):
        contract.parse({"inputs": "Q?", "parameters": {"dtype": SECRET}})
    monkeypatch.setenv("VMA_MAX_INPUTS", "2")
    limits = checkout_handler.EndpointLimits.from_environment()
    assert limits == checkout_handler.EndpointLimits(max_inputs=2) and limits.replace(max_inputs=16) == type(limits)()
    with pytest.raises(modeling_visual_med_alpaca.PayloadTooLargeError):
        checkout_handler.EndpointContract(modeling_visual_med_alpaca, limits).parse({"inputs": ["Q?"] * 3})
