"""Serve a bundle's ``handler.py`` over HTTP: a custom Inference Endpoints container with the pinned stack.

Hugging Face's serving toolkit (the default Endpoints container) does not start on transformers 5; this server
keeps its HTTP contract (routes ``GET /`` and ``/health``, ``POST /`` and ``/predict``; ``application/json`` and
``image/*`` bodies; query-string parameters converted the same way) so clients see no difference, and improves on
it where the toolkit cannot: errors carry their real status code (413, 415, 422 ... from the handler's
``EndpointRequestError.http_status``) with ``{"error", "error_type"}``, a body without ``inputs`` is refused
without being quoted, an image body reaches the handler as the file (not decoded to 8-bit RGB), and DICOM files
can be posted raw (``application/dicom`` or ``application/octet-stream``)::

    HF_MODEL_DIR=build/visual-med-alpaca uvicorn endpoint_server:app --host 0.0.0.0 --port 80

Endpoints mounts the model repository at ``/repository`` (the default of ``HF_MODEL_DIR``); set the endpoint's
health route to ``/health``. The handler is built once, when the server starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)
MODEL_DIR = os.environ.get("HF_MODEL_DIR", "/repository")
MAX_BODY_BYTES = int(os.environ.get("VMA_MAX_BODY_BYTES", str(64 * 1024 * 1024)))
RAW_FILE_TYPES = ("application/dicom", "application/octet-stream")


def load_handler(model_dir: str | os.PathLike):
    """``EndpointHandler(model_dir)`` from ``model_dir/handler.py`` (the file the toolkit looks for)."""
    model_dir = str(model_dir)
    spec = importlib.util.spec_from_file_location("handler", Path(model_dir) / "handler.py")
    if spec is None or not (Path(model_dir) / "handler.py").is_file():
        raise FileNotFoundError(f"No handler.py in {model_dir}: publish the bundle with publish_bundle.py.")
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    spec.loader.exec_module(module)
    return module.EndpointHandler(model_dir)


class BadBody(Exception):
    """The body cannot be read as a request; ``error_type``/``http_status`` as the handler's errors."""

    def __init__(self, error_type: str, message: str, http_status: int):
        super().__init__(message)
        self.error_type, self.message, self.http_status = error_type, message, http_status


def query_parameters(query: dict[str, str]) -> dict:
    """Query-string values as the toolkit converts them: digits -> int, ``true``/``false`` -> bool, else text."""
    converted = {}
    for name, value in query.items():
        if value.isnumeric():
            converted[name] = int(value)
        elif value in ("true", "false"):
            converted[name] = value == "true"
        else:
            converted[name] = value
    return converted


def read_body(content_type: str, body: bytes) -> dict:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if len(body) > MAX_BODY_BYTES:
        raise BadBody("PayloadTooLargeError", f"The request body is larger than {MAX_BODY_BYTES} bytes.", 413)
    if media_type == "application/json":
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadBody("InputError", "The request body is not valid JSON.", 400) from None
        if not isinstance(data, dict) or "inputs" not in data:
            raise BadBody("InputError", 'The request body must be a JSON object with "inputs".', 400)
        return data
    if media_type.startswith("image/") or media_type in RAW_FILE_TYPES:
        # The file itself, not a decoded RGB copy (the toolkit's): the bundle's loader keeps 16-bit depth, reads
        # DICOM, and applies its own size and format checks.
        return {"inputs": bytes(body)}
    raise BadBody(
        "UnsupportedMediaTypeError",
        "Send application/json, an image/* body, or a DICOM file as application/dicom.",
        415,
    )


def create_app(handler=None, model_dir: str | os.PathLike | None = None) -> Starlette:
    """The app around ``handler`` (built from ``model_dir``, default ``HF_MODEL_DIR``, at start-up if not given)."""
    state = {"handler": handler}
    guard = anyio.Semaphore(1)  # one request in the model at a time, as the toolkit

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state["handler"] is None:
            state["handler"] = await anyio.to_thread.run_sync(load_handler, model_dir or MODEL_DIR)
        yield

    async def health(request: Request) -> Response:
        if state["handler"] is None:
            return PlainTextResponse("Loading", status_code=503)
        return PlainTextResponse("Ok")

    async def predict(request: Request) -> Response:
        try:
            data = read_body(request.headers.get("content-type", ""), await request.body())
            if request.query_params and "parameters" not in data:
                data["parameters"] = query_parameters(dict(request.query_params))
            async with guard:
                prediction = await anyio.to_thread.run_sync(state["handler"], data)
            return JSONResponse(prediction)
        except Exception as error:
            status = getattr(error, "http_status", None)
            error_type = getattr(error, "error_type", None)
            if not isinstance(status, int) or not error_type:
                logger.error("Unexpected %s while answering a request.", type(error).__name__)
                status, error_type = 500, "InternalError"
                message = "Internal error while answering; the request was not processed."
            else:
                message = error.message
            return JSONResponse({"error": message, "error_type": error_type}, status_code=status)

    return Starlette(
        routes=[
            Route("/", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", predict, methods=["POST"]),
            Route("/predict", predict, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def __getattr__(name: str):
    # ``uvicorn endpoint_server:app`` builds the app on first access, so importing this module loads nothing.
    if name == "app":
        return create_app()
    raise AttributeError(name)
