"""OpenAI chat-completions protocol for the Visual Med-Alpaca server (``serve.py``): request/response models,
the conversion of a chat into a pipeline request, and OpenAI's error object, each in one place.

Shaped like vLLM's ``vllm/entrypoints/openai/protocol.py``: pydantic models mirror OpenAI's schema, errors are
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status. What the chain cannot honour (``n`` > 1,
tools, logprobs, audio/file parts) is refused, never silently dropped. Error messages name the field, never its
value: a chat may hold patient data.

Conversation mapping: the last message is the question (a ``user`` message); earlier ``user``/``assistant`` pairs
become the pipeline's follow-up ``history``; the case's image is the one ``image_url`` part of any user message (a
client re-sends it with every turn, as OpenAI clients do, and the server's intermediate-text cache finds the text
the expert produced for it on the first turn, so the expert does not run again). ``system`` messages are accepted
and not used: the Alpaca template carries its own instruction (a warning in the record says so).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# data: URI media types the image loader reads (medical_image.py): PNG/JPEG/TIFF/WebP/BMP/GIF and DICOM Part 10.
IMAGE_MEDIA_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/tiff",
        "image/webp",
        "image/bmp",
        "image/gif",
        "application/dicom",
    }
)
SYSTEM_IGNORED_WARNING = (
    "System/developer messages are not used: the Alpaca prompt template carries its own instruction."
)
_DATA_URI = re.compile(r"data:(?P<media>[A-Za-z0-9.+/-]+)(?P<params>(?:;[A-Za-z0-9=._+-]+)*),(?P<payload>.*)", re.S)
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


class ProtocolError(Exception):
    """A request the API refuses: ``status`` (HTTP), ``message`` (never holds the payload), OpenAI ``type``,
    ``param`` (the offending field) and ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------- requests


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are refused by name below (not dropped): a misspelt option must not pass unnoticed.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Refused when set (the chain cannot honour them); accepted as fields so the error can name them.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: Any = None
    # Extension (``extra_body={"expert": ...}`` in the openai client): force the visual expert.
    expert: Literal["radiology", "chart", "none"] | None = None


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; a ``ProtocolError`` names the first bad field, never its value."""
    if not isinstance(body, dict):
        raise ProtocolError(400, "The request body must be a JSON object.")
    unknown = sorted(set(body) - set(ChatCompletionRequest.model_fields))
    if unknown:
        raise ProtocolError(400, f"Unknown field(s): {_names(unknown)}.", param=_first_name(unknown))
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise ProtocolError(400, *validation_message(error)) from None
    unsupported = [
        ("n", request.n not in (None, 1), "n > 1 is not supported: send one request per answer."),
        ("tools", request.tools not in (None, []), "tools (function calling) are not supported by this model."),
        ("tool_choice", request.tool_choice not in (None, "none"), "tool_choice is not supported by this model."),
        ("functions", request.functions is not None, "functions are not supported by this model."),
        ("function_call", request.function_call is not None, "function_call is not supported by this model."),
        ("logprobs", bool(request.logprobs), "logprobs are not supported by this server."),
        ("top_logprobs", request.top_logprobs is not None, "top_logprobs are not supported by this server."),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported by this server."),
        ("frequency_penalty", bool(request.frequency_penalty), "frequency_penalty is not supported."),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty is not supported."),
        (
            "response_format",
            request.response_format not in (None, {"type": "text"}),
            "response_format other than text is not supported.",
        ),
    ]
    for param, refused, message in unsupported:
        if refused:
            raise ProtocolError(400, message, param=param, code="unsupported_parameter")
    return request


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """The first pydantic error as (message, param) without its input value (pydantic's own text can echo it)."""
    first = error.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-", "list[")))
    reason = {
        "missing": "is required",
        "extra_forbidden": "is not an accepted field",
        "literal_error": "has a value that is not accepted",
        "too_short": "must not be empty",
    }.get(first["type"], f"is invalid ({first['type']})")
    if first["type"] in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        reason = first["msg"].replace("Input", "must be").replace("should be", "")
        reason = re.sub(r"\s+", " ", reason).strip()
    return f"'{location}' {reason}.", location.split(".")[0] if location else None


@dataclass
class Limits:
    """Caps a request must stay under (all configurable, see serve.py)."""

    max_images: int = 1
    max_question_chars: int = 4000
    max_tokens: int = 512
    max_image_bytes: int = 10 * 1024 * 1024
    max_history_turns: int = 64
    allowed_image_hosts: tuple[str, ...] = ()


@dataclass
class ChatTurns:
    """A chat as the pipeline sees it."""

    question: str
    history: list[dict] = field(default_factory=list)
    image: bytes | str | None = None  # decoded data: URI bytes, or an allowlisted URL (fetch_allowlisted_image)
    warnings: list[str] = field(default_factory=list)


def chat_to_turns(request: ChatCompletionRequest, limits: Limits) -> ChatTurns:
    """Messages -> (question, history, image); refuses what the pipeline cannot answer."""
    warnings: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text) of user/assistant messages, consecutive ones of a role joined
    images: list[str] = []
    for index, message in enumerate(request.messages):
        param = f"messages.{index}"
        if message.role in ("system", "developer"):
            if SYSTEM_IGNORED_WARNING not in warnings:
                warnings.append(SYSTEM_IGNORED_WARNING)
            continue
        text_parts, message_images = _split_content(message.content, param)
        if message_images and message.role != "user":
            raise ProtocolError(400, "Only user messages may carry images.", param=param)
        images.extend(message_images)
        text = "\n".join(part for part in text_parts if part.strip()).strip()
        if turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, f"{turns[-1][1]}\n{text}".strip())
        else:
            turns.append((message.role, text))
    if not turns or turns[-1][0] != "user":
        raise ProtocolError(400, "The last message must be a user message with the question.", param="messages")
    question = turns[-1][1]
    if not question:
        raise ProtocolError(400, "The last user message has no text: ask a question.", param="messages")
    if len(question) > limits.max_question_chars:
        raise ProtocolError(
            413, f"The question is longer than {limits.max_question_chars} characters.", param="messages"
        )
    if len(images) > limits.max_images:
        raise ProtocolError(
            400,
            f"At most {limits.max_images} image(s) per conversation: the model reads one image per case.",
            param="messages",
            code="too_many_images",
        )
    earlier = turns[:-1]
    if earlier and earlier[0][0] == "assistant":  # an opening assistant greeting has no question to pair with
        earlier = earlier[1:]
    history = [{"question": q, "answer": a} for (_, q), (_, a) in zip(earlier[0::2], earlier[1::2], strict=False)]
    if len(history) > limits.max_history_turns:
        raise ProtocolError(400, f"At most {limits.max_history_turns} earlier turns.", param="messages")
    image = _image_source(images[0], limits) if images else None
    return ChatTurns(question=question, history=history, image=image, warnings=warnings)


