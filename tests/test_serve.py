"""The OpenAI-compatible Ray Serve app (serve.py), driven by the real `openai` client against `python serve.py` on
127.0.0.1 with the tiny bundle. The server starts ONCE for this module (Ray takes ~30 s on 2 cores); the last test
stops it with SIGTERM and checks that the request in flight is drained."""

import base64
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from openai_protocol import SYSTEM_IGNORED_WARNING, error_type
from pipeline_vqa import RECORD_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-not-secret"
PHI_MARKER = "QZXSERVEPATIENT"
QUESTION = "What abnormality is seen?"
MAX_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_uri(path_or_bytes, media="image/jpeg") -> str:
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def image_message(uri: str, text: str = QUESTION) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}],
    }


@pytest.fixture(scope="module")
def image_host(radiology_images):
    """A local HTTP server holding one VQA-RAD image: the allowlisted remote URL."""
    body = radiology_images[1].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/redirect.jpg":  # to an address that is not allowlisted
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(404 if self.path == "/missing.jpg" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(bundle_dir, image_host):
    """`python serve.py` as users start it, with small limits so overload and batching are observable."""
    port = _free_port()
    ray_dir = tempfile.mkdtemp(prefix="vma-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log_path = Path(ray_dir) / "server-stdout.log"
    env = dict(os.environ, VMA_TEST_API_KEY=API_KEY, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # Ray Serve gives its HTTP proxy 5 s to get ready and 10 s per health check (ray/serve/_private/constants.py);
    # on a shared 2-core CI machine under load that marks a healthy proxy dead and stops the app.
    env.update(RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60", RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60")
    command = [
        sys.executable,
        str(REPO_ROOT / "serve.py"),
        *("--bundle", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port)),
        *("--api_key_env", "VMA_TEST_API_KEY", "--allowed_image_hosts", image_host),
        *("--max_batch_size", "8", "--batch_wait_timeout_s", "0.2"),
        *("--max_ongoing_requests", "8", "--max_queued_requests", "8", "--retry_after_s", "2"),
        *("--max_body_bytes", "3000000", "--max_question_chars", "500", "--max_tokens", "400"),
        *("--num_cpus", "2", "--ray_temp_dir", ray_dir),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve.py exited early:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.send_signal(signal.SIGTERM)
        pytest.fail(f"serve.py did not become healthy:\n{log_path.read_text()[-3000:]}")
    yield {"base": base, "process": process, "ray_dir": Path(ray_dir), "log": log_path}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server, bundle_dir):
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(bundle_dir):
    return Path(bundle_dir).name


def ask(client, model_id, messages, **options):
    return client.chat.completions.create(model=model_id, messages=messages, max_tokens=MAX_TOKENS, **options)


def record_of(completion) -> dict:
    return completion.model_extra["visual_med_alpaca"]


def assert_openai_error(error: openai.APIStatusError, status: int, param=None, secret: str | None = None):
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if secret is not None:
        assert secret not in error.response.text


# ---------------------------------------------------------------------------------------------------- answers


def test_health_models_and_api_key(server, client, model_id):
    assert httpx.get(f"{server['base']}/health").json() == {"status": "ok"}  # no key needed
    assert [model.id for model in client.models.list().data] == [model_id]
    wrong = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(wrong, model_id, [{"role": "user", "content": "Hi?"}])
    assert_openai_error(caught.value, 401, secret=API_KEY)
    assert httpx.get(f"{server['base']}/v1/models").status_code == 401  # no key at all


def test_text_only_answer_equals_the_pipeline(client, model_id, vqa):
    completion = ask(client, model_id, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}])
    expected = vqa({"question": "Q?"}, max_new_tokens=MAX_TOKENS, return_prompt=True)
    record = record_of(completion)
    assert completion.object == "chat.completion" and completion.model == model_id
    assert completion.choices[0].message.content == expected["answer"] == record["answer"]
    assert set(record) == RECORD_KEYS and record["expert"] is None and record["disclaimer"]
    assert SYSTEM_IGNORED_WARNING in record["warnings"]
    assert completion.usage.prompt_tokens == len(vqa.tokenizer(expected["prompt"])["input_ids"])
    assert 0 < completion.usage.completion_tokens <= MAX_TOKENS
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_image_answer_and_provenance_equal_the_pipeline(client, model_id, vqa, radiology_images):
    completion = ask(client, model_id, [image_message(data_uri(radiology_images[0]))])
    expected = vqa({"image": str(radiology_images[0]), "question": QUESTION}, max_new_tokens=MAX_TOKENS)
    record = record_of(completion)
    assert completion.choices[0].message.content == expected["answer"]
    for key in ("expert", "intermediate_text", "image_metadata", "routing", "backend", "disclaimer"):
        assert record[key] == expected[key], key


