"""Inference Endpoints handler for a Visual Med-Alpaca bundle (copied into the Hub repository).

Hugging Face's serving toolkit (huggingface-inference-toolkit) finds this file in the repository folder, builds
``EndpointHandler(path)`` once and calls it with each request's deserialised body (``utils.py``
``check_and_register_custom_pipeline_from_directory``; ``webservice_starlette.py`` ``predict``). Three request
shapes are served:

1. The project's JSON contract (``Content-Type: application/json``)::

    {"inputs": {"image": "<base64 or data: URI>", "question": "What abnormality is seen?"},
     "parameters": {"max_new_tokens": 64, "return_prompt": true}}
    {"inputs": {"question": "What are the chemicals that treat hair loss?"}}        # text only
    {"inputs": "What is a stroke?"}                                                 # text only
    {"inputs": [{"image": "...", "question": "..."}, {"question": "..."}]}          # a batch

   answered with a list of records, one per input: the pipeline's record contract (``answer``, ``expert``,
   ``intermediate_text``, ``intermediate_cached``, ``image_metadata``, ``routing``, ``backend``, ``disclaimer``,
   ``warnings``, and ``prompt`` on request: ``pipeline_vqa.RECORD_KEYS``). ``"image"`` may also be a list of
   base64 DICOM files or one base64 zip of them (a series).

2. The ``visual-question-answering`` task payload that ``huggingface_hub.InferenceClient.visual_question_answering``
   sends: ``{"inputs": "<base64 image>", "image": "<base64 image>", "question": "...", "parameters": {"top_k": 1}}``
   (older clients: ``{"inputs": {"image": ..., "question": ...}}``, which is shape 1). Answered as that task's
   output, a list of ``{"answer", "score"}``, with the record's other fields alongside. ``score`` is the
   language model's probability of the answer given the prompt (geometric mean over its tokens); greedy decoding
   gives one answer, so ``top_k`` above 1 still returns one.

3. A raw image body (``Content-Type: image/png`` etc.) with the question in the query string
   (``?question=...&max_new_tokens=32``): the toolkit turns the body into ``{"inputs": PIL.Image}`` and the query
   string into ``parameters`` (``serialization/image_utils.py``; ``utils.py`` ``convert_params_to_int_or_bool``).
   Raw bytes in ``inputs`` (a DICOM file, from servers that pass other bodies through) are read the same way.

Bad input raises ``EndpointRequestError``; the toolkit answers any exception with HTTP 400 and
``{"error": str(exception)}``, which here reads ``"<ErrorType>: <what was wrong>"`` and never contains the payload
(key names included). The exception carries ``error_type`` and ``http_status`` (the bundle's own code: 413, 415,
422 ...) for servers that map them. In a batch, bad items are marked in place (``{"error", "error_type",
"status", "input_index"}``) and the others answered; a batch of only bad items raises.

Only installed packages are imported: the error types are those of the bundle's own remote code. The contract
itself (``EndpointContract``: shapes, items, caps, parameters, error mapping, partial-batch marking) needs no model:
serve.py's ``POST /predict`` answers through it with the same records and errors.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from transformers import pipeline

logger = logging.getLogger(__name__)

MAX_BEAMS = 4
INPUT_KEYS = ("question", "image", "expert")
TOP_LEVEL_KEYS = ("inputs", "parameters")
VQA_TOP_LEVEL_KEYS = ("inputs", "parameters", "image", "question")
# The toolkit moves query-string values into parameters as text unless they are digits or true/false: accept
# decimal text for the number parameters (``?temperature=0.7``).
NUMBER_PARAMETERS = ("temperature", "top_p", "repetition_penalty")
SHAPE_CONTRACT, SHAPE_VQA, SHAPE_RAW = "contract", "visual-question-answering", "raw-image"
INTERNAL_ERROR = "Internal error while answering; the request was not processed. Try again or report it."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class EndpointLimits(SimpleNamespace):
    """The caps of the request contract (one definition: the handler reads them from ``VMA_*`` variables, serve.py
    from its flags, whose defaults are these). Not a dataclass: the toolkit imports this file by location, and
    dataclasses with postponed annotations need the module registered in ``sys.modules``."""

    DEFAULTS = {
        "max_inputs": 16,
        "max_image_bytes": 10 * 1024 * 1024,
        "max_series_files": 512,
        "max_series_bytes": 200 * 1024 * 1024,
        "max_question_chars": 4000,
        "max_new_tokens": 512,
    }

    def __init__(self, **limits: int):
        unknown = set(limits) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"Unknown limit(s): {', '.join(sorted(unknown))}.")
        super().__init__(**{name: int(limits.get(name, default)) for name, default in self.DEFAULTS.items()})

    @classmethod
    def from_environment(cls) -> EndpointLimits:
        return cls(**{name: os.environ.get(f"VMA_{name.upper()}", default) for name, default in cls.DEFAULTS.items()})

    def replace(self, **changes: int) -> EndpointLimits:
        return type(self)(**{**vars(self), **changes})


class EndpointRequestError(Exception):
    """A request the endpoint refuses; ``str()`` is what the toolkit sends back: ``"<ErrorType>: <message>"``."""

    def __init__(self, error_type: str, message: str, http_status: int):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.http_status = http_status

    def as_record(self, input_index: int | None = None) -> dict:
        record = {"error": self.message, "error_type": self.error_type, "status": self.http_status}
        if input_index is not None:
            record["input_index"] = input_index
        return record


def endpoint_error(error: BaseException) -> EndpointRequestError:
    """Any exception as the contract's error: the bundle's typed errors keep their type, message (which never holds
    the payload) and status; anything else is an ``InternalError`` logged by type only (a message could quote it)."""
    if isinstance(error, EndpointRequestError):
        return error
    # Matched by name: the pipeline and the model may each hold a copy of the remote-code error classes.
    if any(cls.__name__ == "VisualMedAlpacaError" for cls in type(error).__mro__):
        return EndpointRequestError(type(error).__name__, str(error), error.http_status)
    logger.error("Unexpected %s while answering a request.", type(error).__name__)
    return EndpointRequestError("InternalError", INTERNAL_ERROR, 500)


class EndpointRequest:
    """A parsed request: ``items`` are pipeline requests (image decoded to bytes), or the error that refused one;
    ``parameters`` are the pipeline's keyword arguments; ``return_prompt`` is what the client asked for (the
    visual-question-answering shape needs the prompt for its score, so ``parameters`` always asks for it there)."""

    def __init__(self, shape: str, items: list, parameters: dict, return_prompt: bool):
        self.shape, self.items, self.parameters, self.return_prompt = shape, items, parameters, return_prompt


class EndpointContract:
    """The Endpoints request contract without a model: parse and validate a body, map errors, and turn the answers
    into the response. ``errors`` is the module (or any namespace) holding the bundle's error classes: the remote
    code the pipeline loaded, in a bundle; ``modeling_visual_med_alpaca`` in a checkout (serve.py's ``/predict``)."""

    def __init__(self, errors: Any, limits: EndpointLimits | None = None):
        self.errors = errors
        self.limits = limits or EndpointLimits()
        # What an endpoint client may set, each with its check; loading options and unbounded generation are not
        # offered.
        max_new_tokens = self.limits.max_new_tokens
        self.parameter_checks = {
            "expert": (lambda v: v in ("radiology", "chart", "none"), "one of radiology, chart, none"),
            "return_prompt": (lambda v: isinstance(v, bool), "true or false"),
            "do_sample": (lambda v: isinstance(v, bool), "true or false"),
            "max_new_tokens": (
                lambda v: _is_int(v) and 1 <= v <= max_new_tokens,
                f"an integer from 1 to {max_new_tokens}",
            ),
            "num_beams": (lambda v: _is_int(v) and 1 <= v <= MAX_BEAMS, f"an integer from 1 to {MAX_BEAMS}"),
            "top_k": (lambda v: _is_int(v) and 0 <= v <= 1000, "an integer from 0 to 1000"),
            "temperature": (lambda v: _is_number(v) and 0 < v <= 10, "a number above 0 and at most 10"),
            "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
            "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 10, "a number above 0 and at most 10"),
        }

    # ------------------------------------------------------------------ parsing

    def parse(self, data: Any) -> EndpointRequest:
        """The request, or raise the bundle's typed error (``error()`` maps it); a bad item of a batch is kept as
        its error in ``items``."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise self.errors.InputError(
                'The request body must be a JSON object with "inputs" (and optionally "parameters").'
            )
        inputs = data["inputs"]
        if "question" in data or "image" in data:
            shape, accepted = SHAPE_VQA, VQA_TOP_LEVEL_KEYS
        elif isinstance(inputs, (Image.Image, bytes, bytearray)):
            shape, accepted = SHAPE_RAW, TOP_LEVEL_KEYS
        else:
            shape, accepted = SHAPE_CONTRACT, TOP_LEVEL_KEYS
        unknown = set(data) - set(accepted)
        if unknown:
            raise self.errors.UnknownParameterError(
                f"The request has {len(unknown)} unknown top-level key(s); accepted: {', '.join(accepted)}."
            )
        parameters = self._parameters(data.get("parameters") or {}, shape)
        return_prompt = parameters.get("return_prompt", False)
        if shape == SHAPE_VQA:
            parameters.pop("top_k", None)  # the task's number of answers, not the sampling parameter
            parameters["return_prompt"] = True  # the score is computed from the prompt
            items = [self._item({"image": data.get("image", inputs), "question": data.get("question")})]
        elif shape == SHAPE_RAW:
            question = parameters.pop("question", None)
            items = [self._item({"image": inputs, "question": question})]
        else:
            items = inputs if isinstance(inputs, list) else [inputs]
            if not items:
                raise self.errors.MissingQuestionError('"inputs" is an empty list: send at least one question.')
            if len(items) > self.limits.max_inputs:
                raise self.errors.PayloadTooLargeError(
                    f"At most {self.limits.max_inputs} inputs per request; split the batch."
                )
            items = [self._item(item) for item in items]
        return EndpointRequest(shape, items, parameters, return_prompt)

    def _item(self, item: Any) -> dict | EndpointRequestError:
        try:
            return self._request(item)
        except Exception as error:
            return endpoint_error(error)

    def _request(self, item: Any) -> dict:
        if isinstance(item, str):
            item = {"question": item}
        if not isinstance(item, dict):
            raise self.errors.InputError(
                'Each input must be an object {"question": ..., "image": ...} or a question string.'
            )
        unknown = set(item) - set(INPUT_KEYS)
        if unknown:
            raise self.errors.UnknownParameterError(
                f"An input has {len(unknown)} unknown key(s); accepted keys: {', '.join(INPUT_KEYS)}."
            )
        question = item.get("question")
        if not isinstance(question, str) or not question.strip():
            raise self.errors.MissingQuestionError(
                'Each input needs a non-empty "question" string (for a raw image body: ?question=... in the URL).'
            )
        if len(question) > self.limits.max_question_chars:
            raise self.errors.PayloadTooLargeError(
                f"The question is longer than {self.limits.max_question_chars} characters."
            )
        request = {key: value for key, value in item.items() if value is not None}
        if item.get("image") is not None:
            request["image"] = self._image(item["image"])
        return request

    def _image(self, image: Any) -> Image.Image | bytes | list[bytes]:
        """Decode base64 / data-URI images here: a string is never read as a path on the server.

        A list of base64 strings is a DICOM series (one file each); a PIL image or bytes came as a raw body.
        """
        limits = self.limits
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (bytes, bytearray)):
            if len(image) > limits.max_image_bytes:
                raise self.errors.ImageTooLargeError(
                    f"The image is larger than the {limits.max_image_bytes}-byte limit."
                )
            if not image:
                raise self.errors.InvalidImageError("The request body is empty: send the image file.")
            return bytes(image)
        if isinstance(image, list):
            if not image:
                raise self.errors.InvalidImageError('"image" is an empty list: send one base64 string per DICOM file.')
            if len(image) > limits.max_series_files:
                raise self.errors.PayloadTooLargeError(f"A series may hold at most {limits.max_series_files} files.")
            if sum(len(part) if isinstance(part, str) else 0 for part in image) * 3 // 4 > limits.max_series_bytes:
                raise self.errors.ImageTooLargeError(
                    f"The series is larger than the {limits.max_series_bytes}-byte limit."
                )
            return [self._base64(part, limits.max_series_bytes) for part in image]
        return self._base64(image, limits.max_image_bytes)

    def _base64(self, image: Any, limit: int) -> bytes:
        if not isinstance(image, str):
            raise self.errors.InvalidImageError(
                '"image" must be a base64 string, a data: URI, or a list of base64 strings.'
            )
        payload = image.split(",", 1)[1] if image.startswith("data:") and "," in image else image
        if len(payload) * 3 // 4 > limit:
            raise self.errors.ImageTooLargeError(f"The image is larger than the {limit}-byte limit.")
        try:
            decoded = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise self.errors.InvalidImageError(
                '"image" is not valid base64 (or a data: URI with base64 content).'
            ) from None
        if not decoded:
            raise self.errors.InvalidImageError('"image" decodes to zero bytes.')
        return decoded

    def _parameters(self, parameters: Any, shape: str) -> dict:
        if not isinstance(parameters, dict):
            raise self.errors.InputError('"parameters" must be a JSON object.')
        checks = dict(self.parameter_checks)
        if shape == SHAPE_VQA:
            # In the visual-question-answering payload top_k is the number of answers wanted (the task's own).
            checks["top_k"] = (lambda v: _is_int(v) and v >= 1, "an integer of at least 1")
        if shape == SHAPE_RAW:
            checks["question"] = (lambda v: isinstance(v, str), "the question text")
        unknown = set(parameters) - set(checks)
        if unknown:
            raise self.errors.UnknownParameterError(
                f"The request has {len(unknown)} unknown parameter(s); accepted: {', '.join(sorted(checks))}."
            )
        checked = {}
        for name, value in parameters.items():
            if name in NUMBER_PARAMETERS and isinstance(value, str):
                value = _decimal(value)
            check, expected = checks[name]
            if not check(value):
                raise self.errors.UnknownParameterError(f"Parameter {name} must be {expected}.")
            checked[name] = value
        if shape == SHAPE_VQA and checked.get("top_k") is None:
            checked.pop("top_k", None)
        return checked

    # ------------------------------------------------------------------ answering

    @staticmethod
    def error(error: BaseException) -> EndpointRequestError:
        return endpoint_error(error)

    @staticmethod
    def respond(request: EndpointRequest, outcomes: list, score: Callable[[dict], float | None]) -> list[dict]:
        """The response for ``outcomes`` (a record, or the ``EndpointRequestError`` that refused the item, in item
        order): bad items of a batch are marked in place; if nothing was answered, the request as a whole is
        refused (raises). ``score(record)`` gives the visual-question-answering shape's answer score."""
        refused = [outcome for outcome in outcomes if isinstance(outcome, EndpointRequestError)]
        if len(refused) == len(outcomes):
            first = refused[0]
            if len(outcomes) == 1:
                raise first
            raise EndpointRequestError(
                first.error_type, f"Every input was refused; input 0: {first.message}", first.http_status
            )
        if request.shape == SHAPE_VQA:
            record = outcomes[0]
            answer_score = score(record)
            if not request.return_prompt:
                record.pop("prompt", None)
            # Greedy decoding gives one answer, whatever top_k asked for (top_k bounds the list's length).
            return [{"answer": record["answer"], "score": answer_score, **record}]
        return [
            outcome.as_record(index) if isinstance(outcome, EndpointRequestError) else outcome
            for index, outcome in enumerate(outcomes)
        ]


def answer_score(pipeline: Any, record: dict) -> float | None:
    """P(answer | prompt) under the bundle's language model, as a geometric mean over the answer's tokens.

    ``None`` when another server wrote the answer (``backend`` is not the bundle's own model).
    """
    if record.get("backend") != "local" or "prompt" not in record:
        return None
    tokenizer, model = pipeline.tokenizer, pipeline.model
    prompt_ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
    answer_ids = tokenizer(record["answer"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    if answer_ids.shape[1] == 0:
        return None
    device = model.get_input_embeddings().weight.device
    input_ids = torch.cat([prompt_ids, answer_ids], dim=1).to(device)
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    except (RuntimeError, IndexError) as error:  # e.g. prompt + answer beyond the positions: keep the answer
        logger.warning("No answer score (%s in the scoring pass).", type(error).__name__)
        return None
    # Position t predicts token t+1: the answer's tokens are predicted by the positions just before them.
    predicted = logits[0, prompt_ids.shape[1] - 1 : -1].float().log_softmax(dim=-1)
    token_log_probs = predicted.gather(1, answer_ids[0].to(device).unsqueeze(1)).squeeze(1)
    return float(token_log_probs.mean().exp())


class EndpointHandler:
    def __init__(self, path: str = "", **kwargs: Any):
        load_kwargs: dict[str, Any] = {"trust_remote_code": True}
        if torch.cuda.is_available():
            load_kwargs["device_map"] = "auto"
            if os.environ.get("VMA_LOAD_IN_8BIT", "0") == "1":
                load_kwargs["model_kwargs"] = {"load_in_8bit": True}
        self.pipeline = pipeline(model=path, **load_kwargs)
        # The bundle's error hierarchy, from the remote code the pipeline loaded (one definition).
        self.contract = EndpointContract(
            sys.modules[type(self.pipeline.model).__module__], EndpointLimits.from_environment()
        )

    def __call__(self, data: Any) -> list[dict]:
        try:
            request = self.contract.parse(data)
            good = [index for index, item in enumerate(request.items) if not isinstance(item, EndpointRequestError)]
            outcomes = list(request.items)  # a record, or the error that refused the item
            if good:
                answers = self._run([request.items[i] for i in good], request.parameters)
                for index, outcome in zip(good, answers, strict=True):
                    outcomes[index] = outcome
            return self.contract.respond(request, outcomes, lambda record: answer_score(self.pipeline, record))
        except EndpointRequestError:
            raise
        except Exception as error:
            raise endpoint_error(error) from None

    def _run(self, requests: list[dict], parameters: dict) -> list:
        """Records for the requests as one batch; if the batch fails, one at a time, so a bad item is only marked."""

        def answer(batch: list[dict]) -> list:
            records = self.pipeline(batch, batch_size=len(batch), **parameters)
            return records if isinstance(records, list) else [records]

        return each_alone_on_failure(answer, requests, endpoint_error)


def each_alone_on_failure(function, items: list, on_error) -> list:
    """``function(items)`` as one batch; if it raises, each item alone, so one bad item does not fail its
    batch-mates: a failed item's outcome is ``on_error(error)``. (Shared with serve.py's batched stages.)"""
    try:
        return function(items)
    except Exception as error:
        if len(items) == 1:
            return [on_error(error)]
    outcomes = []
    for item in items:
        try:
            outcomes.extend(function([item]))
        except Exception as error:
            outcomes.append(on_error(error))
    return outcomes


def _decimal(text: str) -> float | str:
    """``"0.7"`` -> 0.7; anything else stays text and fails the parameter's check."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text
