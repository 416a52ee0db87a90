"""The bundle's handler behind a real uvicorn server that behaves as the Inference Endpoints toolkit
(tests/endpoint_toolkit.py), called by the real huggingface_hub.InferenceClient and by raw HTTP requests."""

import base64
import io
import json
from pathlib import Path

import httpx
import pydicom
import pytest
from endpoint_toolkit import create_app, serve
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from test_pipeline import without_cache_flag

from modeling_visual_med_alpaca import DISCLAIMER
from pipeline_vqa import RECORD_KEYS

SECRET = "DOE^JOHN-patient-secret"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.fixture(scope="module")
def endpoint_url(endpoint_handler):
    with serve(create_app(endpoint_handler)) as url:
        yield url


@pytest.fixture(scope="module")
def http(endpoint_url):
    with httpx.Client(base_url=endpoint_url, timeout=120) as client:
        yield client


@pytest.fixture
def client(endpoint_url, monkeypatch):
    """The official client pointed at the local server. huggingface_hub's offline switch blocks every request its
    HTTP session makes, local ones too, so it is lifted for these calls only (nothing here reaches the Hub)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(model=endpoint_url)


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_health_routes(http):
    for path in ("/", "/health"):
        response = http.get(path)
        assert (response.status_code, response.text) == (200, "Ok")


def test_inference_client_visual_question_answering(client, endpoint_handler, radiology_images):
    answers = client.visual_question_answering(image=radiology_images[0], question="What is seen?")
    assert len(answers) == 1
    answer = answers[0]
    direct = endpoint_handler({"inputs": {"image": _b64(radiology_images[0]), "question": "What is seen?"}})[0]
    assert answer.answer == direct["answer"] and 0 < answer.score <= 1
    # The record's fields travel alongside (the client keeps unknown fields as attributes).
    assert answer.disclaimer == DISCLAIMER and answer.expert == "radiology" and answer.backend == "local"
    # top_k is the task's parameter; the same answer comes back.
    again = client.visual_question_answering(image=radiology_images[0].read_bytes(), question="What is seen?", top_k=2)
    assert [(a.answer, a.score) for a in again] == [(answer.answer, answer.score)]


def test_inference_client_sees_bad_input_as_an_http_400_with_the_error_type(client):
    with pytest.raises(HfHubHTTPError) as info:
        client.visual_question_answering(image=SECRET.encode() * 20, question="What is seen?")
    response = info.value.response
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error"} and body["error"].startswith("UnsupportedImageFormatError: ")
    assert SECRET not in response.text


def test_project_contract_over_http(http, endpoint_handler, radiology_images):
    body = {"inputs": [{"image": _b64(radiology_images[1]), "question": "Which organ?"}, "What is a stroke?"]}
    for path in ("/", "/predict"):
        response = http.post(path, json=body, params={"max_new_tokens": 5})  # query string -> parameters
        assert response.status_code == 200
        records = response.json()
        assert [set(r) for r in records] == [RECORD_KEYS, RECORD_KEYS]
        direct = endpoint_handler({**body, "parameters": {"max_new_tokens": 5}})
        assert [without_cache_flag(r) for r in records] == [without_cache_flag(r) for r in direct]


def test_raw_image_body_with_the_question_in_the_query_string(http, endpoint_handler, radiology_images):
    png = io.BytesIO()
    Image.open(radiology_images[2]).save(png, format="PNG")
    params = {"question": "What is seen?", "max_new_tokens": 5, "temperature": "0.5", "return_prompt": "true"}
    response = http.post("/predict", content=png.getvalue(), headers={"Content-Type": "image/png"}, params=params)
    assert response.status_code == 200, response.text
    record = response.json()[0]
    assert set(record) == RECORD_KEYS | {"prompt"} and record["expert"] == "radiology"
    # What the toolkit hands over: the decoded RGB image, the query values converted (digits, true/false only).
    pil = Image.open(io.BytesIO(png.getvalue())).convert("RGB")
    direct = endpoint_handler(
        {"inputs": pil, "parameters": {**params, "max_new_tokens": 5, "temperature": "0.5", "return_prompt": True}}
    )
    assert without_cache_flag(record) == without_cache_flag(direct[0])


def test_dicom_goes_as_base64_json_since_the_toolkit_refuses_other_bodies(http):
    """The toolkit deserialises JSON, image/* and audio/* only: a DICOM body is refused before the handler."""
    response = http.post("/predict", content=CT_SMALL.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 400 and "not supported" in response.json()["error"]
    response = http.post("/predict", json={"inputs": {"image": _b64(CT_SMALL), "question": "Which organ?"}})
    assert response.status_code == 200 and response.json()[0]["routing"]["mode"] == "dicom"


@pytest.mark.parametrize(
    ("body", "params", "error_type"),
    [
        ({"inputs": {"question": "Q"}, f"<b>{SECRET}</b>": 1}, {}, "UnknownParameterError"),
        ({"inputs": {"question": "Q", "image": f"not base64 {SECRET}"}}, {}, "InvalidImageError"),
        ({"inputs": {"question": "Q"}}, {"temperature": SECRET}, "UnknownParameterError"),
        ({"inputs": [{"question": " "}, {"question": SECRET, "image": 5}]}, {}, "MissingQuestionError"),
    ],
)
def test_bad_requests_get_a_400_that_names_the_error_type_and_never_the_payload(http, body, params, error_type):
    response = http.post("/predict", json=body, params=params)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{error_type}: ")
    assert SECRET not in response.text and "<b>" not in response.text


def test_a_batch_with_a_bad_item_is_a_200_with_the_item_marked(http):
    body = {"inputs": ["What is a stroke?", {"question": "Q", "image": f"not base64 {SECRET}"}]}
    response = http.post("/predict", json=body)
    assert response.status_code == 200
    answered, marked = response.json()
    assert answered["disclaimer"] == DISCLAIMER
    assert (marked["error_type"], marked["status"], marked["input_index"]) == ("InvalidImageError", 422, 1)
    assert SECRET not in json.dumps(response.json())


# ---------------------------------------------------------------------------------------------------------------
# endpoint_server.py: the same contract for a custom container with the pinned stack, with real status codes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_http(bundle_dir):
    """endpoint_server's app as a container starts it: the handler built from HF_MODEL_DIR at start-up."""
    from endpoint_server import create_app as create_custom_app

    with (
        serve(create_custom_app(model_dir=bundle_dir), lifespan="on") as url,
        httpx.Client(base_url=url, timeout=120) as c,
    ):
        yield c


def test_custom_server_answers_as_the_toolkit_does(custom_http, http, radiology_images):
    assert custom_http.get("/health").text == "Ok"
    body = {"inputs": [{"image": _b64(radiology_images[1]), "question": "Which organ?"}, "What is a stroke?"]}
    custom, toolkit = (
        client.post("/predict", json=body, params={"max_new_tokens": 5}) for client in (custom_http, http)
    )
    assert custom.status_code == toolkit.status_code == 200
    assert [without_cache_flag(r) for r in custom.json()] == [without_cache_flag(r) for r in toolkit.json()]


def test_custom_server_takes_raw_dicom_bodies(custom_http):
    raw = custom_http.post(
        "/predict",
        content=CT_SMALL.read_bytes(),
        headers={"Content-Type": "application/dicom"},
        params={"question": "Which organ?"},
    )
    encoded = custom_http.post("/predict", json={"inputs": {"image": _b64(CT_SMALL), "question": "Which organ?"}})
    assert raw.status_code == encoded.status_code == 200
    assert without_cache_flag(raw.json()[0]) == without_cache_flag(encoded.json()[0])
    assert raw.json()[0]["routing"]["mode"] == "dicom"


@pytest.mark.parametrize(
    ("content", "content_type", "params", "status", "error_type"),
    [
        (
            json.dumps({"inputs": {"question": "Q", "image": f"not base64 {SECRET}"}}),
            "application/json",
            {},
            422,
            "InvalidImageError",
        ),
        (
            json.dumps({"inputs": {"question": "Q", "image": base64.b64encode(SECRET.encode() * 20).decode()}}),
            "application/json",
            {},
            415,
            "UnsupportedImageFormatError",
        ),
        (json.dumps({"question": SECRET}), "application/json", {}, 400, "InputError"),
        (f"{{not json {SECRET}", "application/json", {}, 400, "InputError"),
        (SECRET.encode() * 20, "image/png", {"question": "Q"}, 415, "UnsupportedImageFormatError"),
        (SECRET.encode() * 20, "text/plain", {}, 415, "UnsupportedMediaTypeError"),
        (
            json.dumps({"inputs": {"question": "Q"}}),
            "application/json",
            {"temperature": SECRET},
            400,
            "UnknownParameterError",
        ),
        (json.dumps({"inputs": [{"question": "Q"}] * 17}), "application/json", {}, 413, "PayloadTooLargeError"),
    ],
)
def test_custom_server_errors_carry_their_status_and_type_and_never_the_payload(
    custom_http, content, content_type, params, status, error_type
):
    response = custom_http.post("/predict", content=content, headers={"Content-Type": content_type}, params=params)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_type"} and response.json()["error_type"] == error_type
    assert SECRET not in response.text


def test_custom_server_with_the_inference_client(custom_http, monkeypatch, radiology_images):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a local server, not the Hub
    client = InferenceClient(model=str(custom_http.base_url).rstrip("/"))
    [answer] = client.visual_question_answering(image=radiology_images[0], question="What is seen?")
    assert answer.disclaimer == DISCLAIMER and 0 < answer.score <= 1
    with pytest.raises(HfHubHTTPError) as info:
        client.visual_question_answering(image=SECRET.encode() * 20, question="What is seen?")
    assert info.value.response.status_code == 415 and SECRET not in info.value.response.text