def test_allowlisted_image_url_is_fetched(client, model_id, image_host, radiology_images):
    fetched = ask(client, model_id, [image_message(f"http://{image_host}/image.jpg")])
    inline = ask(client, model_id, [image_message(data_uri(radiology_images[1]))])
    assert record_of(fetched)["intermediate_text"] == record_of(inline)["intermediate_text"]
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    for path, status in (("redirect.jpg", 403), ("missing.jpg", 422)):
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client, model_id, [image_message(f"http://{image_host}/{path}")])
        assert_openai_error(caught.value, status, param="messages", secret=image_host)


def test_dicom_data_uri_is_read_and_no_phi_reaches_answers_or_logs(server, client, model_id):
    from pydicom import dcmread
    from test_medical_image import CT_SMALL

    dataset = dcmread(CT_SMALL)
    dataset.PatientName, dataset.PatientID = f"{PHI_MARKER}^JANE", f"{PHI_MARKER}-ID"
    dataset.InstitutionName = f"{PHI_MARKER} HOSPITAL"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    completion = ask(client, model_id, [image_message(data_uri(buffer.getvalue(), "application/dicom"))])
    record = record_of(completion)
    assert record["expert"] == "radiology" and record["routing"]["mode"] == "dicom"
    assert record["image_metadata"].get("modality") == "CT"
    assert PHI_MARKER not in json.dumps(completion.model_dump())
    # A broken DICOM (identity in the header, pixel data cut off): a typed error without the identity.
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, model_id, [image_message(data_uri(buffer.getvalue()[:-4000], "application/dicom"))])
    assert 400 <= caught.value.status_code < 500
    assert_openai_error(caught.value, caught.value.status_code, secret=PHI_MARKER)
    time.sleep(1)  # Ray flushes worker logs asynchronously
    for path in [server["log"], *server["ray_dir"].rglob("*")]:
        if path.is_file() and path.stat().st_size < 50_000_000 and not path.name.endswith((".sock", ".pid")):
            assert PHI_MARKER.encode() not in path.read_bytes(), f"patient data in {path.name}"


