"""Language-model backends: the local Med-Alpaca, or an OpenAI-compatible server.

A real ``transformers serve`` (started here on 127.0.0.1 with the tiny bundle's merged language model)
must give the local pipeline's greedy answers through both its completions and chat APIs; a scripted
stub server (``http.server`` in a thread) provides the failures: down, slow, 5xx/429 then success,
garbage, and a rejected key that must never appear in an error or a log line.
"""

import json
import logging
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_pipeline import raises_typed

from language_backends import (
    OpenAICompatibleBackend,
    OpenAICompatibleBackendConfig,
    parse_backend,
    request_options,
)
from modeling_visual_med_alpaca import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    UnknownParameterError,
    VisualMedAlpacaConfig,
    build_inference_prompt,
)
from serve_language_model import export_language_model, free_port, transformers_serve

QUESTION = "What abnormality is seen?"
TEXT_QUESTION = "What are the chemicals that treat hair loss?"
STUB_MODEL = "stub-med-alpaca"


# --------------------------------------------------------------------------------------------------
# A real server: transformers serve with the tiny bundle's merged language model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_lm(tiny_parts, tmp_path_factory):
    """``transformers serve`` on 127.0.0.1 with the same weights and tokenizer as the ``vqa`` bundle."""
    model, tokenizer = tiny_parts[0], tiny_parts[1]
    model_dir = export_language_model(model, tokenizer, tmp_path_factory.mktemp("served") / "med-alpaca-lm")
    with transformers_serve(model_dir, device="cpu") as base_url:
        yield {"base_url": base_url, "model": str(model_dir), "tokenizer": tokenizer}


def _served(served_lm, api: str) -> dict:
    return {"type": "openai", "base_url": served_lm["base_url"], "model": served_lm["model"], "api": api}


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_served_model_gives_the_local_greedy_answers(vqa, served_lm, radiology_images, api):
    requests = [{"image": str(radiology_images[0]), "question": QUESTION}, {"question": TEXT_QUESTION}]
    local = [vqa(request, return_prompt=True) for request in requests]
    remote = [vqa(request, return_prompt=True, backend=_served(served_lm, api)) for request in requests]
    for local_record, remote_record in zip(local, remote, strict=True):
        assert local_record["answer"], "the local greedy answer is empty: the comparison would prove nothing"
        assert remote_record["answer"] == local_record["answer"]
        assert remote_record["prompt"] == local_record["prompt"]
        assert remote_record["intermediate_text"] == local_record["intermediate_text"]
        assert local_record["backend"] == "local"
        assert remote_record["backend"] == f"openai:{served_lm['model']}"
    # A batch is answered one request per prompt, in input order.
    batch = vqa(requests, backend=_served(served_lm, api), batch_size=2)
    assert [record["answer"] for record in batch] == [record["answer"] for record in local]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_server_sees_exactly_the_local_prompt_tokens(served_lm, api):
    """The reported prompt length equals the local tokenisation: no double template, no missing BOS."""
    backend = OpenAICompatibleBackend(parse_backend(_served(served_lm, api)))
    for prompt in (build_inference_prompt(QUESTION, "chest x ray showing a mass"), build_inference_prompt(QUESTION)):
        completion = backend.complete_one(prompt, request_options({}, default_max_new_tokens=8))
        assert completion.prompt_tokens == len(served_lm["tokenizer"](prompt).input_ids)
        assert completion.completion_tokens is not None and 0 < completion.completion_tokens <= 8


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_streaming_yields_the_same_answer_piece_by_piece(served_lm, api):
    backend = OpenAICompatibleBackend(parse_backend(_served(served_lm, api)))
    prompt = build_inference_prompt(TEXT_QUESTION)
    pieces = list(backend.stream(prompt, {"max_new_tokens": 12}))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == backend.complete([prompt], {"max_new_tokens": 12})[0]


# --------------------------------------------------------------------------------------------------
# A scripted stub server for the failures
# --------------------------------------------------------------------------------------------------


def _completion_body(text: str) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-stub",
            "object": "text_completion",
            "created": 0,
            "model": STUB_MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    ).encode()