def _split_content(content, param: str) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts = [part.text for part in content if isinstance(part, TextPart)]
    images = [part.image_url.url for part in content if isinstance(part, ImagePart)]
    return texts, images


def _image_source(url: str, limits: Limits) -> bytes | str:
    """A data: URI's bytes, or an allowlisted http(s) URL (for ``fetch_allowlisted_image``)."""
    url = url.strip()
    if url[:5].lower() == "data:":
        match = _DATA_URI.fullmatch(url)
        if match is None or ";base64" not in match["params"].lower():
            raise ProtocolError(400, "image_url must be a base64 data: URI (data:MEDIA;base64,...).", param="messages")
        media = match["media"].lower()
        if media not in IMAGE_MEDIA_TYPES:
            raise ProtocolError(
                415,
                f"Unsupported image media type; use one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}.",
                param="messages",
            )
        return decode_base64_image(match["payload"], limits, param="messages")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ProtocolError(400, "image_url must be a data: URI (or an allowlisted http(s) URL).", param="messages")
    if parts.netloc.lower() not in limits.allowed_image_hosts:
        raise ProtocolError(
            403,
            "Remote image URLs are not fetched by this server: send the image as a base64 data: URI "
            "(the operator can allowlist hosts with --allowed_image_hosts).",
            param="messages",
            code="image_url_not_allowed",
        )
    return url


async def fetch_allowlisted_image(url: str, limits: Limits, timeout_s: float = 10.0) -> bytes:
    """Download an allowlisted image URL: no redirects (an allowlisted host could point anywhere, e.g. at an
    internal address), a total time limit and the byte cap enforced while reading. Errors never show the URL."""
    import httpx

    try:
        async with (
            httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.is_redirect:
                raise ProtocolError(403, "The image URL redirects; redirects are not followed.", param="messages")
            if response.status_code != 200:
                raise ProtocolError(
                    422, f"The image URL could not be downloaded (HTTP {response.status_code}).", param="messages"
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise ProtocolError(413, f"The image is larger than the {limits.max_image_bytes}-byte limit.")
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise ProtocolError(422, "The image URL did not answer in time.", param="messages") from None
    except httpx.HTTPError:
        raise ProtocolError(422, "The image URL could not be downloaded.", param="messages") from None
    if not size:
        raise ProtocolError(422, "The image URL returned no bytes.", param="messages")
    return b"".join(chunks)


def decode_base64_image(payload: str, limits: Limits, param: str | None = None) -> bytes:
    """Base64 image bytes, size-capped before decoding; never read as a path on the server."""
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ProtocolError(413, f"The image is larger than the {limits.max_image_bytes}-byte limit.", param=param)
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, "The image is not valid base64.", param=param) from None
    if not decoded:
        raise ProtocolError(400, "The image holds no bytes.", param=param)
    return decoded


def _names(keys) -> str:
    """Field names for an error message: short identifiers only, so a key cannot smuggle data into it."""
    shown = sorted(key for key in keys if isinstance(key, str) and _PLAIN_NAME.fullmatch(key))
    hidden = len(keys) - len(shown)
    return ", ".join(shown + ([f"{hidden} more not shown"] if hidden else []))


def _first_name(keys) -> str | None:
    shown = [key for key in keys if isinstance(key, str) and _PLAIN_NAME.fullmatch(key)]
    return shown[0] if shown else None


# ---------------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    request_id: str, model: str, answer: str, finish_reason: str, token_usage: dict, record: dict
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": token_usage,
        "visual_med_alpaca": record,
    }


def chat_chunk(request_id: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None) -> dict:
    """One streaming chunk; ``delta=None`` gives the usage chunk (no choices), as OpenAI sends it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def model_list(model_id: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "visual-med-alpaca"}],
    }


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found (OpenAI's ``stop``)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


__all__ = [
    "ChatCompletionRequest",
    "ChatTurns",
    "Limits",
    "ProtocolError",
    "chat_chunk",
    "chat_completion",
    "chat_to_turns",
    "completion_id",
    "cut_at_stop",
    "decode_base64_image",
    "fetch_allowlisted_image",
    "error_body",
    "model_list",
    "parse_chat_request",
    "usage",
]
