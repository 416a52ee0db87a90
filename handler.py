"""Inference Endpoints handler for a Visual Med-Alpaca bundle (copied into the Hub repository).

The Endpoints toolkit imports this file from the repository folder, builds ``EndpointHandler(path)`` once
and calls it with each request's JSON body::

    {"inputs": {"image": "<base64 or data: URI>", "question": "What abnormality is seen?"},
     "parameters": {"max_new_tokens": 64, "return_prompt": true}}
    {"inputs": {"question": "What are the chemicals that treat hair loss?"}}        # text only
    {"inputs": "What is a stroke?"}                                                 # text only
    {"inputs": [{"image": "...", "question": "..."}, {"question": "..."}]}          # a batch

It answers with a list of records (the pipeline's record contract: ``answer``, ``expert``,
``intermediate_text``, ``intermediate_cached``, ``image_metadata``, ``routing``, ``backend``, ``disclaimer``,
``warnings``, and ``prompt`` on request: ``pipeline_vqa.RECORD_KEYS``), one
per input. Bad input gives ``{"error": message, "error_type": name, "status": http_status}``: the message
says what was wrong and never contains the payload; the handler keeps serving. (The toolkit sends any
return value with HTTP 200, so clients check for ``error`` and read ``status``.)

Only installed packages are imported: the error types are those of the bundle's own remote code.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import sys
from typing import Any

import torch
from transformers import pipeline

logger = logging.getLogger(__name__)

MAX_INPUTS = int(os.environ.get("VMA_MAX_INPUTS", "16"))
MAX_IMAGE_BYTES = int(os.environ.get("VMA_MAX_IMAGE_BYTES", str(10 * 1024 * 1024)))
MAX_QUESTION_CHARS = int(os.environ.get("VMA_MAX_QUESTION_CHARS", "4000"))
MAX_NEW_TOKENS = int(os.environ.get("VMA_MAX_NEW_TOKENS", "512"))
MAX_BEAMS = 4
# What an endpoint client may set, each with its check; loading options and unbounded generation are not offered.
PARAMETERS = {
    "expert": (lambda v: v in ("radiology", "chart", "none"), "one of radiology, chart, none"),
    "return_prompt": (lambda v: isinstance(v, bool), "true or false"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "max_new_tokens": (lambda v: _is_int(v) and 1 <= v <= MAX_NEW_TOKENS, f"an integer from 1 to {MAX_NEW_TOKENS}"),
    "num_beams": (lambda v: _is_int(v) and 1 <= v <= MAX_BEAMS, f"an integer from 1 to {MAX_BEAMS}"),
    "top_k": (lambda v: _is_int(v) and 0 <= v <= 1000, "an integer from 0 to 1000"),
    "temperature": (lambda v: _is_number(v) and 0 < v <= 10, "a number above 0 and at most 10"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
    "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 10, "a number above 0 and at most 10"),
}


INPUT_KEYS = ("question", "image", "expert")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def _names(keys) -> str:
    """Unknown key names for an error message: short identifiers only, so a key cannot smuggle data into it."""
    shown = sorted(key for key in keys if isinstance(key, str) and _PLAIN_NAME.fullmatch(key))
    hidden = len(keys) - len(shown)
    return ", ".join(shown + ([f"{hidden} more not shown"] if hidden else []))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EndpointHandler:
    def __init__(self, path: str = "", **kwargs: Any):
        load_kwargs: dict[str, Any] = {"trust_remote_code": True}
        if torch.cuda.is_available():
            load_kwargs["device_map"] = "auto"
            if os.environ.get("VMA_LOAD_IN_8BIT", "0") == "1":
                load_kwargs["model_kwargs"] = {"load_in_8bit": True}
        self.pipeline = pipeline(model=path, **load_kwargs)
        # The bundle's error hierarchy, from the remote code the pipeline loaded (one definition).
        errors = sys.modules[type(self.pipeline.model).__module__]
        self.InputError = errors.InputError
        self.MissingQuestionError = errors.MissingQuestionError
        self.UnknownParameterError = errors.UnknownParameterError
        self.InvalidImageError = errors.InvalidImageError
        self.ImageTooLargeError = errors.ImageTooLargeError
        self.PayloadTooLargeError = errors.PayloadTooLargeError

    def __call__(self, data: Any) -> list[dict] | dict:
        try:
            requests, parameters = self._parse(data)
            records = self.pipeline(requests, batch_size=len(requests), **parameters)
        except Exception as error:
            return self._error_response(error)
        return records if isinstance(records, list) else [records]

    # ------------------------------------------------------------------ request parsing

    def _parse(self, data: Any) -> tuple[list[dict], dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise self.InputError('The request body must be a JSON object with "inputs" (and optionally "parameters").')
        unknown = sorted(set(data) - {"inputs", "parameters"})
        if unknown:
            raise self.UnknownParameterError(
                f"Unknown top-level key(s): {', '.join(unknown)}. Use inputs and parameters."
            )
        inputs = data["inputs"]
        items = inputs if isinstance(inputs, list) else [inputs]
        if not items:
            raise self.MissingQuestionError('"inputs" is an empty list: send at least one question.')
        if len(items) > MAX_INPUTS:
            raise self.PayloadTooLargeError(f"At most {MAX_INPUTS} inputs per request; split the batch.")
        return [self._request(item) for item in items], self._parameters(data.get("parameters") or {})

    def _request(self, item: Any) -> dict:
        if isinstance(item, str):
            item = {"question": item}
        if not isinstance(item, dict):
            raise self.InputError('Each input must be an object {"question": ..., "image": ...} or a question string.')
        unknown = set(item) - set(INPUT_KEYS)
        if unknown:
            raise self.UnknownParameterError(
                f"Unknown input key(s): {_names(unknown)}. Accepted keys: {', '.join(INPUT_KEYS)}."
            )
        question = item.get("question")
        if isinstance(question, str) and len(question) > MAX_QUESTION_CHARS:
            raise self.PayloadTooLargeError(f"The question is longer than {MAX_QUESTION_CHARS} characters.")
        request = dict(item)
        if item.get("image") is not None:
            request["image"] = self._image_bytes(item["image"])
        return request

    def _image_bytes(self, image: Any) -> bytes:
        """Decode base64 / data-URI images here: a string is never read as a path on the server."""
        if not isinstance(image, str):
            raise self.InvalidImageError('"image" must be a base64 string or a data: URI.')
        payload = image.split(",", 1)[1] if image.startswith("data:") and "," in image else image
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise self.ImageTooLargeError(f"The image is larger than the {MAX_IMAGE_BYTES}-byte limit.")
        try:
            decoded = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise self.InvalidImageError('"image" is not valid base64 (or a data: URI with base64 content).') from None
        if not decoded:
            raise self.InvalidImageError('"image" decodes to zero bytes.')
        return decoded

    def _parameters(self, parameters: Any) -> dict:
        if not isinstance(parameters, dict):
            raise self.InputError('"parameters" must be a JSON object.')
        unknown = set(parameters) - set(PARAMETERS)
        if unknown:
            raise self.UnknownParameterError(
                f"Unknown parameter(s): {_names(unknown)}. Accepted: {', '.join(sorted(PARAMETERS))}."
            )
        for name, value in parameters.items():
            check, expected = PARAMETERS[name]
            if not check(value):
                raise self.UnknownParameterError(f"Parameter {name} must be {expected}.")
        return dict(parameters)

    # ------------------------------------------------------------------ errors

    def _error_response(self, error: Exception) -> dict:
        # Matched by name: the pipeline and the model may each hold a copy of the remote-code error classes.
        if any(cls.__name__ == "VisualMedAlpacaError" for cls in type(error).__mro__):
            return {"error": str(error), "error_type": type(error).__name__, "status": error.http_status}
        # Unexpected: log the type only (a message could quote the payload) and keep serving.
        logger.error("Unexpected %s while answering a request.", type(error).__name__)
        return {
            "error": "Internal error while answering; the request was not processed. Try again or report it.",
            "error_type": "InternalError",
            "status": 500,
        }