def _chat_body(content) -> bytes:
    return json.dumps(
        {
            "id": "chat-stub",
            "object": "chat.completion",
            "created": 0,
            "model": STUB_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
    ).encode()


def _reply(status=200, body=b"", content_type="application/json", delay=0.0, headers=None):
    return {"status": status, "body": body, "content_type": content_type, "delay": delay, "headers": headers or {}}


class StubServer:
    """Answers each request with the next scripted reply (the last one repeats) and records the requests.

    A reply's body may be a callable of the request (to echo headers back, like a careless server).
    """

    def __init__(self, *replies):
        self.replies, self.requests = list(replies), []
        self.in_flight, self.peak_in_flight, lock = 0, 0, threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                request = {
                    "path": self.path,
                    "headers": {name.lower(): value for name, value in self.headers.items()},
                    "json": json.loads(self.rfile.read(length)),
                }
                with lock:
                    stub.requests.append(request)
                    reply = stub.replies[min(len(stub.requests), len(stub.replies)) - 1]
                    stub.in_flight += 1
                    stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
                time.sleep(reply["delay"])
                with lock:
                    stub.in_flight -= 1
                body = reply["body"](request) if callable(reply["body"]) else reply["body"]
                try:
                    self.send_response(reply["status"])
                    self.send_header("Content-Type", reply["content_type"])
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in reply["headers"].items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def backend(self, **settings) -> dict:
        port = self.server.server_address[1]
        return {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": STUB_MODEL, **settings}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _backend(settings: dict) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(parse_backend(settings))


def test_server_down_is_unavailable():
    port = free_port()  # bound, then released: nothing listens there
    backend = _backend({"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "max_retries": 1})
    with pytest.raises(BackendUnavailableError, match="Could not connect") as caught:
        backend.complete(["prompt"])
    assert not isinstance(caught.value, BackendTimeoutError)
    assert f"127.0.0.1:{port}" in str(caught.value) and "2 attempt(s)" in str(caught.value)
    assert (caught.value.http_status, caught.value.exit_code) == (503, 4)


def test_slow_server_times_out_after_bounded_retries():
    with StubServer(_reply(body=_completion_body("late"), delay=3.0)) as stub:
        backend = _backend(stub.backend(timeout=0.3, max_retries=1))
        with pytest.raises(BackendTimeoutError, match="did not answer within 0.3 s") as caught:
            backend.complete(["prompt"])
    assert len(stub.requests) == 2
    assert caught.value.http_status == 504


@pytest.mark.parametrize(
    "first",
    [_reply(500, b'{"error": "boom"}'), _reply(429, b'{"error": "slow down"}', headers={"Retry-After": "0"})],
    ids=["500", "429"],
)
def test_5xx_or_429_then_success_is_retried(first):
    with StubServer(first, _reply(body=_completion_body(" fine answer "))) as stub:
        answers = _backend(stub.backend(max_retries=2)).complete(["prompt"])
    assert answers == ["fine answer"]
    assert len(stub.requests) == 2
    assert stub.requests[0]["json"] == stub.requests[1]["json"]


def test_persistent_5xx_gives_up_after_max_retries():
    with (
        StubServer(_reply(503, b'{"error": "down"}')) as stub,
        pytest.raises(BackendUnavailableError, match="HTTP 503 to all 3 attempt"),
    ):
        _backend(stub.backend(max_retries=2)).complete(["prompt"])
    assert len(stub.requests) == 3


def test_client_errors_are_not_retried_and_say_what_to_check():
    with (
        StubServer(_reply(404, b'{"error": "no route"}')) as stub,
        pytest.raises(BackendError, match="HTTP 404") as caught,
    ):
        _backend(stub.backend(max_retries=2)).complete(["prompt"])
    assert not isinstance(caught.value, BackendUnavailableError)
    assert "'chat'" in str(caught.value)
    assert len(stub.requests) == 1


@pytest.mark.parametrize(
    ("api", "reply"),
    [
        ("completions", _reply(body=b"<html>not json")),
        ("completions", _reply(body=b"<html>oops</html>", content_type="text/html")),
        ("completions", _reply(body=b'{"unexpected": 1}')),
        ("completions", _reply(body=b'{"id": "x", "object": "text_completion", "created": 0, "choices": []}')),
        ("chat", _reply(body=_chat_body(None))),
        ("chat", _reply(body=_completion_body("a completion where a chat answer belongs"))),
    ],
    ids=["bad-json", "html", "wrong-shape", "no-choices", "chat-null-content", "chat-wrong-object"],
)
def test_garbage_is_a_backend_error_not_an_answer(api, reply):
    with StubServer(reply) as stub, pytest.raises(BackendError, match="not a") as caught:
        _backend(stub.backend(api=api, max_retries=0)).complete(["prompt"])
    assert type(caught.value) is BackendError
    assert "html" not in str(caught.value).lower() and "unexpected" not in str(caught.value)


def test_streaming_from_a_stub_and_garbage_mid_stream():
    chunks = [json.loads(_completion_body(piece)) for piece in ("Ple", "ural ", "effusion")]
    stream = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    with StubServer(_reply(body=stream.encode(), content_type="text/event-stream")) as stub:
        assert list(_backend(stub.backend()).stream("prompt")) == ["Ple", "ural ", "effusion"]
    assert stub.requests[0]["json"]["stream"] is True
    broken = f"data: {json.dumps(chunks[0])}\n\ndata: {{not json\n\n"
    with StubServer(_reply(body=broken.encode(), content_type="text/event-stream")) as stub:
        pieces = _backend(stub.backend()).stream("prompt")
        assert next(pieces) == "Ple"
        with pytest.raises(BackendError, match="not a completions response"):
            next(pieces)


def test_api_key_is_sent_but_never_appears_in_errors_or_logs(monkeypatch, caplog):
    canary = "sk-canary-7f3a9c1e5b"
    monkeypatch.setenv("VMA_TEST_API_KEY", canary)
    caplog.set_level(logging.DEBUG)

    def echo(request):  # a careless server that echoes the credentials and the prompt back
        echoed = f"bad key {request['headers'].get('authorization')} for {request['json'].get('prompt')}"
        return json.dumps({"error": {"message": echoed}}).encode()

    failures = [_reply(401, echo), _reply(500, echo), _reply(200, echo), _reply(200, echo, content_type="text/plain")]
    errors = []
    for failure in failures:
        with StubServer(failure) as stub, pytest.raises(BackendError) as caught:
            _backend(stub.backend(api_key_env="VMA_TEST_API_KEY", max_retries=1)).complete([QUESTION])
        assert stub.requests[0]["headers"]["authorization"] == f"Bearer {canary}"  # the key did go out
        errors.append(caught.value)
    for error in errors:
        shown = str(error) + repr(error) + "".join(traceback.format_exception(error))
        assert canary not in shown and QUESTION not in shown
    assert "HTTP 401" in str(errors[0]) and "VMA_TEST_API_KEY" in str(errors[0])  # names the variable, not the key
    assert caplog.records, "no log records were captured: the log check would prove nothing"
    assert canary not in caplog.text and QUESTION not in caplog.text


def test_a_batch_is_sent_concurrently_and_answered_in_input_order():
    def echo_prompt(request):
        return _completion_body(request["json"]["prompt"].upper())

    prompts = [f"prompt {i}" for i in range(6)]
    with StubServer(_reply(body=echo_prompt, delay=0.5)) as stub:
        answers = _backend(stub.backend(max_concurrency=3)).complete(prompts)
    assert answers == [prompt.upper() for prompt in prompts]
    assert stub.peak_in_flight == 3
    with StubServer(_reply(body=echo_prompt, delay=0.05)) as stub:
        assert _backend(stub.backend(max_concurrency=1)).complete(prompts[:3]) == ["PROMPT 0", "PROMPT 1", "PROMPT 2"]
    assert stub.peak_in_flight == 1


def test_stream_checks_the_key_before_the_first_piece(monkeypatch):
    monkeypatch.delenv("VMA_TEST_API_KEY", raising=False)
    with (
        StubServer(_reply(body=_completion_body("x"))) as stub,
        pytest.raises(BackendError, match="VMA_TEST_API_KEY"),
    ):
        _backend(stub.backend(api_key_env="VMA_TEST_API_KEY")).stream("prompt")  # not iterated
    assert stub.requests == []


def test_missing_key_variable_names_the_variable_and_sends_nothing(monkeypatch):
    monkeypatch.delenv("VMA_TEST_API_KEY", raising=False)
    with (
        StubServer(_reply(body=_completion_body("x"))) as stub,
        pytest.raises(BackendError, match="VMA_TEST_API_KEY .* not set"),
    ):
        _backend(stub.backend(api_key_env="VMA_TEST_API_KEY")).complete(["prompt"])
    assert stub.requests == []


# --------------------------------------------------------------------------------------------------
# Through the pipeline
# --------------------------------------------------------------------------------------------------


def test_bundle_ships_the_backend_module(bundle_dir):
    assert (bundle_dir / "language_backends.py").exists()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_the_same_alpaca_prompt_reaches_the_server(vqa, radiology_images, api):
    body = _chat_body(" stub answer ") if api == "chat" else _completion_body(" stub answer ")
    with StubServer(_reply(body=body)) as stub:
        record = vqa(
            {"image": str(radiology_images[0]), "question": QUESTION}, backend=stub.backend(api=api), return_prompt=True
        )
    sent = stub.requests[0]["json"]
    assert record["answer"] == "stub answer" and record["backend"] == f"openai:{STUB_MODEL}"
    assert record["intermediate_text"] and record["intermediate_text"] in record["prompt"]
    if api == "chat":
        assert stub.requests[0]["path"] == "/v1/chat/completions"
        assert sent["messages"] == [{"role": "user", "content": record["prompt"]}]
    else:
        assert stub.requests[0]["path"] == "/v1/completions"
        assert sent["prompt"] == record["prompt"]
    assert sent["model"] == STUB_MODEL
    assert sent["max_tokens"] == vqa.model.config.answer_max_new_tokens and sent["temperature"] == 0


def test_generation_keywords_map_to_request_fields(vqa):
    with StubServer(_reply(body=_completion_body("x"))) as stub:
        vqa(TEXT_QUESTION, backend=stub.backend(), max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9)
        vqa(TEXT_QUESTION, backend=stub.backend(), generate_kwargs={"stop_strings": "###"})
    first, second = (request["json"] for request in stub.requests)
    assert (first["max_tokens"], first["temperature"], first["top_p"]) == (5, 0.7, 0.9)
    assert second["stop"] == ["###"] and second["temperature"] == 0


def test_config_default_backend_and_call_time_override(vqa, monkeypatch):
    with StubServer(_reply(body=_completion_body("remote"))) as stub:
        monkeypatch.setattr(vqa.model.config, "language_backend", stub.backend())
        assert vqa(TEXT_QUESTION)["backend"] == f"openai:{STUB_MODEL}"
        local = vqa(TEXT_QUESTION, backend="local")
    assert local["backend"] == "local" and local["answer"] != "remote"
    assert len(stub.requests) == 1


def test_backend_given_at_construction_is_the_default(vqa):
    with StubServer(_reply(body=_completion_body("remote"))) as stub:
        remote_by_default = type(vqa)(
            model=vqa.model,
            tokenizer=vqa.tokenizer,
            captioner_processor=vqa.captioner_processor,
            task="visual-med-alpaca",
            device=-1,
            backend=stub.backend(),
        )
        assert remote_by_default(TEXT_QUESTION)["backend"] == f"openai:{STUB_MODEL}"
        assert remote_by_default(TEXT_QUESTION, backend="local")["backend"] == "local"
    assert len(stub.requests) == 1


def test_config_stores_the_backend_but_never_a_key(tmp_path):
    settings = {"type": "openai", "base_url": "http://vllm:8000/v1", "model": "m", "api_key_env": "OPENAI_API_KEY"}
    VisualMedAlpacaConfig(language_backend=settings).save_pretrained(tmp_path)
    assert VisualMedAlpacaConfig.from_pretrained(tmp_path).language_backend == settings
    assert parse_backend(settings) == OpenAICompatibleBackendConfig(
        base_url="http://vllm:8000/v1", model="m", api_key_env="OPENAI_API_KEY"
    )


@pytest.mark.parametrize(
    ("backend", "words"),
    [
        ("remote", "backend must be 'local'"),
        ({"type": "vllm", "base_url": "http://h/v1", "model": "m"}, "'openai'"),
        ({"type": "openai", "base_url": "http://h/v1"}, "backend['model']"),
        ({"type": "openai", "base_url": "ftp://h/v1", "model": "m"}, "backend['base_url']"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "api_key": "sk-secret-1"}, "api_key_env"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "api_key_env": "sk-secret-1"}, "name of an"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "headers": {}}, "Unknown backend setting"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "timeout": -1}, "backend['timeout']"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "max_retries": 99}, "backend['max_retries']"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "api": "responses"}, "backend['api']"),
        ({"type": "openai", "base_url": "http://h/v1", "model": "m", "max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_backend_settings_raise_typed_errors_without_echo(vqa, backend, words):
    with raises_typed(UnknownParameterError, match=words) as caught:
        vqa(TEXT_QUESTION, backend=backend)
    assert "sk-secret-1" not in str(caught.value)


def test_generation_keywords_a_server_cannot_honour_are_refused(vqa):
    backend = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    with raises_typed(UnknownParameterError, match="num_beams cannot be sent"):
        vqa(TEXT_QUESTION, backend=backend, num_beams=2)
    assert vqa(TEXT_QUESTION, num_beams=2)["backend"] == "local"  # the local model still takes them


def test_request_options_are_greedy_unless_sampling_is_asked_for():
    assert request_options({}, 16) == {"max_tokens": 16, "temperature": 0.0}
    assert request_options({"temperature": 0.7}, 16) == {"max_tokens": 16, "temperature": 0.0}
    assert request_options({"do_sample": True, "max_new_tokens": 4}, 16) == {"max_tokens": 4, "temperature": 1.0}
    with pytest.raises(UnknownParameterError, match="repetition_penalty"):
        request_options({"repetition_penalty": 1.2}, 16)