def test_streaming_equals_the_answer_and_ends_with_done_and_record(server, client, model_id, radiology_images):
    messages = [image_message(data_uri(radiology_images[2]))]
    whole = ask(client, model_id, messages)
    chunks = list(ask(client, model_id, messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    streamed_record = chunks[-1].model_extra["visual_med_alpaca"]
    assert streamed_record["intermediate_text"] == record_of(whole)["intermediate_text"]
    assert streamed_record["answer"] == text and set(streamed_record) == RECORD_KEYS
    # The raw wire format: server-sent events, the last one data: [DONE].
    body = {"model": model_id, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.stream("POST", f"{server['base']}/v1/chat/completions", json=body, headers=_auth()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert "visual_med_alpaca" in json.loads(events[-2][6:])


def test_multi_turn_reuses_the_intermediate_text(client, model_id, vqa, radiology_images):
    messages = [image_message(data_uri(radiology_images[3]))]
    first = ask(client, model_id, messages)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Which side?"},
    ]
    follow = ask(client, model_id, messages)
    first_record, record = record_of(first), record_of(follow)
    assert record["intermediate_cached"] is True  # the expert did not run again
    assert record["intermediate_text"] == first_record["intermediate_text"]
    history = [{"question": QUESTION, "answer": first.choices[0].message.content}]
    expected = vqa(
        {
            "question": "Which side?",
            "expert": first_record["expert"],
            "intermediate_text": first_record["intermediate_text"],
            "history": history,
        },
        max_new_tokens=MAX_TOKENS,
    )
    assert follow.choices[0].message.content == expected["answer"]


def test_stop_seed_and_sampling_options(client, model_id):
    messages = [{"role": "user", "content": "Name a symptom of a stroke."}]
    greedy = ask(client, model_id, messages).choices[0].message.content
    assert len(greedy) >= 4
    stopped = ask(client, model_id, messages, stop=[greedy[3:]])
    assert stopped.choices[0].message.content == greedy[:3] and stopped.choices[0].finish_reason == "stop"
    streamed = ask(client, model_id, messages, stop=greedy[3:], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == greedy[:3]
    sampled = [ask(client, model_id, messages, temperature=1.5, top_p=0.9, seed=7) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
    assert ask(client, model_id, messages, temperature=0).choices[0].message.content == greedy


def test_every_error_class_is_an_openai_error_without_the_payload(server, client, model_id):
    secret = "QZXSECRETPAYLOAD"
    image = image_message(data_uri(b"not an image " + secret.encode(), "image/png"), text=secret)
    user = {"role": "user", "content": f"{secret}?"}
    cases = [
        (400, "n", {"messages": [user], "n": 2}),
        (400, "tools", {"messages": [user], "tools": [{"type": "function", "function": {"name": secret}}]}),
        (400, "logprobs", {"messages": [user], "logprobs": True}),
        (400, "max_tokens", {"messages": [user], "max_tokens": 401}),
        (400, "stop", {"messages": [user], "stop": ["a", "b", "c", "d", "e"]}),
        (404, "model", {"messages": [user], "model": secret}),
        (400, "messages", {"messages": [user, {"role": "assistant", "content": secret}]}),
        (400, "messages", {"messages": [{"role": "user", "content": ""}]}),
        (413, "messages", {"messages": [{"role": "user", "content": secret * 40}]}),
        (400, "messages", {"messages": [image_message(data_uri(b"x")), image_message(data_uri(b"y"))]}),
        (403, "messages", {"messages": [image_message(f"https://example.org/{secret}.png")]}),
        (415, "messages", {"messages": [image_message(data_uri(b"x", "text/html"))]}),
        (400, "messages", {"messages": [image_message(f"data:image/png;base64,{secret}!!")]}),
        (415, None, {"messages": [image]}),  # the pipeline's typed image error
        (400, None, {"messages": [user], f"{secret} x": 1}),  # a key that is not a plain name is not shown
        (400, "messages", {"messages": [{"role": "tool", "content": secret}]}),
        (400, "temperature", {"messages": [user], "temperature": 3}),
    ]
    for status, param, body in cases:
        body = {"model": model_id, **body}
        response = httpx.post(f"{server['base']}/v1/chat/completions", json=body, headers=_auth(), timeout=60)
        assert response.status_code == status, (status, param, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == error_type(status)
        if param is not None:
            assert error["param"] == param, (param, error)
        assert secret not in response.text and secret.lower() not in response.text
    # The real client raises the matching typed errors.
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model_id, [user], n=2)
    assert_openai_error(caught.value, 400, param="n")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[user])
    # Transport-level: invalid JSON and a body over --max_body_bytes.
    for content, status in ((b"{not json", 400), (b"x" * 3_000_100, 413)):
        response = httpx.post(
            f"{server['base']}/v1/chat/completions",
            content=content,
            headers={**_auth(), "content-type": "application/json"},
        )
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def _handler_answer(endpoint_handler, body) -> tuple[int, object]:
    """(HTTP status, JSON body) of the Endpoints handler for ``body``: its records with 200, or the status and
    error record its ``EndpointRequestError`` carries (what /predict sends for a refusal)."""
    try:
        return 200, json.loads(json.dumps(endpoint_handler(json.loads(json.dumps(body)))))
    except Exception as error:
        assert type(error).__name__ == "EndpointRequestError"
        return error.http_status, error.as_record()


def _comparable(answer):
    """Records minus ``intermediate_cached``: True when this process's pipeline had read the image before, which
    differs between the handler (shared by the test session) and the server's expert stage. ``score`` (the VQA
    shape) is compared separately, to float tolerance: it comes from a separate forward pass in each process."""
    if not isinstance(answer, list):
        return answer
    return [{k: v for k, v in record.items() if k not in ("intermediate_cached", "score")} for record in answer]


def test_predict_answers_exactly_what_the_endpoint_handler_answers(server, endpoint_handler, radiology_images):
    """One contract (handler.EndpointContract): the same body gives the same records, the same marking of a bad
    item in a batch, the same error records and statuses, and the same caps, over /predict and the handler."""
    from series_factory import SECRET_NAME, series_slices, to_bytes

    image = base64.b64encode(radiology_images[0].read_bytes()).decode()
    series = [base64.b64encode(to_bytes(dataset)).decode() for dataset in series_slices(3)]
    short = {"max_new_tokens": 4}
    bodies = {
        "good batch": {"inputs": [{"image": image, "question": QUESTION}, "What is a stroke?"], "parameters": short},
        "one bad item": {
            "inputs": ["What is a stroke?", {"image": f"@@{PHI_MARKER}", "question": QUESTION}, {"question": ""}],
            "parameters": short,
        },
        "series": {"inputs": {"image": series, "question": "Which organ?"}, "parameters": short},
        "vqa client": {"inputs": image, "image": image, "question": QUESTION, "parameters": {"top_k": 1, **short}},
        "unknown key": {"inputs": "What is a stroke?", PHI_MARKER: 1},
        "unknown parameter": {"inputs": "What is a stroke?", "parameters": {"dtype": PHI_MARKER}},
        "every item bad": {"inputs": [{"question": ""}, 7]},
        "over the input cap": {"inputs": ["Q?"] * 17},
        "bad parameter value": {"inputs": "Q?", "parameters": {"num_beams": 9}},
    }
    answers = {}
    for name, body in bodies.items():
        response = httpx.post(f"{server['base']}/predict", json=body, headers=_auth(), timeout=120)
        expected_status, expected = _handler_answer(endpoint_handler, body)
        assert response.status_code == expected_status, name
        assert _comparable(response.json()) == _comparable(expected), name
        assert PHI_MARKER not in response.text and SECRET_NAME not in response.text, name
        answers[name] = (response.json(), expected)
    served, handled = answers["good batch"]
    assert all(set(record) == RECORD_KEYS for record in served) and served[0]["expert"] == "radiology"
    served, _ = answers["one bad item"]
    assert served[0]["answer"] and set(served[1]) == {"error", "error_type", "status", "input_index"}
    assert (served[1]["error_type"], served[1]["status"], served[2]["input_index"]) == ("InvalidImageError", 422, 2)
    served, _ = answers["series"]
    assert served[0]["image_metadata"]["modality"] == "CT"
    served, handled = answers["vqa client"]
    assert served[0]["score"] == pytest.approx(handled[0]["score"], rel=1e-4) and 0 < served[0]["score"] <= 1
    statuses = {name: answers[name][0].get("status") for name in bodies if isinstance(answers[name][0], dict)}
    assert statuses == {
        "unknown key": 400,
        "unknown parameter": 400,
        "every item bad": 400,
        "over the input cap": 413,
        "bad parameter value": 400,
    }
    # The caps are the handler's EndpointLimits; serve.py's flags set those they share (defaults equal), and the
    # contract applies them: this server runs with --max_tokens 400.
    from handler import EndpointLimits
    from serve import ServeArguments

    assert ServeArguments().endpoint_limits() == EndpointLimits()
    capped = httpx.post(
        f"{server['base']}/predict", json={"inputs": "Q?", "parameters": {"max_new_tokens": 401}}, headers=_auth()
    )
    assert (
        capped.status_code == 400
        and capped.json()["error"] == "Parameter max_new_tokens must be an integer from 1 to 400."
    )
    # A body that cannot be read is refused with the contract's error record too (the handler never sees it).
    unreadable = (
        (b"{not json " + PHI_MARKER.encode(), 400, "InputError"),
        (b"x" * 3_000_100, 413, "PayloadTooLargeError"),
    )
    for content, status, expected_type in unreadable:
        response = httpx.post(
            f"{server['base']}/predict", content=content, headers={**_auth(), "content-type": "application/json"}
        )
        assert response.status_code == status and PHI_MARKER not in response.text
        assert response.json()["error_type"] == expected_type and response.json()["status"] == status


# ---------------------------------------------------------------------------------------------------- load


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _stats(server) -> dict:
    return httpx.get(f"{server['base']}/stats", headers=_auth()).json()


def test_concurrent_burst_is_batched_and_equals_one_at_a_time(server, client, model_id, radiology_images):
    requests = [
        [image_message(data_uri(radiology_images[i % 4]), text=f"Question {i}: what is seen?")] for i in range(8)
    ]
    alone = [ask(client, model_id, messages) for messages in requests]
    # Ray Serve counts requests still waiting for a replica as queued (ray/serve/_private/router.py), so on a busy
    # machine a burst can meet a 503 although there is room: the client retries after Retry-After, as clients do.
    patient = openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=3, timeout=120)
    before = _stats(server)
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda messages: ask(patient, model_id, messages), requests))
    after = _stats(server)
    assert [c.choices[0].message.content for c in together] == [c.choices[0].message.content for c in alone]
    assert [record_of(c)["intermediate_text"] for c in together] == [record_of(c)["intermediate_text"] for c in alone]
    new_language_batches = after["language_batch_sizes"][len(before["language_batch_sizes"]) :]
    assert sum(new_language_batches) == 8 and max(new_language_batches) > 1
    new_expert_batches = after["expert_batch_sizes"][len(before["expert_batch_sizes"]) :]
    assert sum(new_expert_batches) == 8 and max(new_expert_batches) > 1


def test_overload_is_503_with_retry_after(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 64}

    def post(_):
        return httpx.post(f"{server['base']}/v1/chat/completions", json=body, headers=_auth(), timeout=120)

    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(post, range(40)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 10 and statuses.count(200) >= 8
    rejected = next(response for response in responses if response.status_code == 503)
    assert rejected.headers["retry-after"] == "2"
    assert httpx.get(f"{server['base']}/health").status_code == 200  # it keeps serving


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 400, "stream": True}
    cancelled_before = _stats(server)["cancelled_streams"]
    with httpx.stream("POST", f"{server['base']}/v1/chat/completions", json=body, headers=_auth()) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 2:  # generation under way
                assert _stats(server)["active_streams"] == 1
                break
    deadline = time.monotonic() + 20
    while _stats(server)["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stats(server)["active_streams"] == 0
    assert _stats(server)["cancelled_streams"] == cancelled_before + 1  # cancelled, not run to its 400 tokens
    quick = {"model": model_id, "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 2}
    assert httpx.post(f"{server['base']}/v1/chat/completions", json=quick, headers=_auth()).status_code == 200


def test_sigterm_drains_the_request_in_flight_then_exits_zero(server, model_id):
    """Last test of the module: it stops the server."""
    process = server["process"]
    body = {"model": model_id, "messages": [{"role": "user", "content": "Q?"}], "max_tokens": 300, "stream": True}
    with httpx.stream(
        "POST", f"{server['base']}/v1/chat/completions", json=body, headers=_auth(), timeout=120
    ) as response:
        lines = response.iter_lines()
        events = []
        for line in lines:  # wait until generation is under way
            if line:
                events.append(line)
            if len(events) >= 3:
                break
        process.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "visual_med_alpaca" in last
    assert process.wait(timeout=120) == 0
    assert "Stopped." in server["log"].read_text()


def test_shipped_config_validates_and_names_the_apps_deployments():
    """serve_config.yaml is a valid Ray Serve config whose deployments are exactly the application's, and its
    args build the application (no Ray started)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    import serve

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "serve:build_app"
    assert {d.name for d in application.deployments} == {"ChatAPI", "ExpertStage", "LanguageStage"}
    assert all(d.user_config["max_batch_size"] >= 1 for d in application.deployments if d.name != "ChatAPI")
    assert serve.build_app(application.args) is not None
    with pytest.raises(ValueError, match="Unknown serve argument"):
        serve.build_app({"bundel": "x"})


# ---------------------------------------------------------------------------------------------------- units (no Ray)


def test_chat_messages_become_question_history_and_image():
    from openai_protocol import Limits, chat_to_turns, parse_chat_request

    image = data_uri(b"\x89PNG fake", "image/png")
    chat = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "assistant", "content": "Hello, upload an image."},  # a greeting: no question to pair
                image_message(image, text="First?"),
                {"role": "assistant", "content": [{"type": "text", "text": "One."}]},
                {"role": "user", "content": "Second?"},
                {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "Third"},
                {"role": "user", "content": [{"type": "text", "text": "part two?"}]},  # consecutive: joined
            ]
        }
    )
    turns = chat_to_turns(chat, Limits())
    assert turns.question == "Third\npart two?"
    assert turns.history == [{"question": "First?", "answer": "One."}, {"question": "Second?", "answer": "Two."}]
    assert turns.image == b"\x89PNG fake" and turns.warnings == [SYSTEM_IGNORED_WARNING]
    allowlisted = parse_chat_request({"messages": [image_message("http://images.example:8080/a.png")]})
    assert chat_to_turns(allowlisted, Limits(allowed_image_hosts=("images.example:8080",))).image.startswith("http")


def test_language_stage_can_send_the_prompts_to_an_openai_compatible_server(bundle_dir, vqa):
    """The language stage with --language_backend: the same Alpaca prompt goes to the server (here a recording
    stub; test_language_backends.py runs a real `transformers serve`), the record names the backend, and streaming
    sends the server's answer in one piece. The stage class is called directly, without Ray."""
    import asyncio

    from test_language_backends import StubServer, _completion_body, _reply

    import serve

    def echo_prompt(request):
        return _completion_body(f"echo {len(request['json']['prompt'])}")

    request = {"question": "Which side?", "intermediate_text": "a chest radiograph", "expert": "radiology"}
    expected_prompt = vqa(request, return_prompt=True, max_new_tokens=2)["prompt"]
    with StubServer(_reply(body=echo_prompt)) as stub:
        backend = stub.backend(api="completions")
        stage = serve.LanguageStage.func_or_class(str(bundle_dir), None, None, backend)
        item = {"request": request, "generation": {"max_new_tokens": 5}, "seed": None, "stop": []}
        (result,) = stage._answer_now([item])

        async def collect():
            return [piece async for piece in stage.stream(item)]

        streamed = asyncio.run(collect())
    assert stub.requests[0]["json"]["prompt"] == expected_prompt
    assert stub.requests[0]["json"]["max_tokens"] == 5
    assert result["record"]["answer"] == f"echo {len(expected_prompt)}"
    assert result["record"]["backend"] == f"openai:{backend['model']}"
    assert streamed[0] == result["record"]["answer"] and streamed[-1]["record"] == result["record"]


def test_describe_images_batched_equals_one_at_a_time(bundle_dir, radiology_images):
    """The expert stage's pipeline hook: one batched expert run gives the texts of single runs (cache off)."""
    from transformers import pipeline

    uncached = pipeline(model=str(bundle_dir), trust_remote_code=True, intermediate_cache_size=0)
    items = [{"image": path.read_bytes(), "expert": None} for path in radiology_images]
    batched = uncached.describe_images(items)
    alone = [uncached.describe_image(item["image"]) for item in items]
    assert [r["intermediate_text"] for r in batched] == [r["intermediate_text"] for r in alone]
    assert [r["routing"] for r in batched] == [r["routing"] for r in alone]
    assert all(r["expert"] == "radiology" and r["intermediate_cached"] is False for r in batched)
    with pytest.raises(ValueError, match="needs an image") as caught:
        uncached.describe_images([{"image": None}])
    assert type(caught.value).__name__ == "InvalidImageError"  # the bundle's own copy of the error class
