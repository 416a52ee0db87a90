"""A minimal stand-in for Hugging Face's Inference Endpoints serving toolkit, for tests.

huggingface-inference-toolkit is not on the package index these machines reach, so its source cannot be installed.
This module re-implements, without its code, the behaviour the toolkit's source shows (github.com/huggingface/
huggingface-inference-toolkit, commit 833b5a2, files under ``src/huggingface_inference_toolkit/``):

- discovery (``utils.py`` L152-191 ``check_and_register_custom_pipeline_from_directory``; ``const.py``
  ``HF_DEFAULT_PIPELINE_NAME``/``HF_MODULE_NAME``): ``handler.py`` in the model folder is imported by file location
  as module ``handler.EndpointHandler``, with the folder put first on ``sys.path``, and ``EndpointHandler(model_dir)``
  is built once;
- routes (``webservice_starlette.py`` L162-171): ``GET /`` and ``/health`` answer ``Ok`` (L69-70), ``POST /`` and
  ``/predict`` predict, ``GET /metrics``;
- ``predict`` (``webservice_starlette.py`` L85-139): the body is deserialised by its ``Content-Type``
  (``serialization/base.py`` L5-51: JSON -> the parsed object; ``image/*`` -> ``{"inputs": PIL.Image}`` converted to
  RGB, ``serialization/image_utils.py`` L8-10; ``audio/*`` -> ``{"inputs": bytes}``, ``audio_utils.py``; any other
  type is refused), a body without ``inputs`` is refused (L94-97), the query string becomes ``parameters`` when the
  body has none (L110-113; ``utils.py`` L266-275 ``convert_params_to_int_or_bool``: digit strings -> int,
  ``true``/``false`` -> bool, the rest stays text), the handler runs in a worker thread one request at a time
  (``async_utils.py`` L9-20), the result is sent as JSON (L124-132, ``serialization/json_utils.py``), and any
  exception becomes HTTP 400 ``{"error": str(exception)}`` (L133-139).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import socket
import sys
import threading
import time
from pathlib import Path

import anyio
import orjson
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

JSON_TYPES = ("application/json", "application/json; charset=UTF-8")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/tiff", "image/bmp", "image/gif", "image/webp")
IMAGE_TYPES += ("image/x-image",)
AUDIO_TYPES = ("audio/x-flac", "audio/flac", "audio/mpeg", "audio/wav", "audio/x-wav", "audio/ogg", "audio/webm")


def load_custom_handler(model_dir) -> object:
    """``EndpointHandler(model_dir)`` from ``model_dir/handler.py``, imported the way the toolkit imports it."""
    model_dir = str(model_dir)
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", Path(model_dir) / "handler.py")
    # The toolkit leaves the folder on sys.path; here it is removed again, so the bundle's copies of this
    # checkout's modules cannot shadow them in later tests.
    sys.path.insert(0, model_dir)
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules["handler.EndpointHandler"] = module
        spec.loader.exec_module(module)
        return module.EndpointHandler(model_dir)
    finally:
        sys.path.remove(model_dir)


def _query_parameters(query: dict) -> dict:
    parameters = {}
    for name, value in query.items():
        if value.isnumeric():
            value = int(value)
        elif value in ("true", "false"):
            value = value == "true"
        parameters[name] = value
    return parameters


def _deserialize(content_type: str | None, body: bytes):
    if content_type in JSON_TYPES:
        return orjson.loads(body)
    if content_type in IMAGE_TYPES:
        return {"inputs": Image.open(io.BytesIO(body)).convert("RGB")}
    if content_type in AUDIO_TYPES:
        return {"inputs": bytes(body)}
    raise ValueError(f'Content type "{content_type}" not supported.')


def create_app(handler) -> Starlette:
    guard = anyio.Semaphore(1)  # one request in the handler at a time, as the toolkit's MAX_CONCURRENT_THREADS

    async def health(request: Request) -> Response:
        return PlainTextResponse("Ok")

    async def metrics(request: Request) -> Response:
        return PlainTextResponse("inf_batch_current_size 0\ninf_queue_size 0\n")

    async def predict(request: Request) -> Response:
        try:
            body = _deserialize(request.headers.get("content-type"), await request.body())
            if "inputs" not in body and "instances" not in body:
                raise ValueError("Body needs to provide a inputs key.")  # the toolkit also echoes the body here
            if request.query_params and "parameters" not in body:
                body["parameters"] = _query_parameters(dict(request.query_params))
            async with guard:
                prediction = await anyio.to_thread.run_sync(handler, body)
            return Response(orjson.dumps(prediction, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
        except Exception as error:
            return Response(orjson.dumps({"error": str(error)}), status_code=400, media_type="application/json")

    return Starlette(
        routes=[
            Route("/", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", predict, methods=["POST"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


@contextlib.contextmanager
def serve(app: Starlette, lifespan: str = "off"):
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The test endpoint server did not start.")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
